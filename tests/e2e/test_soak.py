"""The soak's short CI mode: `bench/soak --ci` (200 devices, 3 rounds of 6 s with a reconnect of
every device per round, bad input mixed in, VictoriaMetrics stopped for the middle round and
started again). It must end with every acknowledged reading delivered exactly once through the
agency API, every bad-input check passed and the sink drained. The hour-long default is a
benchmark (docs/src/benchmarks/soak.md), not a test.
"""

from __future__ import annotations

import json
import os
import subprocess

from support import CITYGW_BIN, ROOT
from support.device_sim import DEVICE_SIM


def test_soak_short_mode(tmp_path):
    out = tmp_path / "soak.json"
    env = dict(os.environ, CITYGW=str(CITYGW_BIN), DEVICE_SIM=str(DEVICE_SIM),
               BENCH_DIR=str(tmp_path))
    r = subprocess.run([str(ROOT / "bench" / "soak"), "--ci", "--out", str(out)], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["sink_drained"]
    v = res["verify"]
    assert v["missing"] == 0 and v["duplicated"] == 0 and v["acked_readings"] > 0, v
    assert v["delivered_readings"] >= v["acked_readings"]
    assert len(res["rounds"]) == 3 and all(r["exit"] == 0 for r in res["rounds"])
    assert res["bad_input"] and all(b["ok"] for b in res["bad_input"]), res["bad_input"]
    assert len(res["samples"]) >= 10

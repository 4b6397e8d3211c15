"""Clock faults: devices whose clocks are far off, and the gateway's own clock stepping backwards.

- A device time far in the future (an RTC set to the wrong year) or far in the past (a clock reset
  to 2000) is replaced by the receive time and counted; times within the window (buffered
  readings, a clock minutes off) are kept as sent.
- The gateway's clock is stepped back two hours under load with libfaketime (Debian's
  `libfaketime`, preloaded; monotonic clocks left alone, so timers keep working): reading ids keep
  growing in the order the readings were acknowledged, receive times follow the stepped clock, and
  the device's last-seen time (what the KPI counts) never goes backwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import now_ms

FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
YEAR_MS = 365 * 86_400_000


def test_implausible_device_times_are_replaced(gw):
    d = gw.add_device()
    before = gw.metric("citygw_device_time_replaced_total", protocol="mqtt", direction="future")
    before_past = gw.metric("citygw_device_time_replaced_total", protocol="mqtt", direction="past")
    now = now_ms()
    sent = {
        1: now + 2 * YEAR_MS,          # future: replaced
        2: 946_684_800_000,            # 2000-01-01, a reset clock: replaced
        3: now + 60_000,               # a minute fast: kept
        4: now - 2 * 86_400_000,       # buffered two days: kept
        5: now - 5 * YEAR_MS,          # buffered five years (within the default 10): kept
    }
    with gw.connected_client(d, version=5) as c:
        for seq, ts in sent.items():
            assert c.publish(d.topic, json.dumps({"ts": ts, "seq": seq, "temperature": 20})) == 0
    got = {r["device_seq"]: r for r in gw.readings(d.id)}
    for seq in (1, 2):
        assert got[seq]["device_time_ms"] == got[seq]["received_time_ms"], got[seq]
    for seq in (3, 4, 5):
        assert got[seq]["device_time_ms"] == sent[seq], got[seq]
    assert gw.metric("citygw_device_time_replaced_total", protocol="mqtt",
                     direction="future") == before + 1
    assert gw.metric("citygw_device_time_replaced_total", protocol="mqtt",
                     direction="past") == before_past + 1


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed (tests/run installs it)")
def test_gateway_clock_stepping_back(gateway_factory, tmp_path):
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    gw = gateway_factory(env={
        "LD_PRELOAD": str(FAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    })
    d = gw.add_device()
    with gw.connected_client(d, version=5) as c:
        for seq in range(1, 51):
            assert c.publish(d.topic, json.dumps({"seq": seq, "vehicle_count": seq})) == 0
        seen_before = gw.cli("device", "show", d.id)["last_seen_time_ms"]
        offset.write_text("-7200\n")           # the gateway's clock steps back two hours
        for seq in range(51, 101):
            assert c.publish(d.topic, json.dumps({"seq": seq, "vehicle_count": seq})) == 0
    stored = sorted(gw.readings(d.id), key=lambda r: r["id"])
    by_seq = [r["device_seq"] for r in stored]
    assert by_seq == list(range(1, 101)), "ids follow the order of acknowledgement"
    before = [r["received_time_ms"] for r in stored[:50]]
    after = [r["received_time_ms"] for r in stored[50:]]
    # The step really happened (else this test proves nothing) ...
    assert max(after) < min(before) - 7_000_000, (min(before), max(after))
    # ... and what was stamped with the stepped clock is stored, in id order, nothing lost.
    assert len({r["id"] for r in stored}) == 100
    assert gw.cli("device", "show", d.id)["last_seen_time_ms"] >= seen_before
    status = gw.http_get("/readyz").status_code
    assert status == 200

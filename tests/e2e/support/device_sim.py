"""Running the real `device-sim` binary against a test gateway: provisioning a scenario, and a
run with `device-sim verify` following it live through the agency API."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import ROOT, Gateway

DEVICE_SIM = Path(os.environ.get("DEVICE_SIM_BIN", ROOT / "target" / "debug" / "device-sim"))


def device_sim(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
               **kw) -> subprocess.CompletedProcess:
    if not DEVICE_SIM.exists():
        raise FileNotFoundError(f"{DEVICE_SIM} missing: cargo build --workspace")
    return subprocess.run([str(DEVICE_SIM), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, **kw)


@dataclass
class Provisioned:
    """A scenario registered in a gateway: its credentials file, the rows by device id, and an
    agency that may read the scenario's tenant."""
    scenario: Path
    tenant: str
    creds: Path
    rows: dict[str, dict[str, str]]
    agency: object


def provision(gw: Gateway, scenario: Path, tenant: str, creds: Path, devices: int) -> Provisioned:
    p = device_sim("provision", str(scenario), "--grpc", gw.grpc_url, "--out", str(creds),
                   env={"DEVICE_SIM_ADMIN_TOKEN": gw.token})
    assert p.returncode == 0, p.stderr
    assert f"provisioned {devices} of {devices}" in p.stdout, p.stdout
    header, *lines = creds.read_text().splitlines()
    cols = header.split(",")
    rows = {r["id"]: r for r in (dict(zip(cols, line.split(","))) for line in lines)}
    return Provisioned(scenario, tenant, creds, rows, gw.add_agency(tenants=[tenant]))


def run_and_verify(gw: Gateway, p: Provisioned, work: Path, *run_args: str) -> tuple[dict, dict]:
    """`device-sim run` with `verify` subscribed before it starts; asserts both succeeded and
    that verify found nothing missing or duplicated; returns (run summary, verify report). The
    ack log is left in `work / "acks.log"`."""
    ack_log = work / "acks.log"
    run_json, verify_json = work / "run.json", work / "verify.json"
    verify = subprocess.Popen(
        [str(DEVICE_SIM), "verify", "--grpc", gw.grpc_url, "--ack-log", str(ack_log),
         "--tenant", p.tenant, "--timeout", "60", "--json", str(verify_json)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "DEVICE_SIM_AGENCY_TOKEN": p.agency.token})
    try:
        run = device_sim("run", str(p.scenario), "--credentials", str(p.creds),
                         "--ack-log", str(ack_log), "--json", str(run_json), *run_args,
                         timeout=150)
        assert run.returncode == 0, run.stderr[-3000:]
        out, _ = verify.communicate(timeout=120)
    finally:
        verify.kill()
    r = json.loads(run_json.read_text())
    r["progress"] = run.stderr
    assert verify.returncode == 0, out
    v = json.loads(verify_json.read_text())
    assert v["missing"] == 0 and v["duplicated"] == 0, v
    assert v["acked_messages"] == r["acked"]
    assert v["acked_readings"] == r["readings_acked"]
    return r, v

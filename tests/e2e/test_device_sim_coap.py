"""device-sim's CoAPS driver against the real gateway, beyond the all-protocol smoke run
(test_device_sim.py): devices handshake again when the gateway ends idle DTLS sessions and nothing
is lost, and a CoAPS device with a wrong PSK fails its handshake and is counted as such."""

from __future__ import annotations

import json

import pytest

from support import ROOT, Gateway
from support.device_sim import device_sim, provision, run_and_verify

SCENARIO = ROOT / "device-sim" / "scenarios" / "coap-smoke.toml"
DEVICES = 60


def coap_args(gw: Gateway) -> list[str]:
    return ["--coap", gw.coap_listen, "--coaps", f"{gw.host}:{gw.coaps_port}",
            "--lwm2m-lifetime", "8"]


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    # A wrong PSK shows as a handshake that never completes: keep the gateway's wait short.
    return module_gateways(env={"CITYGW_COAP__PLAIN_ENABLED": "true",
                                "CITYGW_COAP__DTLS_HANDSHAKE_TIMEOUT_SECS": "2"})


@pytest.fixture(scope="module")
def provisioned(gw, tmp_path_factory):
    creds = tmp_path_factory.mktemp("coap-smoke") / "creds.csv"
    return provision(gw, SCENARIO, "sim-coap", creds, DEVICES)


def test_provision_gives_coaps_devices_a_psk(provisioned):
    for r in provisioned.rows.values():
        if r["protocol"] == "coaps":
            key = bytes.fromhex(r["psk"])
            assert 16 <= len(key) <= 64, r
        else:
            assert r["psk"] == "", r


def test_coaps_devices_handshake_again_when_the_gateway_ends_idle_sessions(gateway_factory,
                                                                          tmp_path):
    # Sessions idle for 1 s end with the gateway's close_notify, between every two reports.
    g = gateway_factory(env={"CITYGW_COAP__PLAIN_ENABLED": "true",
                             "CITYGW_COAP__DTLS_IDLE_SECS": "1"})
    p = provision(g, SCENARIO, "sim-coap", tmp_path / "creds.csv", DEVICES)
    coaps = sum(1 for row in p.rows.values() if row["protocol"] == "coaps")
    r, _ = run_and_verify(g, p, tmp_path, "--duration", "6", *coap_args(g))
    assert r["connected"] == DEVICES and r["connect_failed"] == 0, r
    assert r["acked"] == r["sent"] and r["unconfirmed"] == 0, r
    assert r["disconnects"] >= coaps, r


def test_wrong_psk_fails_the_handshake(gw, provisioned, tmp_path):
    coaps = [i for i, r in provisioned.rows.items() if r["protocol"] == "coaps"]
    wrong = tmp_path / "wrong.csv"
    header, *lines = provisioned.creds.read_text().splitlines()
    cols = header.split(",")
    out = [header]
    for line in lines:
        row = dict(zip(cols, line.split(",")))
        if row["protocol"] == "coaps":
            row["psk"] = (b"not-the-key-" + row["id"].encode()).hex()
        out.append(",".join(row[c] for c in cols))
    wrong.write_text("\n".join(out) + "\n")
    run_json = tmp_path / "run.json"
    p = device_sim("run", str(SCENARIO), "--credentials", str(wrong), *coap_args(gw),
                   "--duration", "2", "--connect-timeout", "3", "--json", str(run_json))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(run_json.read_text())
    assert r["connect_failed"] == len(coaps), r
    assert r["outcomes"] == {"dtls handshake timeout": len(coaps)}, r
    assert r["connected"] == DEVICES - len(coaps), r
    assert r["rejected"] == 0 and r["unconfirmed"] == 0, r

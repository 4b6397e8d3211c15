"""device-sim's CoAP and CoAPS drivers against the real gateway, beyond the all-protocol smoke run
(test_device_sim.py): devices handshake again when the gateway ends idle DTLS sessions and nothing
is lost; a CoAPS device with a wrong PSK fails its handshake and is counted as such; and the
bad-input modes over CoAP and CoAPS get exactly the refusals they intend, with the gateway's own
counters (read here independently) in agreement."""

from __future__ import annotations

import json
import subprocess

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


# device-sim's bad-input modes over CoAP and CoAPS: (answer, counter, labels) per mode.
COAP_BAD = {
    ("coap", "wrong-credentials"): ("coap 4.01", "citygw_auth_failures_total",
                                    {"protocol": "coap", "reason": "bad_credentials"}),
    ("coap", "unknown-device"): ("coap 4.01", "citygw_auth_failures_total",
                                 {"protocol": "coap", "reason": "unknown_device"}),
    ("coap", "malformed"): ("coap 4.00", "citygw_messages_rejected_total",
                            {"protocol": "coap", "reason": "malformed_json"}),
    ("coap", "oversize"): ("coap 4.13", "citygw_messages_rejected_total",
                           {"protocol": "coap", "reason": "payload_too_large"}),
    # A wrong key: the gateway cannot read the client's Finished and ends the handshake at its
    # timeout (2 s in this module).
    ("coaps", "wrong-credentials"): ("dtls handshake timeout",
                                     "citygw_coaps_handshake_failures_total",
                                     {"reason": "timeout"}),
    ("coaps", "unknown-device"): ("dtls handshake failed", "citygw_auth_failures_total",
                                  {"protocol": "coaps", "reason": "unknown_device"}),
    ("coaps", "spoofed-topic"): ("coap 4.03", "citygw_messages_rejected_total",
                                 {"protocol": "coap", "reason": "spoofed_path"}),
    ("coaps", "malformed"): ("coap 4.00", "citygw_messages_rejected_total",
                             {"protocol": "coap", "reason": "malformed_json"}),
    ("coaps", "oversize"): ("coap 4.13", "citygw_messages_rejected_total",
                            {"protocol": "coap", "reason": "payload_too_large"}),
}
REFUSAL_COUNTERS = ("citygw_auth_failures_total", "citygw_messages_rejected_total")


def bad(gw: Gateway, provisioned, protocol: str, mode: str, count: int,
        out) -> tuple[subprocess.CompletedProcess, dict | None]:
    p = device_sim("bad", mode, "--protocol", protocol, "--credentials", str(provisioned.creds),
                   "--coap", gw.coap_listen, "--coaps", f"{gw.host}:{gw.coaps_port}",
                   "--metrics", f"{gw.http_base}/metrics", "--count", str(count),
                   "--timeout", "6", "--json", str(out))
    return p, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("protocol,mode", sorted(COAP_BAD))
def test_coap_bad_input_mode_gets_exactly_its_refusals(gw, provisioned, tmp_path, protocol, mode):
    answer, metric, labels = COAP_BAD[(protocol, mode)]
    count = 6
    before = gw.metrics()
    p, rep = bad(gw, provisioned, protocol, mode, count, tmp_path / "bad.json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert rep["answers"] == {answer: count}, rep
    assert rep["counter_delta"] == count and rep["control_acknowledged"], rep
    # Read independently of device-sim: exactly these refusals were counted, no other kind moved.
    after = gw.metrics()
    assert after.value(metric, **labels) - before.value(metric, **labels) == count
    for other in REFUSAL_COUNTERS:
        moved = after.value(other) - before.value(other)
        assert moved == (count if other == metric else 0), (other, moved)


@pytest.mark.parametrize("protocol", ["coap", "coaps"])
def test_coap_storm_is_served(gw, provisioned, tmp_path, protocol):
    count = 15
    stored_before = gw.metric("citygw_readings_stored_total")
    before = gw.metrics()
    p, rep = bad(gw, provisioned, protocol, "storm", count, tmp_path / "storm.json")
    assert p.returncode == 0, p.stdout + p.stderr
    assert rep["answers"] == {"coap 2.04": count}, rep
    after = gw.metrics()
    for other in REFUSAL_COUNTERS:
        assert after.value(other) == before.value(other), other
    # Every request of the storm and the control reading after it were stored.
    gw.wait_metric("citygw_readings_stored_total", stored_before + count + 1)


def test_spoofing_over_plain_coap_is_explained(gw, provisioned, tmp_path):
    p, rep = bad(gw, provisioned, "coap", "spoofed-topic", 3, tmp_path / "x.json")
    assert p.returncode != 0 and rep is None
    assert "spoofed-topic needs --protocol coaps" in p.stderr, p.stderr

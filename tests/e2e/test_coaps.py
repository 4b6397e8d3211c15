"""CoAPS: DTLS 1.2 with a pre-shared key per device (identity = device id), against libcoap's
OpenSSL client (`coap-client-openssl -u {device} -k {psk}`) and OpenSSL's own `s_client` for the
cipher suites.

The identity comes from the DTLS session: the request carries no token, and a device may only
post for itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from support import Gateway, by_quantity, now_ms, senml_cbor
from support.coap import CF_SENML_CBOR, CF_SENML_JSON, coap_client, telemetry_uri


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    # A wrong key shows only as a handshake that never completes (DTLS silently drops records
    # that fail to decrypt), so it is counted when the handshake times out: keep that short.
    return module_gateways(env={"CITYGW_COAP__DTLS_HANDSHAKE_TIMEOUT_SECS": "2"})


@pytest.fixture
def device(gw: Gateway):
    return gw.add_device(kind="water_level", psk=True)


def coaps_uri(gw: Gateway, device_id: str) -> str:
    return telemetry_uri(gw, device_id, scheme="coaps", port=gw.coaps_port)


def senml(ts_ms: int, level: float) -> bytes:
    return senml_cbor([{"bt": ts_ms / 1000, "n": "water_level", "u": "m", "v": level}])


def test_libcoap_openssl_posts_over_dtls_psk(gw: Gateway, device):
    ts = now_ms() - 4000
    p = coap_client(coaps_uri(gw, device.id), senml(ts, 1.25), CF_SENML_CBOR,
                    psk=(device.id, device.psk))
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    (r,) = gw.readings(device.id)
    assert (r["quantity"], r["value"], r["unit"], r["device_time_ms"]) == ("water_level", 1.25, "m", ts)
    assert r["protocol"] == "coap"
    assert gw.metric("citygw_coaps_handshakes_total", result="ok") >= 1


def test_chosen_psk_and_block1_over_dtls(gw: Gateway):
    d = gw.add_device(kind="water_level", psk="chosen-psk-0123456789")
    ts = now_ms() - 100_000
    records = [{"bt": ts / 1000, "n": "level_0", "u": "m", "v": 0.0}]
    records += [{"n": f"level_{i}", "u": "m", "t": i, "v": i / 8} for i in range(1, 120)]
    body = json.dumps(records).encode()
    assert len(body) > 5000
    p = coap_client(coaps_uri(gw, d.id), body, CF_SENML_JSON, block=512, psk=(d.id, d.psk))
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    rs = gw.readings(d.id)
    assert len(rs) == 120 and by_quantity(rs)["level_119"][0]["value"] == 119 / 8


def test_wrong_key_fails_the_handshake_and_nothing_is_stored(gw: Gateway, device):
    before = gw.metric("citygw_coaps_handshakes_total", result="failed")
    p = coap_client(coaps_uri(gw, device.id), senml(now_ms(), 9.0), CF_SENML_CBOR,
                    psk=(device.id, "not-the-right-key-000"), timeout=20)
    # the client exits 0 even so: the output tells
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert "2.04" not in out
    assert any(w in out.lower() for w in ("alert", "fail", "err", "cannot send")), out
    gw.wait_metric("citygw_coaps_handshakes_total", before + 1, result="failed")
    assert gw.readings(device.id) == []


def test_unknown_identity_and_device_without_psk_are_refused(gw: Gateway):
    plain = gw.add_device(kind="water_level")  # no PSK
    before = gw.metric("citygw_coaps_handshakes_total", result="failed")
    for ident in ("no-such-device", plain.id):
        p = coap_client(coaps_uri(gw, ident), senml(now_ms(), 1.0), CF_SENML_CBOR,
                        psk=(ident, "whatever-key-0123456"), timeout=20)
        assert b"2.04" not in p.stdout + p.stderr
    gw.wait_metric("citygw_coaps_handshakes_total", before + 2, result="failed")
    assert gw.metric("citygw_auth_failures_total", protocol="coaps", reason="unknown_device") >= 1
    assert gw.metric("citygw_auth_failures_total", protocol="coaps", reason="no_psk") >= 1
    assert gw.readings(plain.id) == []


def test_posting_for_another_device_is_forbidden(gw: Gateway, device):
    victim = gw.add_device(kind="water_level", psk=True)
    p = coap_client(coaps_uri(gw, victim.id), senml(now_ms(), 3.0), CF_SENML_CBOR,
                    psk=(device.id, device.psk))
    assert b"4.03" in p.stderr, p.stderr
    assert gw.readings(victim.id) == [] and gw.readings(device.id) == []
    (dl,) = gw.deadletters(device.id)
    assert dl["reason"] == "spoofed_path" and victim.id in dl["detail"], dl
    assert not dl.get("payload_head_base64"), "nothing of a spoofed message is kept"


def test_disabled_device_cannot_handshake(gw: Gateway, device):
    gw.cli("device", "disable", device.id)
    p = coap_client(coaps_uri(gw, device.id), senml(now_ms(), 3.0), CF_SENML_CBOR,
                    psk=(device.id, device.psk), timeout=20)
    assert b"2.04" not in p.stdout + p.stderr
    assert gw.readings(device.id) == []


@pytest.mark.parametrize("suite", ["PSK-AES128-CCM8", "PSK-AES128-GCM-SHA256"])
def test_openssl_s_client_negotiates_the_coap_suites(gw: Gateway, device, suite):
    """CoAP's mandatory TLS_PSK_WITH_AES_128_CCM_8 and the GCM suite, each offered alone."""
    exe = shutil.which("openssl")
    if exe is None:
        pytest.skip("openssl command not installed")
    p = subprocess.run(
        [exe, "s_client", "-dtls1_2", "-connect", f"{gw.host}:{gw.coaps_port}",
         "-psk_identity", device.id, "-psk", device.psk.encode().hex(),
         "-cipher", suite + ":@SECLEVEL=0"],
        input=b"", capture_output=True, timeout=20)
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert f"Cipher is {suite}" in out, out



def test_psk_from_a_csv_import(gw: Gateway, tmp_path):
    dev_id = "nb-csv-" + str(now_ms())
    f = tmp_path / "devices.csv"
    f.write_text(f"id,tenant,kind,psk\n{dev_id},hanoi,flood,imported-psk-0123456789\n")
    (res,) = gw.cli("device", "import", str(f))
    assert res["ok"], res
    assert gw.cli("device", "show", dev_id)["has_psk"] is True
    ts = now_ms() - 700
    p = coap_client(coaps_uri(gw, dev_id), senml(ts, 0.75), CF_SENML_CBOR,
                    psk=(dev_id, "imported-psk-0123456789"))
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    assert [r["value"] for r in gw.readings(dev_id)] == [0.75]


def test_lwm2m_over_coaps_registers_and_sends(gw: Gateway, device):
    base = f"coaps://{gw.host}:{gw.coaps_port}"
    psk = (device.id, device.psk)
    p = coap_client(f"{base}/rd?ep={device.id}&lt=60&lwm2m=1.1&b=U", b"</1/0>,</3303/0>", 40,
                    psk=psk)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    (reg,) = gw.cli("lwm2m", "list", "--device", device.id)
    assert reg["secure"] is True and "/3303/0" in reg["objects"], reg
    assert gw.cli("device", "show", device.id)["online"] is True
    pack = senml_cbor([{"bn": "/3303/0/", "n": "5700", "v": 27.5}])
    p = coap_client(f"{base}/dp", pack, CF_SENML_CBOR, psk=psk)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    (r,) = gw.readings(device.id)
    assert (r["quantity"], r["value"], r["protocol"]) == ("temperature", 27.5, "lwm2m")
    # the DTLS identity may register only its own endpoint
    other = gw.add_device(kind="weather")
    p = coap_client(f"{base}/rd?ep={other.id}&lt=60", b"</1/0>", 40, psk=psk)
    assert b"4.03" in p.stderr, p.stderr
    # de-registration over the same identity
    p = subprocess.run(["coap-client-openssl", "-m", "delete", "-B", "10", "-u", psk[0], "-k", psk[1],
                        f"{base}/{reg['id'].lstrip('/')}"], capture_output=True, timeout=20)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    assert gw.cli("device", "show", device.id)["online"] is False

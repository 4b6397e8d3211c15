"""CoAPS with certificates (RFC 7252 section 9.1.3.3, X.509 mode) beside pre-shared keys on the
same port: libcoap's `coap-client-openssl` with a device certificate from the city CA posts as
the device its certificate names; a certificate from another CA, or one naming another device,
gets nothing stored. The cookie exchange runs for both modes.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from support import Gateway, now_ms, senml_cbor
from support.coap import CF_SENML_CBOR, coap_client, telemetry_uri
from support.pki import Ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Ca:
    return Ca(tmp_path_factory.mktemp("coaps-pki"))


@pytest.fixture(scope="module")
def gw(module_gateways, pki) -> Gateway:
    server = pki.server(stem="coaps-server")
    return module_gateways(env={
        "CITYGW_COAP__DTLS_CERT_FILE": str(server.cert_path),
        "CITYGW_COAP__DTLS_KEY_FILE": str(server.key_path),
        "CITYGW_COAP__DTLS_CLIENT_CA_FILE": str(pki.cert_path),
        "CITYGW_COAP__DTLS_HANDSHAKE_TIMEOUT_SECS": "3",
    })


def post_with_cert(gw: Gateway, device_id: str, cert, ca: Ca, value: float):
    exe = shutil.which("coap-client-openssl")
    body = senml_cbor([{"bt": now_ms() / 1000, "n": "water_level", "u": "m", "v": value}])
    argv = [exe, "-m", "post", "-B", "8", "-f", "-", "-t", str(CF_SENML_CBOR),
            "-c", str(cert.cert_path), "-j", str(cert.key_path), "-R", str(ca.cert_path),
            telemetry_uri(gw, device_id, scheme="coaps", port=gw.coaps_port)]
    return subprocess.run(argv, input=body, capture_output=True, timeout=20)


def test_a_device_certificate_posts_as_its_device(gw: Gateway, pki):
    d = gw.add_device(kind="water_level")
    p = post_with_cert(gw, d.id, pki.device(d.id), pki, 1.75)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    (r,) = gw.readings(d.id)
    assert (r["value"], r["protocol"]) == (1.75, "coap")
    assert gw.metric("citygw_coaps_hello_verify_requests_total") >= 1


def test_psk_devices_still_work_on_the_same_port(gw: Gateway):
    d = gw.add_device(kind="water_level", psk=True)
    p = coap_client(telemetry_uri(gw, d.id, scheme="coaps", port=gw.coaps_port),
                    senml_cbor([{"n": "water_level", "u": "m", "v": 0.5}]), CF_SENML_CBOR,
                    psk=(d.id, d.psk))
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    assert [r["value"] for r in gw.readings(d.id)] == [0.5]


def test_a_certificate_of_another_ca_stores_nothing(gw: Gateway, tmp_path):
    d = gw.add_device(kind="water_level")
    stranger = Ca(tmp_path / "stranger")
    before = gw.metric("citygw_coaps_handshakes_total", result="failed")
    p = post_with_cert(gw, d.id, stranger.device(d.id), stranger, 9.0)
    assert b"2.04" not in p.stdout + p.stderr
    gw.wait_metric("citygw_coaps_handshakes_total", before + 1, result="failed")
    assert gw.readings(d.id) == []


def test_a_certificate_cannot_post_for_another_device(gw: Gateway, pki):
    a, b = gw.add_device(kind="water_level"), gw.add_device(kind="water_level")
    p = post_with_cert(gw, b.id, pki.device(a.id, stem=f"x509-{a.id}"), pki, 3.0)
    assert b"4.03" in p.stderr, p.stderr
    assert gw.readings(b.id) == [] and gw.readings(a.id) == []

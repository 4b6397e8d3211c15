"""TLS on every TCP listener (issue 17): MQTT over TLS with the device secret, MQTT with client
certificates (the certificate names the device; other CA, expired, wrong name, revoked,
disabled, pinned), gRPC over TLS for agencies with and without client certificates, HTTPS, the
CLI over TLS, TLS 1.2+ only, and certificates and CRLs reloaded without dropping live
connections.

Real clients: mosquitto_pub, paho-mqtt, grpcio (`ssl_channel_credentials`), requests, OpenSSL's
`s_client`, the `citygw` CLI. Certificates come from support/pki.py (the `cryptography` package).
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import grpc
import paho.mqtt.client as mqtt
import pytest
import requests
from cryptography import x509

from support import Gateway, now_ms, wait_until
from support import mqtt_raw as raw
from support.pki import Ca

V5_BAD_CREDENTIALS, V5_NOT_AUTHORIZED = 0x86, 0x87


def tls_config(pki: Ca, server, watch_secs: int = 1, grpc_client_required: bool = False) -> str:
    return f"""
[tls]
watch_secs = {watch_secs}

[mqtt]
tls_cert_file = "{server.cert_path}"
tls_key_file = "{server.key_path}"
client_ca_file = "{pki.cert_path}"
client_crl_file = "{pki.crl_path}"

[grpc]
tls_cert_file = "{server.cert_path}"
tls_key_file = "{server.key_path}"
client_ca_file = "{pki.cert_path}"
client_cert_required = {str(grpc_client_required).lower()}

[http]
tls_cert_file = "{server.cert_path}"
tls_key_file = "{server.key_path}"
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Ca:
    ca = Ca(tmp_path_factory.mktemp("pki"))
    ca.revoke()  # an empty CRL to start with
    return ca


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Ca:
    return Ca(tmp_path_factory.mktemp("other-pki"), name="somebody else's CA")


@pytest.fixture(scope="module")
def gw(module_gateways, pki) -> Gateway:
    server = pki.server()
    return module_gateways(config_toml=tls_config(pki, server), tls_ca=pki.cert_path,
                           http_tls=True, grpc_tls=True)


def mosquitto(gw: Gateway, port: int, ca: Path, topic: str, message: str, client_id: str,
              user: str | None = None, password: str | None = None,
              cert=None) -> subprocess.CompletedProcess:
    argv = [shutil.which("mosquitto_pub"), "-h", gw.host, "-p", str(port), "-V", "mqttv311",
            "-q", "1", "--cafile", str(ca), "-i", client_id, "-t", topic, "-m", message]
    if user is not None:
        argv += ["-u", user, "-P", password]
    if cert is not None:
        argv += ["--cert", str(cert.cert_path), "--key", str(cert.key_path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def paho_tls(gw: Gateway, port: int, ca: Path, client_id: str, cert=None, username=None,
             password=None):
    """A paho MQTT 5 client over TLS; returns (client, CONNACK reason code or None)."""
    result: dict = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(ca), certfile=cert and str(cert.cert_path),
              keyfile=cert and str(cert.key_path))
    if username is not None:
        c.username_pw_set(username, password)
    c.on_connect = lambda cl, u, f, reason, p: result.setdefault("code", reason.value)
    c.on_disconnect = lambda cl, u, f, reason, p: result.setdefault("closed", True)
    try:
        c.connect(gw.host, port, keepalive=30)
    except (ssl.SSLError, OSError) as e:
        return c, f"handshake failed: {e}"
    c.loop_start()
    wait_until(lambda: "code" in result or "closed" in result, timeout=15, desc="CONNACK")
    return c, result.get("code")


def peer_serial(host: str, port: int, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname=host) as t:
            return x509.load_der_x509_certificate(t.getpeercert(binary_form=True)).serial_number


def refused_certs(gw: Gateway, reason: str) -> float:
    return gw.metric("citygw_tls_client_certs_refused_total", listener="mqtt_mtls", reason=reason)


# -- MQTT over TLS with the device secret


def test_mosquitto_pub_over_tls_with_the_device_secret(gw: Gateway, pki):
    d = gw.add_device()
    p = mosquitto(gw, gw.mqtt_tls_port, pki.cert_path, d.topic, '{"temp": 21.5}', d.id, d.id,
                  d.secret)
    assert p.returncode == 0, p.stderr
    assert [r["value"] for r in gw.readings(d.id)] == [21.5]


def test_paho_over_tls_mqtt5(gw: Gateway, pki):
    d = gw.add_device()
    c, code = paho_tls(gw, gw.mqtt_tls_port, pki.cert_path, d.id, username=d.id,
                       password=d.secret)
    try:
        assert code == 0
        info = c.publish(d.topic, '{"hum": 61}', qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        c.loop_stop()
        c.disconnect()
    assert [r["value"] for r in gw.readings(d.id)] == [61.0]


def test_a_server_certificate_from_another_ca_is_not_trusted(gw: Gateway, other_ca):
    d = gw.add_device()
    p = mosquitto(gw, gw.mqtt_tls_port, other_ca.cert_path, d.topic, "{}", d.id, d.id, d.secret)
    assert p.returncode != 0
    assert gw.readings(d.id) == []


def test_plaintext_mqtt_on_the_tls_port_is_refused(gw: Gateway):
    d = gw.add_device()
    s = raw.open_socket(gw.host, gw.mqtt_tls_port)
    try:
        s.sendall(raw.connect(d.id, d.id, d.secret))
        try:
            answer = raw.read_packet(s, timeout=10)
        except (ConnectionError, socket.timeout):
            answer = None
        assert answer is None or answer.type != 2, "a CONNACK over plaintext on the TLS port"
    finally:
        s.close()


# -- MQTT with client certificates


def test_a_device_certificate_is_the_identity(gw: Gateway, pki):
    d = gw.add_device()
    cert = pki.device(d.id)
    p = mosquitto(gw, gw.mqtt_mtls_port, pki.cert_path, d.topic, '{"noise": 55}', d.id,
                  cert=cert)
    assert p.returncode == 0, p.stderr
    (r,) = gw.readings(d.id)
    assert (r["device_id"], r["value"]) == (d.id, 55.0)


@pytest.mark.parametrize("case", ["other_ca", "expired", "revoked"])
def test_certificates_refused_at_the_handshake(gw: Gateway, pki, other_ca, case):
    d = gw.add_device()
    reason = {"other_ca": "unknown_issuer", "expired": "expired", "revoked": "revoked"}[case]
    before = refused_certs(gw, reason)
    if case == "other_ca":
        cert = other_ca.device(d.id)
    elif case == "expired":
        cert = pki.device(d.id, expired=True)
    else:
        cert = pki.device(d.id, stem=f"revoked-{d.id}")
        pki.revoke(cert)
        # The CRL is reloaded when it changes (tls.watch_secs = 1 here).
        gw.wait_metric("citygw_tls_reloads_total", 1, listener="mqtt_mtls", result="ok",
                       timeout=15)
        wait_until(lambda: mosquitto(gw, gw.mqtt_mtls_port, pki.cert_path, d.topic, "{}", d.id,
                                     cert=cert).returncode != 0, timeout=15,
                   desc="the revoked certificate refused")
    p = mosquitto(gw, gw.mqtt_mtls_port, pki.cert_path, d.topic, '{"x": 1}', d.id, cert=cert)
    assert p.returncode != 0, p.stdout
    gw.wait_metric("citygw_tls_client_certs_refused_total", before + 1, listener="mqtt_mtls",
                   reason=reason)
    assert gw.readings(d.id) == []


def test_a_certificate_naming_another_device_is_bad_credentials(gw: Gateway, pki):
    d, other = gw.add_device(), gw.add_device()
    c, code = paho_tls(gw, gw.mqtt_mtls_port, pki.cert_path, d.id, cert=pki.device(other.id))
    c.loop_stop()
    assert code == V5_BAD_CREDENTIALS


def test_a_disabled_device_is_refused_with_a_valid_certificate(gw: Gateway, pki):
    d = gw.add_device()
    cert = pki.device(d.id)
    gw.cli("device", "disable", d.id)
    c, code = paho_tls(gw, gw.mqtt_mtls_port, pki.cert_path, d.id, cert=cert)
    c.loop_stop()
    assert code == V5_NOT_AUTHORIZED


def test_a_pinned_device_accepts_only_its_certificate(gw: Gateway, pki):
    d = gw.add_device()
    mine, spare = pki.device(d.id), pki.device(d.id, stem=f"spare-{d.id}")
    shown = gw.cli("device", "pin", d.id, "--cert-file", str(mine.cert_path))
    assert shown["cert_sha256"] == mine.sha256
    before = refused_certs(gw, "pin_mismatch")
    p = mosquitto(gw, gw.mqtt_mtls_port, pki.cert_path, d.topic, '{"a": 1}', d.id, cert=spare)
    assert p.returncode != 0
    gw.wait_metric("citygw_tls_client_certs_refused_total", before + 1, listener="mqtt_mtls",
                   reason="pin_mismatch")
    p = mosquitto(gw, gw.mqtt_mtls_port, pki.cert_path, d.topic, '{"a": 2}', d.id, cert=mine)
    assert p.returncode == 0, p.stderr
    assert [r["value"] for r in gw.readings(d.id)] == [2.0]
    # renewal: pin the new certificate
    gw.cli("device", "pin", d.id, "--cert-sha256", spare.sha256)
    p = mosquitto(gw, gw.mqtt_mtls_port, pki.cert_path, d.topic, '{"a": 3}', d.id, cert=spare)
    assert p.returncode == 0, p.stderr


def test_a_certificate_identity_from_a_subject_alt_name(gateway_factory, pki):
    server = pki.server(stem="server-san")
    gw = gateway_factory(config_toml=tls_config(pki, server).replace(
        "[tls]", '[tls]\ndevice_identity = "san_uri"'), tls_ca=pki.cert_path, http_tls=True,
        grpc_tls=True)
    d = gw.add_device(f"urn:dev:{now_ms()}")
    cert = pki.device("a label, not the id", stem="san-dev", uris=[d.id])
    p = mosquitto(gw, gw.mqtt_mtls_port, pki.cert_path, d.topic, '{"pm25": 7}', d.id, cert=cert)
    assert p.returncode == 0, p.stderr
    assert [r["value"] for r in gw.readings(d.id)] == [7.0]


# -- TLS versions


@pytest.mark.parametrize("listener", ["mqtt_tls", "grpc", "http"])
def test_only_tls_1_2_and_1_3(gw: Gateway, pki, listener):
    port = {"mqtt_tls": gw.mqtt_tls_port, "grpc": gw.grpc_port, "http": gw.http_port}[listener]

    def s_client(version: str) -> subprocess.CompletedProcess:
        # The client side allows the old versions (SECLEVEL 0): any refusal is the server's.
        return subprocess.run(["openssl", "s_client", "-connect", f"{gw.host}:{port}",
                               f"-{version}", "-CAfile", str(pki.cert_path),
                               "-cipher", "DEFAULT@SECLEVEL=0", "-brief"],
                              input="", capture_output=True, text=True, timeout=20)

    for old in ("tls1", "tls1_1"):
        p = s_client(old)
        assert "Protocol version:" not in p.stderr and p.returncode != 0, (old, p.stderr)
    for new, name in (("tls1_2", "TLSv1.2"), ("tls1_3", "TLSv1.3")):
        p = s_client(new)
        assert f"Protocol version: {name}" in p.stderr, (new, p.stderr)
        assert "Verification: OK" in p.stderr, p.stderr


# -- gRPC and HTTP


def grpc_channel(gw: Gateway, ca: Path, cert=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=cert and cert.key_path.read_bytes(),
        certificate_chain=cert and cert.cert_path.read_bytes())
    return grpc.secure_channel(f"{gw.host}:{gw.grpc_port}", creds)


def list_devices(citygw_api, channel, token: str):
    stub = citygw_api.telemetry_pb2_grpc.TelemetryStub(channel)
    return stub.ListDevices(citygw_api.telemetry_pb2.AgencyListDevicesRequest(),
                            metadata=[("authorization", f"Bearer {token}")], timeout=10)


def test_grpcio_agency_over_tls_with_and_without_a_client_certificate(gw: Gateway, pki,
                                                                      other_ca, citygw_api):
    d = gw.add_device()
    agency = gw.add_agency()
    for cert in (None, pki.client(agency.name)):
        with grpc_channel(gw, pki.cert_path, cert) as ch:
            ids = [x.id for x in list_devices(citygw_api, ch, agency.token).devices]
            assert d.id in ids
    with grpc_channel(gw, pki.cert_path, other_ca.client(agency.name)) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list_devices(citygw_api, ch, agency.token)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"{gw.host}:{gw.grpc_port}") as ch:
        with pytest.raises(grpc.RpcError):
            list_devices(citygw_api, ch, agency.token)


def test_grpc_client_certificates_can_be_required(gateway_factory, pki, citygw_api):
    server = pki.server(stem="server-req")
    admin_cert = pki.client("operator")
    gw = gateway_factory(config_toml=tls_config(pki, server, grpc_client_required=True),
                         tls_ca=pki.cert_path, http_tls=True, grpc_tls=True,
                         client_cert=(admin_cert.cert_path, admin_cert.key_path))
    agency = gw.add_agency()  # the CLI with --client-cert
    with grpc_channel(gw, pki.cert_path) as ch:
        with pytest.raises(grpc.RpcError) as e:
            list_devices(citygw_api, ch, agency.token)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc_channel(gw, pki.cert_path, pki.client(agency.name)) as ch:
        list_devices(citygw_api, ch, agency.token)


def test_https_metrics_and_health(gw: Gateway, pki):
    assert gw.http_get("/healthz").status_code == 200
    assert "citygw_tls_handshakes_total" in gw.http_get("/metrics").text
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(gw.http_base + "/healthz", timeout=10)  # system roots do not know our CA
    assert gw.metric("citygw_tls_certificate_expiry_timestamp_seconds", listener="http") > time.time()


def test_the_console_cookie_is_secure_over_https(gw: Gateway):
    r = requests.post(gw.http_base + "/console/api/session", json={"token": gw.token},
                      timeout=10, verify=gw.verify)
    assert r.status_code == 200, r.text
    parts = [p.strip() for p in r.headers["set-cookie"].split(";")]
    assert "Secure" in parts and "HttpOnly" in parts, parts


# -- reload without restart


def test_sighup_swaps_certificates_without_dropping_live_connections(gateway_factory, pki):
    server = pki.server(stem="server-reload")
    gw = gateway_factory(config_toml=tls_config(pki, server, watch_secs=0), tls_ca=pki.cert_path,
                         http_tls=True, grpc_tls=True)
    d = gw.add_device()
    live, code = paho_tls(gw, gw.mqtt_tls_port, pki.cert_path, d.id, username=d.id,
                          password=d.secret)
    assert code == 0
    ports = {"mqtt_tls": gw.mqtt_tls_port, "grpc": gw.grpc_port, "http": gw.http_port}
    old = {n: peer_serial(gw.host, p, pki.cert_path) for n, p in ports.items()}
    assert set(old.values()) == {server.serial}
    fresh = pki.server(stem="server-reload-next")
    # Replace the files in place, then signal (watch_secs = 0: no polling in this gateway).
    shutil.copyfile(fresh.cert_path, server.cert_path)
    shutil.copyfile(fresh.key_path, server.key_path)
    gw.proc.send_signal(signal.SIGHUP)
    for n, p in ports.items():
        wait_until(lambda: peer_serial(gw.host, p, pki.cert_path) == fresh.serial, timeout=10,
                   desc=f"{n} to present the new certificate")
    assert gw.running
    try:
        info = live.publish(d.topic, '{"temp": 30}', qos=1)
        info.wait_for_publish(10)
        assert info.is_published() and live.is_connected(), "the live connection was dropped"
    finally:
        live.loop_stop()
        live.disconnect()
    assert [r["value"] for r in gw.readings(d.id)] == [30.0]
    # A broken set of files is refused and the listeners keep what they had.
    server.key_path.write_text("not a key")
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_metric("citygw_tls_reloads_total", 1, listener="mqtt_tls", result="failed")
    assert peer_serial(gw.host, gw.mqtt_tls_port, pki.cert_path) == fresh.serial

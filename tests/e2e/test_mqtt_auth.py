"""MQTT authentication and topic authorisation, against paho-mqtt and mosquitto_pub.

CONNACK codes (contract): wrong or missing secret -> 3.1.1 0x04 / 5 0x86 (bad user name or
password); unknown device, disabled device, anonymous -> 3.1.1 0x05 / 5 0x87 (not authorized).
Spoofing (publishing on another device's topic) stores nothing, is counted, closes a 3.1.1
connection and gets PUBACK 0x87 on MQTT 5.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from support import (SENML_JSON, Gateway, connack_of, mosquitto_pub, now_ms, unique_id,
                     wait_until)
from support import mqtt_raw as raw

V311_BAD_CREDENTIALS, V311_NOT_AUTHORIZED = 0x04, 0x05
V5_BAD_CREDENTIALS, V5_NOT_AUTHORIZED = 0x86, 0x87
VERSIONS = pytest.mark.parametrize("version", [311, 5], ids=["mqttv311", "mqttv5"])


def refused(version: int, kind: str) -> int:
    if kind == "bad_credentials":
        return V311_BAD_CREDENTIALS if version == 311 else V5_BAD_CREDENTIALS
    return V311_NOT_AUTHORIZED if version == 311 else V5_NOT_AUTHORIZED


def auth_failures(gw: Gateway, reason: str) -> float:
    return gw.metric("citygw_auth_failures_total", protocol="mqtt", reason=reason)


@VERSIONS
def test_right_secret_is_accepted(gw: Gateway, version):
    d = gw.add_device()
    assert connack_of(gw, version, d.id, d.id, d.secret) == 0


@VERSIONS
def test_wrong_password(gw: Gateway, version):
    d = gw.add_device()
    before = auth_failures(gw, "bad_credentials")
    assert connack_of(gw, version, d.id, d.id, d.secret + "x") == refused(version, "bad_credentials")
    gw.wait_metric("citygw_auth_failures_total", before + 1, protocol="mqtt",
                   reason="bad_credentials")


@VERSIONS
def test_missing_password(gw: Gateway, version):
    d = gw.add_device()
    assert connack_of(gw, version, d.id, d.id, None) == refused(version, "bad_credentials")


@VERSIONS
def test_unknown_device(gw: Gateway, version):
    ghost = unique_id("ghost")
    before = auth_failures(gw, "unknown_device")
    assert connack_of(gw, version, ghost, ghost, "whatever-secret") == \
        refused(version, "not_authorized")
    gw.wait_metric("citygw_auth_failures_total", before + 1, protocol="mqtt",
                   reason="unknown_device")


@VERSIONS
def test_disabled_device(gw: Gateway, version):
    d = gw.add_device()
    gw.cli("device", "disable", d.id)
    before = auth_failures(gw, "disabled_device")
    assert connack_of(gw, version, d.id, d.id, d.secret) == refused(version, "not_authorized")
    gw.wait_metric("citygw_auth_failures_total", before + 1, protocol="mqtt",
                   reason="disabled_device")


@VERSIONS
def test_anonymous(gw: Gateway, version):
    d = gw.add_device()
    before = auth_failures(gw, "anonymous")
    # a real device's client id, but no user name and no password
    assert connack_of(gw, version, d.id, None, None) == refused(version, "not_authorized")
    gw.wait_metric("citygw_auth_failures_total", before + 1, protocol="mqtt", reason="anonymous")


def test_mosquitto_pub_reports_refusals(gw: Gateway):
    """What an operator sees from mosquitto_pub (MQTT 3.1.1) for each refusal."""
    d = gw.add_device()
    p = mosquitto_pub(gw, d, d.topic, message='{"temperature": 1}', password="not-the-secret")
    assert p.returncode != 0
    assert "bad user name or password" in p.stderr.lower(), p.stderr
    ghost = type(d)({"id": unique_id("ghost")}, "some-secret")
    p = mosquitto_pub(gw, ghost, ghost.topic, message='{"temperature": 1}')
    assert p.returncode != 0
    assert "not authorised" in p.stderr.lower(), p.stderr
    assert gw.readings(d.id) == []


# ---------------------------------------------------------------------------------------------
# spoofing: the identity is the authenticated session, never the topic


def spoofed(gw: Gateway) -> float:
    return gw.metric("citygw_messages_rejected_total", protocol="mqtt", reason="spoofed_topic")


def test_spoofing_v311_closes_connection_and_stores_nothing(gw: Gateway):
    a, b = gw.add_device(), gw.add_device()
    before = spoofed(gw)
    with gw.connected_client(a, version=311) as c:
        ack = c.publish(b.topic, json.dumps({"ts": now_ms(), "temperature": 99.0}))
        assert ack is None, "a 3.1.1 spoofing publish must not be acknowledged"
        assert c.wait_disconnected(10), "the server must close the spoofing 3.1.1 connection"
    gw.wait_metric("citygw_messages_rejected_total", before + 1, protocol="mqtt",
                   reason="spoofed_topic")
    assert gw.readings(a.id) == []
    assert gw.readings(b.id) == []
    # the victim itself is unaffected
    with gw.connected_client(b, version=311) as c:
        assert c.publish(b.topic, json.dumps({"temperature": 20.0})) == 0
    assert [r["value"] for r in gw.readings(b.id)] == [20.0]


def test_spoofing_v311_with_mosquitto_pub(gw: Gateway):
    a, b = gw.add_device(), gw.add_device()
    before = spoofed(gw)
    try:
        p = mosquitto_pub(gw, a, b.topic, message=json.dumps({"temperature": 99.0}), timeout=10)
        assert p.returncode != 0, "mosquitto_pub must not report success for a spoofed publish"
    except subprocess.TimeoutExpired:
        pass  # mosquitto_pub reconnecting after the server closed it: not a success either
    gw.wait_metric("citygw_messages_rejected_total", before + 1, protocol="mqtt",
                   reason="spoofed_topic")
    assert gw.readings(a.id) == [] and gw.readings(b.id) == []


def test_spoofing_v5_gets_puback_0x87_and_stores_nothing(gw: Gateway):
    a, b = gw.add_device(), gw.add_device()
    before = spoofed(gw)
    with gw.connected_client(a, version=5) as c:
        assert c.publish(b.topic, json.dumps({"temperature": 99.0})) == 0x87
        assert c.publish(b.topic + SENML_JSON,
                         json.dumps([{"n": "temperature", "v": 98.0}])) == 0x87
        gw.wait_metric("citygw_messages_rejected_total", before + 2, protocol="mqtt",
                       reason="spoofed_topic")
        assert gw.readings(a.id) == [] and gw.readings(b.id) == []
        # still connected, and its own topic works
        assert c.publish(a.topic, json.dumps({"temperature": 21.0})) == 0
        assert not c.disconnected.is_set()
    assert [(r["device_id"], r["value"]) for r in gw.readings(a.id)] == [(a.id, 21.0)]
    assert gw.readings(b.id) == []


# ---------------------------------------------------------------------------------------------
# beyond publishing: a device's credentials give it its own identity and nothing else


@VERSIONS
def test_device_cannot_subscribe_to_other_devices_telemetry(gw: Gateway, version):
    a, b = gw.add_device(), gw.add_device()
    got: list = []
    subacks: list = []
    c = gw.mqtt_client(a, version=version)
    c.client.on_message = lambda cl, u, m: got.append((m.topic, m.payload))
    c.client.on_subscribe = lambda cl, u, mid, rcs, p: subacks.append([r.value for r in rcs])
    try:
        assert c.connect() == 0
        c.client.subscribe([("devices/#", 1), (b.topic, 1)])
        (codes,) = wait_until(lambda: subacks, 10, desc="SUBACK")
        assert all(code >= 0x80 for code in codes), f"SUBACK {codes}: subscriptions granted"
        with gw.connected_client(b, version=311) as cb:
            assert cb.publish(b.topic, json.dumps({"temperature": 1.0})) == 0
        assert got == []
    finally:
        c.close()


def test_client_id_must_be_the_authenticated_device(gw: Gateway):
    """A's credentials with B's client id do not let anyone act as B."""
    a, b = gw.add_device(), gw.add_device()
    c = gw.mqtt_client(a, version=311, client_id=b.id)
    try:
        rc = c.connect()
        if rc == 0:   # accepted as A: then B's topic is still A spoofing B
            assert c.publish(b.topic, json.dumps({"temperature": 5.0})) is None
    finally:
        c.close()
    assert gw.readings(b.id) == [] and gw.readings(a.id) == []


@pytest.mark.parametrize("version", [4, 5])
def test_immediate_reconnects_take_over_the_old_session(gw: Gateway, version):
    """A device that reconnects at once, while its previous connection is still closing, takes
    the session over (3.1.1 section 3.1.4-2, 5 section 3.1.4-3) instead of getting CONNACK
    "server unavailable" (0x03 / 0x88), which ~20 % of these reconnects got before the
    vendored rmqtt's kick fix (vendor/README.md)."""
    d = gw.add_device()
    codes = []
    for i in range(40):
        s, code = raw.raw_connect(gw.host, gw.mqtt_port, d.id, d.id, d.secret, version=version)
        codes.append(code)
        if i % 2:  # half leave with DISCONNECT, half just drop the socket
            s.sendall(raw.disconnect(version))
        s.close()
    refused = [c for c in codes if c != 0]
    assert not refused, f"{len(refused)} of {len(codes)} reconnects refused: {sorted(set(refused))}"

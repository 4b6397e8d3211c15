"""MQTT as an attacker tries it (issue 17): wills on another device's topic, topic names that
break the protocol, topic aliases never offered, other devices' topics,
huge client ids and topics in the logs, password guessing. Each is a regression test of a defect
found on the gateway before the fix.

Raw packets (support/mqtt_raw.py) where no client library sends them, paho-mqtt where one does;
everything from loopback, the attackers from their own loopback addresses (127.0.0.2-5).
"""

from __future__ import annotations

import threading
import time

import pytest

from support import Gateway, wait_until
from support import mqtt_raw as raw

V311_ACCEPTED, V311_NOT_AUTHORIZED, V311_IDENTIFIER_REJECTED = 0x00, 0x05, 0x02
V5_NOT_AUTHORIZED = 0x87


def log_size(gw: Gateway) -> int:
    return gw.log_path.stat().st_size


def log_lines(gw: Gateway, since: int, needle: str) -> list[str]:
    with open(gw.log_path, "rb") as f:
        f.seek(since)
        return [line for line in f.read().decode("utf-8", "replace").splitlines()
                if needle in line]


def subscriber(gw: Gateway, device):
    """A paho client of `device` subscribed to everything below its own prefix; returns the
    client and the list its messages land in."""
    got: list = []
    c = gw.connected_client(device)
    c.client.on_message = lambda client, userdata, msg: got.append(msg)
    result, _ = c.client.subscribe(f"devices/{device.id}/#", qos=1)
    assert result == 0
    time.sleep(0.3)  # SUBACK round trip; the assertion below waits on a condition anyway
    return c, got


# -- defect 2: the will message bypassed identity


@pytest.mark.parametrize("version", [4, 5], ids=["mqttv311", "mqttv5"])
def test_a_will_on_another_devices_topic_is_refused(gw: Gateway, version):
    victim, attacker = gw.add_device(), gw.add_device()
    sub, got = subscriber(gw, victim)
    try:
        before = gw.metric("citygw_messages_rejected_total", protocol="mqtt",
                           reason="spoofed_topic")
        will = (victim.topic, b'{"temp": -40}', 1, version == 4)
        s, code = raw.raw_connect(gw.host, gw.mqtt_port, attacker.id, attacker.id,
                                  attacker.secret, version, will=will)
        # Dropped without DISCONNECT: a will that had been accepted would fire now.
        s.close()
        assert code == (V311_NOT_AUTHORIZED if version == 4 else V5_NOT_AUTHORIZED)
        gw.wait_metric("citygw_messages_rejected_total", before + 1, protocol="mqtt",
                       reason="spoofed_topic")
        dl = wait_until(lambda: gw.deadletters(attacker.id), desc="the will's dead letter")
        assert dl[-1]["reason"] == "spoofed_topic"
        assert not dl[-1].get("payload_head_base64"), "a spoofed will's payload is not kept"
        time.sleep(1.0)  # a delivered will would have arrived by now
        assert got == [], [m.topic for m in got]
        assert gw.readings(victim.id) == []
    finally:
        sub.close()


def test_a_will_on_the_devices_own_telemetry_is_stored_when_it_drops(gw: Gateway):
    d = gw.add_device()
    s, code = raw.raw_connect(gw.host, gw.mqtt_port, d.id, d.id, d.secret,
                              will=(d.topic, b'{"battery": 3}', 1, False))
    assert code == V311_ACCEPTED
    s.close()
    (r,) = wait_until(lambda: gw.readings(d.id), desc="the will stored as a reading")
    assert (r["quantity"], r["value"]) == ("battery", 3.0)


# -- defect 5: protocol rules


@pytest.mark.parametrize("topic_suffix", ["/#", "/+", "\x00x"], ids=["hash", "plus", "nul"])
@pytest.mark.parametrize("version", [4, 5], ids=["mqttv311", "mqttv5"])
def test_publish_topics_with_wildcards_or_nul_close_the_connection(gw: Gateway, version,
                                                                  topic_suffix):
    d = gw.add_device()
    s, code = raw.raw_connect(gw.host, gw.mqtt_port, d.id, d.id, d.secret, version)
    assert code == 0
    try:
        closed, seen = raw.closed_after(
            s, raw.publish(d.topic + topic_suffix, b'{"temp": 1}', version=version), timeout=5)
        assert closed, f"connection still open after an invalid topic; got {seen}"
        assert all(p.type != 4 or p.body[2:3] not in (b"", b"\x00") for p in seen), \
            "a success PUBACK for an invalid topic"
    finally:
        s.close()
    assert gw.readings(d.id) == []


def test_a_topic_alias_beyond_the_maximum_is_a_protocol_error(gw: Gateway):
    d = gw.add_device()
    s, code = raw.raw_connect(gw.host, gw.mqtt_port, d.id, d.id, d.secret, version=5)
    assert code == 0
    try:
        closed, seen = raw.closed_after(
            s, raw.publish(d.topic, b'{"temp": 1}', version=5, topic_alias=1), timeout=5)
        assert closed, f"connection still open after a topic alias the server never offered: {seen}"
    finally:
        s.close()
    assert gw.readings(d.id) == []


# -- defect 6: another device's non-telemetry topic is a spoof, not a bad topic


def test_another_devices_other_topic_is_spoofed_and_its_payload_dropped(gw: Gateway):
    a, b = gw.add_device(), gw.add_device()
    with gw.connected_client(a) as c:
        code = c.publish(f"devices/{b.id}/config", '{"secret": "value"}', qos=1)
    assert code == V5_NOT_AUTHORIZED
    dl = wait_until(lambda: gw.deadletters(a.id), desc="dead letter")
    assert dl[-1]["reason"] == "spoofed_topic"
    assert not dl[-1].get("payload_head_base64")


# -- defect 4: what an attacker chooses is logged and dead-lettered cut short


def test_huge_client_ids_and_topics_do_not_amplify_the_log(gw: Gateway):
    before = log_size(gw)
    s, code = raw.raw_connect(gw.host, gw.mqtt_port, "x" * 65535)
    s.close()
    assert code in (V311_IDENTIFIER_REJECTED, V311_NOT_AUTHORIZED, None)
    d = gw.add_device()
    s, code = raw.raw_connect(gw.host, gw.mqtt_port, d.id, d.id, d.secret)
    assert code == 0
    raw.closed_after(s, raw.publish("t/" + "y" * 65000, b'{"temp": 1}'), timeout=2)
    s.close()
    dl = wait_until(lambda: gw.deadletters(d.id), desc="dead letter of the long topic")
    assert len(dl[-1]["address"]) <= 300, len(dl[-1]["address"])
    grown = log_size(gw) - before
    assert grown < 8_000, f"the log grew by {grown} bytes for two 65 KB strings"


# -- defect 3: failed CONNECTs back off, the real device does not


def test_password_guessing_backs_off_without_locking_out_the_device(gw: Gateway):
    d = gw.add_device()
    attacker, device_host = "127.0.0.2", "127.0.0.3"
    before = gw.metric("citygw_auth_failures_total", protocol="mqtt", reason="throttled")
    codes = []
    for _ in range(12):
        s, code = raw.raw_connect(gw.host, gw.mqtt_port, d.id, d.id, "wrong-" + d.secret,
                                  source=attacker)
        s.close()
        codes.append(code)
    assert codes[:5] == [0x04] * 5, codes  # bad user name or password, checked
    assert set(codes[5:]) == {V311_NOT_AUTHORIZED}, codes  # throttled, not checked
    gw.wait_metric("citygw_auth_failures_total", before + 7, protocol="mqtt", reason="throttled")
    # Even the right secret is not checked from the guessing address while it backs off...
    s, code = raw.raw_connect(gw.host, gw.mqtt_port, d.id, d.id, d.secret, source=attacker)
    s.close()
    assert code == V311_NOT_AUTHORIZED
    # ...while the device itself, from its own address, gets in at once.
    s, code = raw.raw_connect(gw.host, gw.mqtt_port, d.id, d.id, d.secret, source=device_host)
    s.close()
    assert code == V311_ACCEPTED


def test_refused_connects_are_logged_at_a_bounded_rate(gw: Gateway):
    since = log_size(gw)

    def guess(source: str):
        for i in range(60):
            s, _ = raw.raw_connect(gw.host, gw.mqtt_port, f"nobody-{i}", f"nobody-{i}", "pw",
                                   source=source)
            s.close()

    threads = [threading.Thread(target=guess, args=(f"127.0.0.{n}",)) for n in (4, 5, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    refused = log_lines(gw, since, "mqtt connect refused")
    assert len(refused) <= 61, f"{len(refused)} log lines for 180 refused CONNECTs"
    assert gw.metric("citygw_auth_failures_total", protocol="mqtt", reason="unknown_device") >= 100


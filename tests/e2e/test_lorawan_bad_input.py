"""LoRaWAN bridge, bad input from the network server's broker: every refused event is
dead-lettered with a stable reason and counted, acknowledged (so the broker does not redeliver
it forever), and the bridge keeps serving the next uplink over the same connection."""

from __future__ import annotations

import base64
import json

import pytest

from support import now_ms, wait_until
from support.lorawan import (as_json, chirpstack_topic, chirpstack_uplink, lorawan_toml,
                             new_dev_eui, tts_topic, tts_uplink, wait_bridge_connected,
                             wait_readings)


@pytest.fixture
def bridge(brokers, gateway_factory):
    broker = brokers.mosquitto()
    toml = lorawan_toml(broker, tenant="hanoi") + lorawan_toml(broker, name="tts", server_type="ttn_v3")
    gw = gateway_factory(config_toml=toml)
    wait_bridge_connected(gw)
    wait_bridge_connected(gw, "tts")
    return gw, brokers.publisher(broker)


def dead_letter(gw, reason: str, device_id: str | None = None, timeout: float = 15.0) -> dict:
    def find():
        return next((d for d in gw.deadletters(device_id) if d["reason"] == reason), None)
    return wait_until(find, timeout, desc=f"a {reason} dead letter")


def still_serving(gw, ns, dev, eui: str, f_cnt: int) -> None:
    """A good uplink after the bad ones is stored, over the bridge's first connection."""
    up = chirpstack_uplink(eui, f_cnt=f_cnt, time_ms=now_ms(), data=b"\x01\x67\x00\xfa")
    ns.publish(chirpstack_topic(eui), up.SerializeToString())
    rs = wait_readings(gw, dev, 1)
    assert any(r["value"] == f_cnt for r in rs["frame_counter"])
    assert gw.metric("citygw_lorawan_connects_total", server="ns1") == 1, "no reconnect"


def test_unregistered_dev_eui_is_dead_lettered_and_counted(bridge):
    gw, ns = bridge
    unknown = new_dev_eui()
    before = gw.metric("citygw_lorawan_unknown_devices_total", server="ns1")
    up = chirpstack_uplink(unknown, f_cnt=1, time_ms=now_ms(), data=b"\x01\x67\x00\xfa")
    ns.publish(chirpstack_topic(unknown), up.SerializeToString())
    dl = dead_letter(gw, "unknown_device", unknown)
    assert dl["protocol"] == "lorawan"
    assert dl["address"] == f"ns1: {chirpstack_topic(unknown)}"
    assert unknown in dl["detail"]
    assert base64.b64decode(dl["payload_head_base64"]) == up.SerializeToString()
    gw.wait_metric("citygw_lorawan_unknown_devices_total", before + 1, server="ns1")
    assert gw.metric("citygw_messages_rejected_total", protocol="lorawan", reason="unknown_device") >= 1

    eui = new_dev_eui()
    dev = gw.add_device(kind="water_meter", dev_eui=eui, codec="lpp")
    still_serving(gw, ns, dev, eui, 2)


def test_malformed_events_are_dead_lettered_with_their_reason(bridge):
    gw, ns = bridge
    eui = new_dev_eui()
    dev = gw.add_device(kind="water_meter", dev_eui=eui, codec="lpp")
    topic = chirpstack_topic(eui)
    good = chirpstack_uplink(eui, f_cnt=10, time_ms=now_ms(), data=b"\x01\x67\x00\xfa")

    # bad base64 in the JSON marshaler's data field
    doc = json.loads(as_json(good))
    doc["data"] = "not*base64!"
    ns.publish(topic, json.dumps(doc))
    assert "data" in dead_letter(gw, "bad_base64", eui)["detail"]

    # truncated protobuf (cut inside the device_info message)
    raw = good.SerializeToString()
    ns.publish(topic, raw[:30])
    dead_letter(gw, "malformed_protobuf", eui)

    # wrong types in JSON
    doc = json.loads(as_json(good))
    doc["fCnt"] = {"value": 10}
    ns.publish(topic, json.dumps(doc))
    bad_type = dead_letter(gw, "malformed_event", eui)
    assert "expected a number" in bad_type["detail"], bad_type

    # not JSON at all, though it looks like it
    ns.publish(topic, b"{\"deviceInfo\": ")
    wait_until(lambda: len([d for d in gw.deadletters(eui) if d["reason"] == "malformed_event"]) >= 2,
               15, desc="two malformed_event dead letters")

    # a payload the device's codec cannot read: dead-lettered with the payload bytes
    bad_lpp = chirpstack_uplink(eui, f_cnt=11, time_ms=now_ms(), data=b"\x01\x67\x00")
    ns.publish(topic, bad_lpp.SerializeToString())
    dl = dead_letter(gw, "malformed_lpp", dev.id)
    assert base64.b64decode(dl["payload_head_base64"]) == b"\x01\x67\x00"

    # the event names another device than its topic (a misrouted or forged event)
    other = new_dev_eui()
    forged = chirpstack_uplink(other, f_cnt=12, time_ms=now_ms())
    ns.publish(topic, forged.SerializeToString())
    wait_until(lambda: any(other in d["detail"] for d in gw.deadletters(eui)), 15,
               desc="a dead letter naming the forged DevEUI")

    # TTS: a frm_payload that is not base64
    tts_eui = new_dev_eui()
    gw.add_device(kind="parking", dev_eui=tts_eui, codec="lpp")
    msg = tts_uplink("p-1", tts_eui, f_cnt=1, time_ms=now_ms())
    msg["uplink_message"]["frm_payload"] = "%%%"
    ns.publish(tts_topic("p-1"), json.dumps(msg))
    assert "frm_payload" in dead_letter(gw, "bad_base64", tts_eui)["detail"]

    # an event far larger than any network server sends
    ns.publish(topic, b"{" + b" " * (100 * 1024) + b"}")
    big = dead_letter(gw, "payload_too_large")
    assert big["payload_size"] == 100 * 1024 + 2

    for reason in ["bad_base64", "malformed_protobuf", "malformed_event", "malformed_lpp",
                   "payload_too_large"]:
        assert gw.metric("citygw_lorawan_dead_letters_total", reason=reason) >= 1, reason
    still_serving(gw, ns, dev, eui, 13)


def test_devices_of_another_tenant_or_disabled_are_refused(bridge):
    gw, ns = bridge
    eui = new_dev_eui()
    foreign = gw.add_device(tenant="hcmc", kind="flood", dev_eui=eui)
    up = chirpstack_uplink(eui, f_cnt=1, time_ms=now_ms(), obj={"water_level": 1.0})
    ns.publish(chirpstack_topic(eui), up.SerializeToString())
    assert "hcmc" in dead_letter(gw, "tenant_mismatch", foreign.id)["detail"]

    eui2 = new_dev_eui()
    dev = gw.add_device(kind="flood", dev_eui=eui2)
    gw.cli("device", "disable", dev.id)
    up = chirpstack_uplink(eui2, f_cnt=1, time_ms=now_ms(), obj={"water_level": 1.0})
    ns.publish(chirpstack_topic(eui2), up.SerializeToString())
    dead_letter(gw, "disabled_device", dev.id)
    assert gw.readings(foreign.id) == [] and gw.readings(dev.id) == []


def test_dev_eui_is_unique_and_checked_at_registration(bridge):
    gw, _ = bridge
    eui = new_dev_eui()
    gw.add_device(dev_eui=eui)
    for bad, why in [(eui.upper(), "already registered"), ("0102", "16 hex digits"),
                     ("zz" * 8, "16 hex digits")]:
        p = gw.cli_raw("device", "add", "x-" + bad[:4].lower(), "--tenant", "hanoi", "--kind",
                       "flood", "--dev-eui", bad)
        assert p.returncode != 0 and why in p.stderr, p.stderr
    p = gw.cli_raw("device", "add", "y-1", "--tenant", "hanoi", "--kind", "flood", "--codec", "xml")
    assert p.returncode != 0 and "codec" in p.stderr


def test_csv_import_carries_dev_eui_and_codec(bridge, tmp_path):
    gw, ns = bridge
    a, b = new_dev_eui(), new_dev_eui()
    csv = tmp_path / "devices.csv"
    csv.write_text("id,tenant,kind,dev_eui,codec\n"
                   f"lw-a-{a[:6]},hanoi,water_meter,{a.upper()},lpp\n"
                   f"lw-b-{b[:6]},hanoi,waste_bin,{b[:8]}-{b[8:]},\n")
    out = gw.cli("device", "import", str(csv))
    assert all(r["ok"] for r in out), out
    shown = gw.cli("device", "show", f"lw-a-{a[:6]}")
    assert (shown["dev_eui"], shown["codec"]) == (a, "lpp")
    assert gw.cli("device", "show", f"lw-b-{b[:6]}")["dev_eui"] == b
    up = chirpstack_uplink(a, f_cnt=1, time_ms=now_ms(), data=b"\x01\x67\x00\xfa")
    ns.publish(chirpstack_topic(a), up.SerializeToString())
    assert wait_readings(gw, f"lw-a-{a[:6]}", 8)["temperature"][0]["value"] == 25.0

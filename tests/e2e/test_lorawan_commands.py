"""Commands to LoRaWAN devices: downlinks through the network server's broker (a real Mosquitto
standing in for ChirpStack's and The Things Stack's), on the bridge's own connection.

A paho subscriber on the broker plays the network server: it sees the downlink the gateway
publishes (ChirpStack `command/down`, TTS `down/push`) and answers with the network server's
reports (`txack`/`ack` built with ChirpStack's own classes, TTS `down/*` after its documented
formats), which move the command QUEUED -> SENT -> DELIVERED -> SUCCEEDED | FAILED. One gateway
for the module, bridging the broker twice: `ns1` as ChirpStack v4 (downlink_f_port 10), `ns2` as
The Things Stack v3.
"""

from __future__ import annotations

import base64
import json
import time
from types import SimpleNamespace

import grpc
import pytest

from support import GatewayFactory, MqttClient, now_ms, unique_id, wait_until
from support.lorawan import (Brokers, as_json, chirpstack_topic, chirpstack_uplink, lorawan_toml,
                             new_dev_eui, tts_topic, tts_uplink, wait_bridge_connected)
from support.telemetry import rpc_error

CS_DOWN = "application/+/device/+/command/down"
TTS_DOWN = "v3/+/devices/+/down/push"
TTS_APP = "water-app@ttn"   # tts_topic's default application and tenant


@pytest.fixture(scope="module")
def lora(request):
    brokers = Brokers(request.module.__name__)
    factory = GatewayFactory(request.module.__name__)
    try:
        broker = brokers.mosquitto()
        config = (lorawan_toml(broker, name="ns1", downlink_f_port=10)
                  + lorawan_toml(broker, name="ns2", server_type="ttn_v3"))
        gw = factory(config_toml=config)
        wait_bridge_connected(gw, "ns1")
        wait_bridge_connected(gw, "ns2")
        ns = brokers.publisher(broker)
        yield SimpleNamespace(broker=broker, brokers=brokers, gw=gw, ns=ns,
                              network_server=lambda: subscriber(broker))
    finally:
        factory.close()
        brokers.close()


def subscriber(broker) -> MqttClient:
    """The network server's side: a paho client subscribed to both downlink topics."""
    sub = MqttClient("127.0.0.1", broker.port, client_id=unique_id("ns-sub"), version=311)
    assert sub.connect() == 0
    assert sub.subscribe(CS_DOWN) == [1]
    assert sub.subscribe(TTS_DOWN) == [1]
    return sub


@pytest.fixture
def gw(lora):
    return lora.gw


def chirpstack_device(lora, with_uplink: bool = True):
    """A registered street light with a DevEUI whose first uplink (application app-1) was
    stored, so its application is known."""
    eui = new_dev_eui()
    dev = lora.gw.add_device(kind="street_light", dev_eui=eui, codec="raw")
    if with_uplink:
        uplink(lora, eui)
    return dev, eui


def uplink(lora, eui: str, app: str = "app-1") -> None:
    before = stored(lora.gw, "ns1")
    up = chirpstack_uplink(eui, f_cnt=int(time.time() * 1000) % 1_000_000, time_ms=now_ms(),
                           data=b"\x01")
    up.device_info.application_id = app
    lora.ns.publish(chirpstack_topic(eui, app=app), up.SerializeToString())
    lora.gw.wait_metric("citygw_lorawan_messages_total", before + 1, server="ns1", event="up",
                        outcome="stored")


def stored(gw, server: str) -> float:
    return gw.metric("citygw_lorawan_messages_total", server=server, event="up", outcome="stored")


def reports(gw, server: str, outcome: str) -> float:
    """Downlink reports of a bridge with this outcome, whatever the report."""
    return gw.metric("citygw_lorawan_downlink_reports_total", server=server, outcome=outcome)


def downlink_for(sub: MqttClient, topic: str, command_id: str, timeout: float = 15.0):
    def mine(m) -> bool:
        if m.topic != topic:
            return False
        body = json.loads(m.payload)
        if "downlinks" in body:
            return f"citygw:cmd:{command_id}" in body["downlinks"][0]["correlation_ids"]
        return body.get("id") == command_id
    msg = sub.wait_message(mine, timeout)
    return msg, json.loads(msg.payload)


def cs_report(eui: str, event: str, command_id: str, acknowledged: bool = False,
              app: str = "app-1", claimed_eui: str | None = None):
    """A ChirpStack `txack` or `ack` event (ChirpStack's own classes)."""
    from chirpstack_api import integration

    e = integration.TxAckEvent() if event == "txack" else integration.AckEvent()
    e.time.FromMilliseconds(now_ms())
    e.device_info.application_id = app
    e.device_info.dev_eui = claimed_eui or eui
    e.queue_item_id = command_id
    e.f_cnt_down = 3
    if event == "txack":
        e.downlink_id = 1234
        e.gateway_id = "0016c001f1000000"
    else:
        e.deduplication_id = unique_id("dedup")
        e.acknowledged = acknowledged
    return chirpstack_topic(eui, event=event, app=app), e


def history(admin, c) -> list[tuple[str, str]]:
    return [(admin.state(e.state), e.by) for e in c.history]


def test_chirpstack_confirmed_downlink_acknowledged_or_not(lora, gw, control):
    admin = control(gw)
    sub = lora.network_server()
    dev, eui = chirpstack_device(lora)

    sent = admin.send(dev.id, "dim", raw=b"\x05\x50", confirmed=True, ttl_ms=600_000)
    assert sent.transport == "lorawan" and admin.state(sent.state) == "QUEUED", sent
    msg, body = downlink_for(sub, f"application/app-1/device/{eui}/command/down", sent.id)
    assert msg.qos == 1
    expires = body.pop("expiresAt")
    assert body == {"id": sent.id, "devEui": eui, "confirmed": True, "fPort": 10,
                    "data": base64.b64encode(b"\x05\x50").decode()}, body
    assert abs(_rfc3339_ms(expires) - sent.expires_time_ms) < 1000, expires
    admin.wait_state(sent.id, "SENT")

    topic, tx = cs_report(eui, "txack", sent.id)
    lora.ns.publish(topic, as_json(tx))
    admin.wait_state(sent.id, "DELIVERED")
    topic, ack = cs_report(eui, "ack", sent.id, acknowledged=True)
    lora.ns.publish(topic, ack.SerializeToString())     # the protobuf marshaler, too
    done = admin.wait_state(sent.id, "SUCCEEDED")
    assert history(admin, done) == [("QUEUED", "admin"), ("SENT", "gateway"),
                                    ("DELIVERED", "lorawan:ns1"), ("SUCCEEDED", "lorawan:ns1")]
    assert "FPort 10, confirmed" in done.history[1].detail, done.history[1]

    # params become ChirpStack's `object` (the device profile's codec encodes it); the device
    # does not acknowledge this one
    second = admin.send(dev.id, "light", {"on": True, "level": 40}, confirmed=True, f_port=7)
    _, body = downlink_for(sub, f"application/app-1/device/{eui}/command/down", second.id)
    assert body["object"] == {"on": True, "level": 40} and body["fPort"] == 7, body
    assert "data" not in body
    admin.wait_state(second.id, "SENT")
    for event in ("txack", "ack"):
        topic, r = cs_report(eui, event, second.id, acknowledged=False)
        lora.ns.publish(topic, as_json(r))
    failed = admin.wait_state(second.id, "FAILED")
    assert "did not acknowledge" in failed.error, failed
    assert gw.metric("citygw_lorawan_downlinks_total", server="ns1") >= 2
    for report in ("transmitted", "ack", "nack"):
        assert gw.metric("citygw_lorawan_downlink_reports_total", server="ns1", report=report,
                         outcome="matched") >= 1, report

    # a raw payload no LoRaWAN frame can carry is refused before it is queued
    e = rpc_error(lambda: admin.send(dev.id, "big", raw=bytes(243)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "242" in e.details(), e
    sub.close()


def _rfc3339_ms(s: str) -> int:
    import datetime as dt

    return int(dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)


def test_unknown_application_waits_queued_until_the_first_uplink(lora, gw, control):
    admin = control(gw)
    sub = lora.network_server()
    dev, eui = chirpstack_device(lora, with_uplink=False)
    cmd = admin.send(dev.id, "light", {"on": False})       # unconfirmed
    # Another device's uplink goes through the bridge: ours is still waiting for its own.
    other, other_eui = chirpstack_device(lora)
    assert admin.state(admin.get(cmd.id).state) == "QUEUED"
    assert not [m for m in sub.messages if f"/device/{eui}/" in m.topic]

    uplink(lora, eui, app="app-9")
    _, body = downlink_for(sub, f"application/app-9/device/{eui}/command/down", cmd.id)
    assert body["confirmed"] is False and body["fPort"] == 10 and body["object"] == {"on": False}
    admin.wait_state(cmd.id, "SENT")
    topic, tx = cs_report(eui, "txack", cmd.id, app="app-9")
    lora.ns.publish(topic, as_json(tx))
    # unconfirmed: one-way, final at DELIVERED
    done = admin.wait_state(cmd.id, "DELIVERED")
    assert [s for s, _ in history(admin, done)] == ["QUEUED", "SENT", "DELIVERED"]
    assert admin.list(device_id=dev.id, state="DELIVERED")[0].id == cmd.id
    sub.close()


def test_tts_downlinks_with_correlation_ids(lora, gw, control):
    admin = control(gw)
    sub = lora.network_server()
    eui, tts_id = new_dev_eui(), unique_id("lamp")
    dev = gw.add_device(kind="street_light", dev_eui=eui, codec="raw")
    before = stored(gw, "ns2")
    lora.ns.publish(tts_topic(tts_id), json.dumps(tts_uplink(tts_id, eui, f_cnt=5,
                                                               time_ms=now_ms())))
    gw.wait_metric("citygw_lorawan_messages_total", before + 1, server="ns2", event="up",
                   outcome="stored")
    push = f"v3/{TTS_APP}/devices/{tts_id}/down/push"

    def report(event: str, command_id: str, **extra) -> None:
        body = {"end_device_ids": {"device_id": tts_id, "dev_eui": eui.upper(),
                                   "application_ids": {"application_id": "water-app"}},
                "correlation_ids": ["as:downlink:01HZX0", f"citygw:cmd:{command_id}"],
                "received_at": "2026-12-05T01:00:00.123456789Z"}
        downlink = {"f_port": 1, "frm_payload": "AQ==", "confirmed": True, "priority": "NORMAL",
                    "correlation_ids": ["as:downlink:01HZX0", f"citygw:cmd:{command_id}"]}
        if event == "failed":
            body["downlink_failed"] = {"downlink": downlink, **extra}
        else:
            body[f"downlink_{event}"] = downlink
        lora.ns.publish(tts_topic(tts_id, event=f"down/{event}"), json.dumps(body))

    ok = admin.send(dev.id, "dim", raw=b"\xbe\xef", confirmed=True, f_port=15)
    msg, body = downlink_for(sub, push, ok.id)
    assert msg.qos == 0      # TTS's broker is QoS 0 only
    assert body == {"downlinks": [{"f_port": 15, "confirmed": True, "priority": "NORMAL",
                                   "frm_payload": "vu8=",
                                   "correlation_ids": [f"citygw:cmd:{ok.id}"]}]}, body
    admin.wait_state(ok.id, "SENT")
    report("queued", ok.id)              # in TTS's queue: no change of state, but counted
    gw.wait_metric("citygw_lorawan_downlink_reports_total", 1, server="ns2", report="queued",
                   outcome="matched")
    assert admin.state(admin.get(ok.id).state) == "SENT"
    report("sent", ok.id)
    admin.wait_state(ok.id, "DELIVERED")
    report("ack", ok.id)
    done = admin.wait_state(ok.id, "SUCCEEDED")
    assert history(admin, done)[2:] == [("DELIVERED", "lorawan:ns2"), ("SUCCEEDED", "lorawan:ns2")]

    nack = admin.send(dev.id, "light", {"on": True}, confirmed=True)
    _, body = downlink_for(sub, push, nack.id)
    assert body["downlinks"][0]["decoded_payload"] == {"on": True}, body
    assert body["downlinks"][0]["f_port"] == 1, "ns2 has the default downlink_f_port"
    admin.wait_state(nack.id, "SENT")
    report("sent", nack.id)
    report("nack", nack.id)
    assert "did not acknowledge" in admin.wait_state(nack.id, "FAILED").error

    failed = admin.send(dev.id, "light", {"on": False})
    downlink_for(sub, push, failed.id)
    admin.wait_state(failed.id, "SENT")
    report("failed", failed.id, error={"namespace": "pkg/networkserver",
                                       "name": "application_downlink_too_long",
                                       "message_format": "application downlink too long"})
    f = admin.wait_state(failed.id, "FAILED")
    assert "application_downlink_too_long" in f.error, f
    sub.close()


def test_spoofed_unknown_and_malformed_reports_change_nothing(lora, gw, control):
    admin = control(gw)
    sub = lora.network_server()
    dev, eui = chirpstack_device(lora)
    other, other_eui = chirpstack_device(lora)
    cmd = admin.send(dev.id, "light", {"on": True}, confirmed=True)
    downlink_for(sub, f"application/app-1/device/{eui}/command/down", cmd.id)
    admin.wait_state(cmd.id, "SENT")
    handled = gw.metric("citygw_lorawan_messages_total", server="ns1", event="downlink",
                        outcome="report")
    malformed = gw.metric("citygw_lorawan_messages_total", server="ns1", event="malformed",
                          outcome="dead_letter")
    spoofed = reports(gw, "ns1", "wrong_device")
    unknown = reports(gw, "ns1", "unknown_command")

    # dev's command reported on another device's topic (by that device's own identity)
    topic, r = cs_report(other_eui, "ack", cmd.id, acknowledged=True)
    lora.ns.publish(topic, as_json(r))
    # an id that is no command, and a report without any id
    topic, r = cs_report(eui, "ack", "0192f0c4-7d1e-7000-8000-00000000dead", acknowledged=True)
    lora.ns.publish(topic, as_json(r))
    lora.ns.publish(chirpstack_topic(eui, event="txack"), "{}")
    # malformed: garbage, wrong type, and a DevEUI in the body that is not the topic's
    lora.ns.publish(chirpstack_topic(eui, event="ack"), b"{\"queueItemId\": ")
    lora.ns.publish(chirpstack_topic(eui, event="ack"), json.dumps({"acknowledged": "yes"}))
    topic, r = cs_report(eui, "ack", cmd.id, acknowledged=True, claimed_eui=other_eui)
    lora.ns.publish(topic, as_json(r))
    # a TTS report naming the ChirpStack device's command, about a device TTS does not know
    lora.ns.publish(tts_topic("stranger", event="down/ack"), json.dumps(
        {"end_device_ids": {"device_id": "stranger"},
         "downlink_ack": {"correlation_ids": [f"citygw:cmd:{cmd.id}"]}}))

    gw.wait_metric("citygw_lorawan_messages_total", handled + 3, server="ns1", event="downlink",
                   outcome="report")
    gw.wait_metric("citygw_lorawan_messages_total", malformed + 3, server="ns1",
                   event="malformed", outcome="dead_letter")
    gw.wait_metric("citygw_lorawan_downlink_reports_total", 1, server="ns2", report="ack",
                   outcome="unknown_device")
    assert reports(gw, "ns1", "wrong_device") == spoofed + 1
    assert reports(gw, "ns1", "unknown_command") == unknown + 1
    assert gw.metric("citygw_lorawan_downlink_reports_total", server="ns1", report="transmitted",
                     outcome="no_command_id") >= 1
    c = admin.get(cmd.id)
    assert admin.state(c.state) == "SENT" and len(c.history) == 2, c
    # the malformed ones are dead-lettered under the topic's DevEUI, with the reason
    assert len([d for d in gw.deadletters(eui) if d["reason"] == "malformed_event"
                and d["address"] == f"ns1: {chirpstack_topic(eui, event='ack')}"]) == 3

    # the bridge still serves: the real reports move the command
    for event in ("txack", "ack"):
        topic, r = cs_report(eui, event, cmd.id, acknowledged=True)
        lora.ns.publish(topic, as_json(r))
    admin.wait_state(cmd.id, "SUCCEEDED")
    # a repeated report about a final command is late, and changes nothing
    late = reports(gw, "ns1", "late")
    lora.ns.publish(topic, as_json(r))
    wait_until(lambda: reports(gw, "ns1", "late") == late + 1, 10,
               desc="late report counted")
    assert admin.state(admin.get(cmd.id).state) == "SUCCEEDED"
    sub.close()


def test_kill9_with_a_queued_downlink_then_it_still_goes_out(lora, gw, control):
    """Learnt route and queued command survive kill -9: after the restart the downlink goes out
    without waiting for another uplink."""
    admin = control(gw)
    dev, eui = chirpstack_device(lora)
    lora.broker.stop()
    wait_until(lambda: gw.metric("citygw_lorawan_connected", server="ns1") == 0, 20,
               desc="bridge sees the broker gone")
    cmd = admin.send(dev.id, "light", {"on": True}, ttl_ms=600_000)
    admin.close()                     # no grpcio channel open across the fork of a restart
    gw.kill9()

    lora.broker.start()
    sub = lora.network_server()        # subscribed before the gateway is back
    gw.start()
    _, body = downlink_for(sub, f"application/app-1/device/{eui}/command/down", cmd.id, 30)
    assert body["object"] == {"on": True}
    after = control(gw)
    c = after.wait_state(cmd.id, "SENT")
    assert [s for s, _ in history(after, c)] == ["QUEUED", "SENT"]
    sub.close()

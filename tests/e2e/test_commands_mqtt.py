"""Commands to MQTT devices: the Control API (grpcio, generated from proto/) queues a command,
a real paho-mqtt device subscribed to devices/{id}/commands/+ receives it and answers on
.../result, and the command's fate (QUEUED -> SENT -> DELIVERED -> SUCCEEDED | FAILED, EXPIRED)
is kept durably with who and when. Another device can neither read nor answer it; an agency
needs the `control` permission and its scope.
"""

from __future__ import annotations

import json
import socket

import grpc
import pytest

from support import Gateway, unique_id
from support.telemetry import rpc_error


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways()


def commands_topic(device_id: str) -> str:
    return f"devices/{device_id}/commands/+"


def on_topic(topic: str):
    return lambda m: m.topic == topic


def answer(client, device_id: str, command_id: str, body: dict) -> int | None:
    return client.publish(f"devices/{device_id}/commands/{command_id}/result", json.dumps(body))


def test_device_receives_command_and_answers(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    watch = admin.watch(device_ids=[d.id])
    with gw.connected_client(d) as dev:
        assert dev.subscribe(commands_topic(d.id)) == [1]
        sent = admin.send(d.id, "light", {"on": True, "level": 80}, ttl_ms=60_000)
        assert admin.state(sent.state) == "QUEUED" and sent.transport == "mqtt", sent
        assert sent.created_by == "admin" and len(sent.id) == 36, sent

        msg = dev.wait_message(on_topic(f"devices/{d.id}/commands/{sent.id}"))
        assert msg.qos == 1
        assert json.loads(msg.payload) == {"id": sent.id, "name": "light",
                                           "params": {"on": True, "level": 80}}
        admin.wait_state(sent.id, "DELIVERED")
        assert answer(dev, d.id, sent.id, {"status": "ok", "result": {"level": 80}}) == 0

        done = admin.wait_state(sent.id, "SUCCEEDED")
        assert json.loads(done.result) == {"level": 80}
        assert [admin.state(e.state) for e in done.history] == [
            "QUEUED", "SENT", "DELIVERED", "SUCCEEDED"]
        assert [e.by for e in done.history] == ["admin", "gateway", f"device:{d.id}",
                                                f"device:{d.id}"]
        times = [e.time_ms for e in done.history]
        assert times == sorted(times) and times[0] == done.created_time_ms

        # the watcher saw every durable change, in order
        seen = watch.wait_for(lambda xs: any(admin.state(x.state) == "SUCCEEDED" for x in xs))
        assert [admin.state(x.state) for x in seen if x.id == sent.id] == [
            "QUEUED", "SENT", "DELIVERED", "SUCCEEDED"]

        # a QoS 1 retransmission of the answer is acknowledged and changes nothing
        assert answer(dev, d.id, sent.id, {"status": "error", "error": "late"}) == 0
        assert admin.state(admin.get(sent.id).state) == "SUCCEEDED"

    # the CLI reads the same record
    shown = gw.cli("command", "show", sent.id)
    assert shown["state"] == "SUCCEEDED" and shown["result"] == '{"level":80}', shown
    assert [h["state"] for h in shown["history"]] == ["QUEUED", "SENT", "DELIVERED", "SUCCEEDED"]
    listed = gw.cli("command", "list", "--device", d.id, "--state", "succeeded")
    assert [c["id"] for c in listed] == [sent.id]
    assert gw.metric("citygw_commands_total", transport="mqtt", state="SUCCEEDED") >= 1


def test_device_reports_failure(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    with gw.connected_client(d, version=4) as dev:  # MQTT 3.1.1
        assert dev.subscribe(f"devices/{d.id}/#") == [1]
        sent = admin.send(d.id, "dim", {"level": 500})
        dev.wait_message(on_topic(f"devices/{d.id}/commands/{sent.id}"))
        assert answer(dev, d.id, sent.id, {"status": "error", "error": "level out of range"}) == 0
        failed = admin.wait_state(sent.id, "FAILED")
        assert failed.error == "level out of range", failed


def test_offline_device_gets_queued_commands_on_connect(gw: Gateway, control):
    """Commands wait for a device that is offline; CLI-sent and API-sent alike, in order."""
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    first = gw.cli("command", "send", d.id, "light", "--params", '{"on": true}', "--ttl", "10m")
    first_id = first["id"]
    second = admin.send(d.id, "dim", {"level": 30})
    assert admin.state(admin.get(first_id).state) == "QUEUED"
    assert admin.get(first_id).created_by == "admin"
    with gw.connected_client(d) as dev:
        dev.subscribe(commands_topic(d.id))
        got = [dev.wait_message(on_topic(f"devices/{d.id}/commands/{i}")) for i in
               (first_id, second.id)]
        assert [json.loads(m.payload)["name"] for m in got] == ["light", "dim"]
        assert dev.messages.index(got[0]) < dev.messages.index(got[1]), "sent in creation order"
        for i in (first_id, second.id):
            assert answer(dev, d.id, i, {"status": "ok"}) == 0
            admin.wait_state(i, "SUCCEEDED")


def _mqtt_string(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _packet(kind: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            return bytes([kind]) + length + body


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "connection closed"
            buf += chunk
        return buf

    kind = exactly(1)[0]
    mult, n = 1, 0
    while True:
        byte = exactly(1)[0]
        n += (byte & 0x7F) * mult
        mult *= 128
        if not byte & 0x80:
            return kind, exactly(n)


def test_device_lost_before_puback_gets_the_command_again(gw: Gateway, control):
    """A device that received a command and died before acknowledging it (a plain MQTT 3.1.1
    client over a socket that closes without PUBACK) gets it again when it subscribes anew; the
    id tells it apart."""
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    host, port = gw.host, gw.mqtt_port
    with socket.create_connection((host, port), timeout=10) as sock:
        connect = (_mqtt_string("MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")
                   + _mqtt_string(d.id) + _mqtt_string(d.id) + _mqtt_string(d.secret))
        sock.sendall(_packet(0x10, connect))
        assert _read_packet(sock) == (0x20, b"\x00\x00"), "CONNACK accepted"
        sock.sendall(_packet(0x82, (1).to_bytes(2, "big") + _mqtt_string(commands_topic(d.id))
                             + b"\x01"))
        assert _read_packet(sock) == (0x90, b"\x00\x01\x01"), "SUBACK QoS 1"
        sent = admin.send(d.id, "reboot")
        kind, body = _read_packet(sock)
        assert kind & 0xF0 == 0x30 and sent.id.encode() in body, (kind, body)
        admin.wait_state(sent.id, "SENT")
    # gone without PUBACK: still SENT, and a new subscription gets it again
    with gw.connected_client(d) as dev:
        dev.subscribe(commands_topic(d.id))
        again = dev.wait_message(on_topic(f"devices/{d.id}/commands/{sent.id}"))
        assert json.loads(again.payload) == {"id": sent.id, "name": "reboot", "params": {}}
        assert answer(dev, d.id, sent.id, {"status": "ok"}) == 0
        admin.wait_state(sent.id, "SUCCEEDED")


def test_ttl_expiry(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    stale = admin.send(d.id, "light", {"on": True}, ttl_ms=1500)
    expired = admin.wait_state(stale.id, "EXPIRED", timeout=15)
    assert expired.error == "ttl passed while QUEUED", expired
    assert [(admin.state(e.state), e.by) for e in expired.history][-1] == ("EXPIRED", "gateway")
    # the device that connects later gets only the command still alive
    fresh = admin.send(d.id, "light", {"on": False})
    with gw.connected_client(d) as dev:
        dev.subscribe(commands_topic(d.id))
        dev.wait_message(on_topic(f"devices/{d.id}/commands/{fresh.id}"))
        assert [m.topic for m in dev.messages] == [f"devices/{d.id}/commands/{fresh.id}"]
        # a late answer to the expired command (the device's own, final already) is
        # acknowledged and changes nothing
        assert answer(dev, d.id, stale.id, {"status": "ok"}) == 0
    assert admin.state(admin.get(stale.id).state) == "EXPIRED"
    assert gw.metric("citygw_commands_total", transport="mqtt", state="EXPIRED") >= 1


def test_other_device_cannot_read_or_answer(gw: Gateway, control):
    admin = control(gw)
    a = gw.add_device(kind="street_light")
    b = gw.add_device(kind="street_light")
    refused_before = gw.metric("citygw_command_results_refused_total", reason="unknown_command")
    with gw.connected_client(a) as dev_a, gw.connected_client(b) as dev_b:
        # b may not subscribe to a's commands, by name or by wildcard
        assert dev_b.subscribe(commands_topic(a.id)) == [0x87]
        assert dev_b.subscribe("devices/+/commands/+") == [0x87]
        assert dev_b.subscribe("#") == [0x87]
        dev_a.subscribe(commands_topic(a.id))
        sent = admin.send(a.id, "light", {"on": True})
        dev_a.wait_message(on_topic(f"devices/{a.id}/commands/{sent.id}"))
        admin.wait_state(sent.id, "DELIVERED")

        # b answers a's command on b's own topic: not its command
        assert answer(dev_b, b.id, sent.id, {"status": "error"}) == 0x87
        # b answers on a's topic: spoofing, refused and recorded without the payload
        assert answer(dev_b, a.id, sent.id, {"status": "error"}) == 0x87
        assert admin.state(admin.get(sent.id).state) == "DELIVERED"
        assert not [m for m in dev_b.messages if a.id in m.topic]
        spoofs = [x for x in gw.deadletters(b.id) if x["reason"] == "spoofed_topic"]
        assert spoofs and spoofs[-1]["payload_size"] == 0, spoofs

        assert answer(dev_a, a.id, sent.id, {"status": "ok"}) == 0
        admin.wait_state(sent.id, "SUCCEEDED")
    assert gw.metric("citygw_command_results_refused_total",
                     reason="unknown_command") == refused_before + 1


def test_bad_answers_and_requests_are_refused(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    with gw.connected_client(d) as dev:
        dev.subscribe(commands_topic(d.id))
        sent = admin.send(d.id, "light", {"on": True})
        dev.wait_message(on_topic(f"devices/{d.id}/commands/{sent.id}"))
        before = gw.metric("citygw_command_results_refused_total", reason="malformed_result")
        assert dev.publish(f"devices/{d.id}/commands/{sent.id}/result", b"\xff not json") == 0x99
        assert answer(dev, d.id, sent.id, {"state": "fine"}) == 0x99
        assert dev.publish(f"devices/{d.id}/commands/{sent.id}/result",
                           b"x" * (65 * 1024)) == 0x99
        assert answer(dev, d.id, "no-such-command", {"status": "ok"}) == 0x87
        assert gw.metric("citygw_command_results_refused_total",
                         reason="malformed_result") == before + 3
        assert admin.state(admin.get(sent.id).state) == "DELIVERED"
        # the session stays usable: telemetry and a good answer still go through
        assert dev.publish(f"devices/{d.id}/telemetry", '{"lamp_state": true}') == 0
        assert answer(dev, d.id, sent.id, {"status": "ok"}) == 0
        admin.wait_state(sent.id, "SUCCEEDED")
    # answers are not readings, nor dead letters
    assert [r["quantity"] for r in gw.readings(d.id)] == ["lamp_state"]
    assert not [x for x in gw.deadletters(d.id) if "commands" in x["address"]]

    def code(fn):
        return rpc_error(fn).code()

    assert code(lambda: admin.send("no-such-device", "x")) == grpc.StatusCode.NOT_FOUND
    assert code(lambda: admin.send(d.id, "bad name!")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: admin.send(d.id, "x", raw=None, lwm2m=("write", "/3311/0", "1"))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    e = rpc_error(lambda: admin.stub.SendCommand(admin.pb.SendCommandRequest(
        device_id=d.id, name="x", payload=admin.pb.CommandPayload(params_json="[1, 2]")),
        metadata=admin.metadata))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "JSON object" in e.details()
    assert code(lambda: admin.send(d.id, "x", ttl_ms=31 * 86_400_000)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # an LwM2M write to an MQTT device, and a LoRaWAN command in a gateway without a bridge:
    # refused, never queued to expire
    e = rpc_error(lambda: admin.send(d.id, "on", lwm2m=("write", "/3311/0/5850", "1")))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "LwM2M" in e.details(), e
    lora = gw.add_device(kind="street_light", dev_eui="70b3d57ed0000aa1")
    e = rpc_error(lambda: admin.send(lora.id, "light", {"on": True}))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "LoRaWAN" in e.details(), e
    assert admin.list(device_id=lora.id) == []
    gw.cli("device", "disable", d.id)
    assert code(lambda: admin.send(d.id, "x")) == grpc.StatusCode.FAILED_PRECONDITION


def test_agency_needs_control_and_scope(gw: Gateway, control):
    city, elsewhere = unique_id("city"), unique_id("city")  # tenants of this test alone
    light = gw.add_device(kind="street_light", tenant=city)
    other = gw.add_device(kind="street_light", tenant=elsewhere)
    gauge = gw.add_device(kind="water_level", tenant=city)
    reader = gw.add_agency(tenants=[city], kinds=["street_light"])
    operator = gw.add_agency(tenants=[city], kinds=["street_light"], control=True)
    assert gw.cli("agency", "list") and [a["control"] for a in gw.cli("agency", "list")
                                         if a["name"] == operator.name] == [True]

    def code(fn):
        return rpc_error(fn).code()

    no_control = control(gw, reader.token)
    e = rpc_error(lambda: no_control.send(light.id, "light", {"on": True}))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "control" in e.details()
    assert code(lambda: no_control.list()) == grpc.StatusCode.PERMISSION_DENIED
    assert code(lambda: list(no_control.stub.WatchCommands(
        no_control.pb.WatchCommandsRequest(), metadata=no_control.metadata))) == \
        grpc.StatusCode.PERMISSION_DENIED

    ops = control(gw, operator.token)
    # outside its tenants or kinds, or unknown: the same refusal
    for device_id in (other.id, gauge.id, "no-such-device"):
        e = rpc_error(lambda: ops.send(device_id, "light", {"on": True}))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, (device_id, e)
    sent = ops.send(light.id, "light", {"on": True})
    assert sent.created_by == f"agency:{operator.name}"
    assert ops.get(sent.id).id == sent.id
    # commands of devices outside the scope are invisible to it
    admin = control(gw)
    foreign = admin.send(other.id, "light", {"on": True})
    assert code(lambda: ops.get(foreign.id)) == grpc.StatusCode.PERMISSION_DENIED
    assert {c.device_id for c in ops.list()} == {light.id}
    # no token, a wrong one
    assert code(lambda: control(gw, None).send(light.id, "x")) == grpc.StatusCode.UNAUTHENTICATED
    assert code(lambda: control(gw, "wrong").send(light.id, "x")) == \
        grpc.StatusCode.UNAUTHENTICATED
    # revocation works at once
    gw.remove_agency(operator.name)
    assert code(lambda: ops.send(light.id, "x")) == grpc.StatusCode.UNAUTHENTICATED


def test_commands_survive_kill9(gateway_factory, control):
    g = gateway_factory()
    d = g.add_device(kind="street_light")
    admin = control(g)
    with g.connected_client(d) as dev:
        dev.subscribe(commands_topic(d.id))
        done = admin.send(d.id, "light", {"on": True})
        dev.wait_message(on_topic(f"devices/{d.id}/commands/{done.id}"))
        assert answer(dev, d.id, done.id, {"status": "ok", "result": 1}) == 0
    waiting = admin.send(d.id, "dim", {"level": 10}, ttl_ms=600_000)
    short = admin.send(d.id, "light", {"on": False}, ttl_ms=4000)
    g.kill9()
    g.start()
    admin = control(g)
    # acknowledged outcomes and queued commands are all there
    assert admin.state(admin.get(done.id).state) == "SUCCEEDED"
    assert admin.state(admin.get(waiting.id).state) == "QUEUED"
    # a TTL keeps running across the restart
    admin.wait_state(short.id, "EXPIRED", timeout=20)
    with g.connected_client(d) as dev:
        dev.subscribe(commands_topic(d.id))
        dev.wait_message(on_topic(f"devices/{d.id}/commands/{waiting.id}"))
        assert answer(dev, d.id, waiting.id, {"status": "ok"}) == 0
        admin.wait_state(waiting.id, "SUCCEEDED")

"""device-sim against the real gateway: the smoke scenario is provisioned through the admin API,
run over every protocol device-sim drives (MQTT 5, plain CoAP, CoAPS with DTLS PSK, LwM2M, every
payload format; LoRaWAN as ChirpStack v4 and The Things Stack v3 events on a real Mosquitto
broker, bridged by the gateway's `[[lorawan]]` clients) and verified end to end through the agency
API; the bad-input modes get
exactly the refusals they intend, and the gateway's own counters (read here independently)
agree; scenario mistakes are reported with their line."""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess

import paho.mqtt.client as mqtt
import pytest

from support import ROOT, wait_until
from support.device_sim import DEVICE_SIM, device_sim, provision, run_and_verify
from support.lorawan import Brokers, lorawan_toml, wait_bridge_connected

SMOKE = ROOT / "device-sim" / "scenarios" / "smoke.toml"
LIGHTS = ROOT / "device-sim" / "scenarios" / "street-lights.toml"
PROTOCOLS = {"mqtt", "coap", "coaps", "lwm2m", "lorawan-chirpstack", "lorawan-tts"}
RADIO = {"rssi", "snr", "spreading_factor", "data_rate", "radio_frequency", "frame_counter",
         "gateway_count"}


@pytest.fixture(scope="module")
def network_server():
    """One real Mosquitto broker standing in for both LoRaWAN network servers' brokers."""
    brokers = Brokers(__name__)
    try:
        yield brokers.mosquitto()
    finally:
        brokers.close()


@pytest.fixture(scope="module")
def gw(module_gateways, network_server):
    """The module's gateway: plain CoAP on (for the coap and lwm2m drivers), CoAPS, and bridges
    for ChirpStack and The Things Stack events on the broker."""
    g = module_gateways(config_toml=lorawan_toml(network_server, name="chirpstack")
                        + lorawan_toml(network_server, name="tts", server_type="ttn_v3"),
                        env={"CITYGW_COAP__PLAIN_ENABLED": "true"})
    for name in ("chirpstack", "tts"):
        wait_bridge_connected(g, name)
    return g


@pytest.fixture(scope="module")
def smoke(gw, tmp_path_factory):
    """The smoke scenario provisioned in the module's gateway."""
    creds = tmp_path_factory.mktemp("smoke") / "creds.csv"
    return provision(gw, SMOKE, "sim-smoke", creds, devices=300)


def test_provision_registers_the_scenario_with_place_and_kind(gw, smoke):
    creds = smoke.creds
    rows = creds.read_text().splitlines()
    assert rows[0] == "id,secret,kind,commune_code,protocol,format,psk"
    assert len(rows) == 301
    assert oct(creds.stat().st_mode & 0o777) == "0o600"
    first = rows[1].split(",")
    dev = gw.cli("device", "show", first[0])
    dev = dev.get("device", dev)
    assert dev["tenant"] == "sim-smoke"
    assert dev["kind"] == first[2]
    assert dev["commune_code"] == first[3]
    assert 20.5 < dev["lat"] < 21.5 and 105 < dev["lon"] < 106.5  # Hà Nội
    kinds = {r.split(",")[2] for r in rows[1:]}
    formats = {r.split(",")[5] for r in rows[1:]}
    protocols = {r.split(",")[4] for r in rows[1:]}
    assert len(kinds) == 13, kinds
    assert formats == {"json", "senml-json", "senml-cbor", "proto"}
    assert protocols == PROTOCOLS
    # CoAPS devices, and only they, got a pre-shared key.
    for r in smoke.rows.values():
        assert (r["psk"] != "") == (r["protocol"] == "coaps"), r
    # LoRaWAN devices are registered under the DevEUI their network server names them by.
    lw = next(r.split(",") for r in rows[1:] if r.split(",")[4].startswith("lorawan"))
    eui = gw.cli("device", "show", lw[0])
    assert len(eui.get("device", eui)["dev_eui"]) == 16


def test_smoke_scenario_every_acknowledged_reading_arrives_exactly_once(gw, smoke, network_server,
                                                                        tmp_path):
    stored_before = gw.metric("citygw_readings_stored_total")
    r, v = run_and_verify(gw, smoke, tmp_path,
                          "--mqtt-host", gw.host, "--mqtt-port", str(gw.mqtt_port),
                          "--coap", gw.coap_listen, "--coaps", f"{gw.host}:{gw.coaps_port}",
                          "--lwm2m-lifetime", "8",
                          "--lorawan-broker", f"127.0.0.1:{network_server.port}")
    assert "connected 300/300" in r["progress"]  # the live progress line
    assert r["connected"] == 300 and r["connect_failed"] == 0
    assert r["rejected"] == 0 and r["unconfirmed"] == 0, r
    assert r["acked"] == r["sent"] and r["acked"] >= 300 * 5, r
    assert r["latency"]["count"] == r["acked"]

    # Every protocol carried its share of the acknowledged messages.
    protocol_of = {i: row["protocol"] for i, row in smoke.rows.items()}
    acked_by: dict[str, int] = {}
    lwm2m_quantities: set[str] = set()
    for line in (tmp_path / "acks.log").read_text().splitlines():
        device, _, quantities = line.split(",")
        acked_by[protocol_of[device]] = acked_by.get(protocol_of[device], 0) + 1
        if protocol_of[device] == "lwm2m":
            lwm2m_quantities.update(quantities.split(";"))
    assert set(acked_by) == PROTOCOLS, acked_by

    # Delivered beyond the acknowledged readings: the radio metadata the bridges add to each
    # LoRaWAN uplink, and each LwM2M observation's first value (the answer to the server's
    # Observe GET, which the device cannot see acknowledged). The gateway's own count agrees: it
    # stored exactly what was delivered.
    assert set(v["unacknowledged_by_quantity"]) <= RADIO | lwm2m_quantities, v
    assert RADIO & set(v["unacknowledged_by_quantity"]), v
    assert v["delivered_readings"] == r["readings_acked"] + v["unacknowledged_delivered"]
    assert gw.metric("citygw_readings_stored_total") - stored_before == v["delivered_readings"]

    # Each bridge stored exactly the uplinks its devices had acknowledged by the broker.
    for server, proto in (("chirpstack", "lorawan-chirpstack"), ("tts", "lorawan-tts")):
        stored_uplinks = gw.metric("citygw_lorawan_messages_total", server=server, event="up",
                                   outcome="stored")
        assert stored_uplinks == acked_by[proto], (server, stored_uplinks, acked_by)
    # LwM2M: every client registered, updated (lifetime 8 s) and de-registered.
    m = gw.metrics()
    lwm2m = sum(1 for p in protocol_of.values() if p == "lwm2m")
    for event in ("register", "update", "deregister"):
        assert m.value("citygw_lwm2m_registrations_total", event=event) >= lwm2m, event
    assert m.value("citygw_lwm2m_registrations_active") == 0


def test_verify_reports_missing_readings(gw, smoke, tmp_path):
    """An ack log naming a reading the gateway never got fails verification, and says which."""
    agency = smoke.agency
    ack_log = tmp_path / "acks.log"
    ack_log.write_text("smoke-000000,1000,water_level\n")
    p = device_sim("verify", "--grpc", gw.grpc_url, "--ack-log", str(ack_log),
                   "--tenant", "sim-smoke", "--timeout", "3", "--settle", "0.5",
                   env={"DEVICE_SIM_AGENCY_TOKEN": agency.token})
    assert p.returncode != 0
    assert "missing: smoke-000000 t=1000 water_level" in p.stdout
    assert "1 acknowledged readings missing, 0 duplicated" in p.stderr


EXPECTED = {
    "wrong-credentials": ("connack BadUserNamePassword", "citygw_auth_failures_total",
                          {"protocol": "mqtt", "reason": "bad_credentials"}),
    "unknown-device": ("connack NotAuthorized", "citygw_auth_failures_total",
                       {"protocol": "mqtt", "reason": "unknown_device"}),
    "spoofed-topic": ("puback NotAuthorized", "citygw_messages_rejected_total",
                      {"protocol": "mqtt", "reason": "spoofed_topic"}),
    "malformed": ("puback PayloadFormatInvalid", "citygw_messages_rejected_total",
                  {"protocol": "mqtt", "reason": "malformed_json"}),
    "oversize": ("puback PayloadFormatInvalid", "citygw_messages_rejected_total",
                 {"protocol": "mqtt", "reason": "payload_too_large"}),
}


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_bad_input_mode_gets_exactly_its_refusals(gw, smoke, tmp_path, mode):
    creds = smoke.creds
    answer, metric, labels = EXPECTED[mode]
    count = 12
    before = gw.metrics()
    out = tmp_path / "bad.json"
    p = device_sim("bad", mode, "--credentials", str(creds), "--mqtt-host", gw.host,
                   "--mqtt-port", str(gw.mqtt_port), "--metrics", f"{gw.http_base}/metrics",
                   "--count", str(count), "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(out.read_text())
    assert rep["answers"] == {answer: count}, rep
    assert rep["counter_delta"] == count and rep["control_acknowledged"], rep
    # Read independently of device-sim: the gateway counted exactly these refusals, and no other
    # kind of refusal or auth failure moved.
    after = gw.metrics()
    assert after.value(metric, **labels) - before.value(metric, **labels) == count
    for other in ("citygw_auth_failures_total", "citygw_messages_rejected_total"):
        moved = after.value(other) - before.value(other)
        assert moved == (count if other == metric else 0), (other, moved)


def test_connection_storm_is_served(gw, smoke, tmp_path):
    creds = smoke.creds
    before = gw.metrics()
    out = tmp_path / "storm.json"
    p = device_sim("bad", "storm", "--credentials", str(creds), "--mqtt-host", gw.host,
                   "--mqtt-port", str(gw.mqtt_port), "--metrics", f"{gw.http_base}/metrics",
                   "--count", "250", "--timeout", "60", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(out.read_text())
    assert rep["answers"] == {"connack Success": 250}
    assert rep["storm_peak_connected"] >= 250
    after = gw.metrics()
    assert after.value("citygw_auth_failures_total") == before.value("citygw_auth_failures_total")
    # Every storm connection is closed again.
    wait_until(lambda: gw.metric("citygw_connected_devices") == 0, timeout=20)


def test_scenario_mistakes_are_reported_with_their_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ntenant = "t"\nprovince = "01"\ndevices = 10\n'
                   'duration_secs = 5\n[profiles]\nair_quality = 1\nstreet_lamp = 2\n')
    p = device_sim("run", str(bad), "--credentials", str(tmp_path / "none.csv"))
    assert p.returncode != 0
    assert f"{bad}:8:" in p.stderr and "street_lamp" in p.stderr, p.stderr

    bad.write_text('name = "x"\ntenant = "t"\nprovince = "01"\ndevices = 10\n'
                   'duration_secs = 5\n[profiles]\nnoise = 1\n[protocols]\nmqtt = 1\nzigbee = 1\n')
    p = device_sim("provision", str(bad), "--token", "x", "--out", str(tmp_path / "c.csv"))
    assert p.returncode != 0
    assert f"{bad}:10:" in p.stderr and 'unknown protocol "zigbee"' in p.stderr, p.stderr
    assert "lorawan-tts" in p.stderr  # the known ones are listed


def test_lorawan_chirpstack_uplinks_reach_the_network_server_broker(gw, network_server, tmp_path):
    """The ChirpStack driver publishes one v4 JSON uplink event per report on
    application/{app}/device/{devEUI}/event/up; every uplink the broker acknowledged is in the
    ack log, and a real subscriber receives exactly those events."""
    scenario = tmp_path / "lorawan.toml"
    scenario.write_text('name = "lw"\ntenant = "sim-lw"\nprovince = "79"\ndevices = 20\n'
                        'duration_secs = 4\ninterval_secs = 1\n'
                        '[profiles]\nwater_meter = 1\nparking = 1\n'
                        '[protocols]\nlorawan-chirpstack = 1\n')
    creds = tmp_path / "creds.csv"
    p = device_sim("provision", str(scenario), "--grpc", gw.grpc_url, "--out", str(creds),
                   env={"DEVICE_SIM_ADMIN_TOKEN": gw.token})
    assert p.returncode == 0, p.stderr

    received: list[tuple[str, dict]] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="network-server-listener")
    sub.on_message = lambda c, u, m: received.append((m.topic, json.loads(m.payload)))
    sub.connect("127.0.0.1", network_server.port)
    sub.subscribe("application/+/device/+/event/up", qos=1)
    sub.loop_start()
    try:
        wait_until(lambda: sub.is_connected(), timeout=10)
        ack_log = tmp_path / "acks.log"
        run = device_sim("run", str(scenario), "--credentials", str(creds),
                         "--lorawan-broker", f"127.0.0.1:{network_server.port}",
                         "--chirpstack-application-id", "app-7", "--ack-log", str(ack_log),
                         "--json", str(tmp_path / "run.json"))
        assert run.returncode == 0, run.stderr
        acked = ack_log.read_text().splitlines()
        r = json.loads((tmp_path / "run.json").read_text())
        assert r["acked"] == len(acked) >= 20 * 3 and r["rejected"] == 0, r
        wait_until(lambda: len(received) >= len(acked), timeout=10)
    finally:
        sub.loop_stop()
        sub.disconnect()

    assert len(received) == len(acked)
    topic, event = received[0]
    info = event["deviceInfo"]
    assert topic == f"application/app-7/device/{info['devEui']}/event/up"
    assert info["applicationId"] == "app-7" and info["deviceName"].startswith("lw-")
    assert set(event) >= {"deduplicationId", "time", "devAddr", "fCnt", "fPort", "data",
                          "object", "rxInfo", "txInfo"}
    assert json.loads(base64.b64decode(event["data"])) == event["object"]
    # The ack log and the broker agree on every (device, time).
    sent = {(e["deviceInfo"]["deviceName"], e["time"]) for _, e in received}
    logged = {(line.split(",")[0], line.split(",")[1]) for line in acked}
    as_ms = {(d, str(int(dt.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp() * 1000)))
             for d, t in sent}
    assert as_ms == logged


def test_street_lights_carry_out_commands_sent_by_grpc(gw, control, tmp_path):
    """The shipped street-light scenario (3 lamps here): commands sent through the Control API
    (grpcio) before the lamps even connect are delivered when they subscribe, carried out and
    answered; an unknown command is answered with an error; the lamps' next readings show what
    they were told."""
    scenario = tmp_path / "lights.toml"
    text = LIGHTS.read_text()
    for old, new in (("devices = 10000", "devices = 3"), ("duration_secs = 300", "duration_secs = 6"),
                     ("ramp_up_secs = 20", "ramp_up_secs = 1"), ("interval_secs = 30", "interval_secs = 1"),
                     ('id_prefix = "sl"', 'id_prefix = "slc"'), ('tenant = "sim-lights"', 'tenant = "sim-lights-e2e"')):
        assert old in text, old
        text = text.replace(old, new)
    scenario.write_text(text)
    creds = tmp_path / "creds.csv"
    p = provision(gw, scenario, "sim-lights-e2e", creds, devices=3)
    dim, off, unknown = sorted(p.rows)

    admin = control(gw)
    # Queued first: the lamps get them when they subscribe.
    sent = {d: admin.send(d, name, params, ttl_ms=60_000) for d, name, params in (
        (dim, "dim", {"level": 40}), (off, "off", {}), (unknown, "reboot", {}))}
    run_json = tmp_path / "run.json"
    run = subprocess.Popen(
        [str(DEVICE_SIM), "run", str(scenario), "--credentials", str(creds), "--mqtt-host", gw.host,
         "--mqtt-port", str(gw.mqtt_port), "--json", str(run_json)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ok_dim = admin.wait_state(sent[dim].id, "SUCCEEDED", timeout=30)
        ok_off = admin.wait_state(sent[off].id, "SUCCEEDED", timeout=30)
        refused = admin.wait_state(sent[unknown].id, "FAILED", timeout=30)
        out, _ = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 0, out
    assert json.loads(ok_dim.result) == {"lamp_state": True, "dimmer": 40.0}
    assert json.loads(ok_off.result) == {"lamp_state": False, "dimmer": 100.0}
    assert "unknown command" in refused.error and "reboot" in refused.error, refused
    assert [e.by for e in ok_dim.history][-1] == f"device:{dim}"

    r = json.loads(run_json.read_text())
    assert (r["commands_received"], r["commands_ok"], r["commands_error"]) == (3, 2, 1), r
    assert r["answers_acked"] == 3 and r["rejected"] == 0 and r["connected"] == 3, r
    assert "3 received, 2 carried out, 1 refused, 3 answers acknowledged" in out, out

    # Readings sampled after the answer (device times are whole seconds): the commanded state.
    def after(device, command):
        done = command.history[-1].time_ms
        rs = [x for x in gw.readings(device) if x["device_time_ms"] >= done + 2000]
        return {(x["quantity"], x["value"]) for x in rs if x["quantity"] in ("lamp_state", "power")}

    assert after(dim, ok_dim) == {("lamp_state", True), ("power", 44.0)}  # 110 W rated, 40 %
    assert after(off, ok_off) == {("lamp_state", False), ("power", 0.0)}


def test_lwm2m_street_light_takes_writes_sent_by_grpc(gw, control, tmp_path):
    """The same lamp as an LwM2M client (IPSO Light Control /3311/0): the gateway's Writes sent
    through the Control API are answered 2.04 and its next notifications show them; a Write of
    a resource it does not have is answered 4.00 and the command FAILS with that code."""
    scenario = tmp_path / "lights.toml"
    text = LIGHTS.read_text()
    for old, new in (("devices = 10000", "devices = 1"), ("duration_secs = 300", "duration_secs = 6"),
                     ("ramp_up_secs = 20", "ramp_up_secs = 0"), ("interval_secs = 30", "interval_secs = 1"),
                     ('id_prefix = "sl"', 'id_prefix = "slw"'), ('tenant = "sim-lights"', 'tenant = "sim-lights-lwm2m"'),
                     ("mqtt = 1", "lwm2m = 1"), ("json = 1", "senml-json = 1")):
        assert old in text, old
        text = text.replace(old, new)
    scenario.write_text(text)
    p = provision(gw, scenario, "sim-lights-lwm2m", tmp_path / "creds.csv", devices=1)
    (lamp,) = p.rows

    admin = control(gw)
    # Queued until the client registers.
    dim = admin.send(lamp, "dim", lwm2m=("write", "/3311/0/5851", "40"), ttl_ms=60_000)
    on = admin.send(lamp, "on", lwm2m=("write", "/3311/0/5850", "true"), ttl_ms=60_000)
    bad = admin.send(lamp, "colour", lwm2m=("write", "/3311/0/5706", "red"), ttl_ms=60_000)
    run_json = tmp_path / "run.json"
    run = subprocess.Popen(
        [str(DEVICE_SIM), "run", str(scenario), "--credentials", str(p.creds), "--coap", gw.coap_listen,
         "--json", str(run_json)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        admin.wait_state(dim.id, "SUCCEEDED", timeout=30)
        done = admin.wait_state(on.id, "SUCCEEDED", timeout=30)
        refused = admin.wait_state(bad.id, "FAILED", timeout=30)
        out, _ = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 0, out
    assert "4.00" in refused.error and "not writable" in refused.error, refused
    r = json.loads(run_json.read_text())
    assert (r["commands_received"], r["commands_ok"], r["commands_error"]) == (3, 2, 1), r
    after = [x for x in gw.readings(lamp) if x["device_time_ms"] >= done.history[-1].time_ms + 2000]
    assert after and {x["value"] for x in after if x["quantity"] == "power"} == {44.0}, after

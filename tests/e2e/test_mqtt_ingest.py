"""Readings published over MQTT by real clients come back through `citygw readings` with the
right values, canonical quantities, units and timestamps.

Peers: mosquitto_pub (Debian) with MQTT 3.1.1 and 5, paho-mqtt 2.x. SenML CBOR is built with
cbor2. Every publish here is QoS 1, and readings are queried right after the PUBACK: the
contract is that a PUBACK is only sent once the reading is stored, so no waiting is needed.
"""

from __future__ import annotations

import json

import pytest

from support import (SENML_CBOR, SENML_JSON, Gateway, by_quantity, has_ipv6_loopback, mosquitto_pub, now_ms,
                     rfc3339_ms, senml_cbor, wait_until)

TENANT = "hanoi"
COMMUNE = "00004"  # a 2025 commune code of Ha Noi
LAT, LON = 21.0285, 105.8542


@pytest.fixture
def device(gw: Gateway):
    return gw.add_device(tenant=TENANT, kind="air_quality", commune=COMMUNE, lat=LAT, lon=LON,
                         name="Hoan Kiem air station")


def assert_common(r: dict, device, t_before: int, t_after: int) -> None:
    """Fields every stored MQTT reading carries from the session and the registry."""
    assert r["device_id"] == device.id
    assert r["tenant"] == TENANT
    assert r["protocol"] == "mqtt"
    assert r["kind"] == "air_quality"
    assert r["commune_code"] == COMMUNE
    assert r["location"] is not None, r
    assert r["location"]["lat"] == pytest.approx(LAT) and r["location"]["lon"] == pytest.approx(LON)
    assert isinstance(r["id"], int)
    # received by the gateway between our publish and its PUBACK (small slack for rounding)
    assert t_before - 50 <= r["received_time_ms"] <= t_after + 50, (t_before, r, t_after)


def single(readings: list[dict], quantity: str) -> dict:
    q = by_quantity(readings)
    assert quantity in q, f"no {quantity!r} reading among {sorted(q)}: {readings}"
    assert len(q[quantity]) == 1, q[quantity]
    return q[quantity][0]


# ---------------------------------------------------------------------------------------------
# mosquitto_pub


@pytest.mark.parametrize("version", [311, 5], ids=["mqttv311", "mqttv5"])
def test_mosquitto_pub_json_round_trip(gw: Gateway, device, version):
    ts = now_ms() - 90_000 + 123
    payload = json.dumps({"ts": ts, "temp": 21.5, "hum": 63.25, "pm25": 12.5,
                          "wind_gust_index": 3})
    t0 = now_ms()
    p = mosquitto_pub(gw, device, device.topic, message=payload, version=version)
    t1 = now_ms()
    assert p.returncode == 0, f"mosquitto_pub failed: {p.stderr}"

    rs = gw.readings(device.id)
    assert len(rs) == 4, rs
    temp, hum, pm = single(rs, "temperature"), single(rs, "humidity"), single(rs, "pm2_5")
    assert (temp["value"], temp["unit"]) == (21.5, "Cel")
    assert (hum["value"], hum["unit"]) == (63.25, "%RH")
    assert (pm["value"], pm["unit"]) == (12.5, "ug/m3")
    unknown = single(rs, "wind_gust_index")  # unknown quantities pass through unchanged
    assert unknown["value"] == 3
    for r in rs:
        assert r["device_time_ms"] == ts, r
        assert_common(r, device, t0, t1)


@pytest.mark.parametrize("version", [311, 5], ids=["mqttv311", "mqttv5"])
def test_mosquitto_pub_senml_json_round_trip(gw: Gateway, device, version):
    base_ms = now_ms() - 60_000 + 123  # SenML times are seconds: ms precision must survive
    records = [
        {"bt": base_ms / 1000, "n": "temperature", "u": "K",
         "v": 294.65},
        {"n": "humidity", "u": "%RH", "v": 40.5, "t": 1.5},
        {"n": "door_open", "vb": True},
        {"n": "status", "vs": "ok"},
    ]
    t0 = now_ms()
    p = mosquitto_pub(gw, device, device.topic + SENML_JSON, message=json.dumps(records),
                      version=version)
    t1 = now_ms()
    assert p.returncode == 0, f"mosquitto_pub failed: {p.stderr}"

    rs = gw.readings(device.id)
    assert len(rs) == 4, rs
    temp = single(rs, "temperature")
    assert temp["value"] == 294.65
    assert temp["unit"] == "K", "SenML units are kept as sent"
    assert temp["device_time_ms"] == base_ms
    hum = single(rs, "humidity")
    assert (hum["value"], hum["unit"], hum["device_time_ms"]) == (40.5, "%RH", base_ms + 1500)
    assert single(rs, "door_open")["value"] is True
    assert single(rs, "status")["value"] == "ok"
    for r in rs:
        assert_common(r, device, t0, t1)
    assert [r["device_time_ms"] for r in rs] == sorted(r["device_time_ms"] for r in rs), \
        "readings come back oldest first"


@pytest.mark.parametrize("version", [311, 5], ids=["mqttv311", "mqttv5"])
def test_mosquitto_pub_senml_cbor_file(gw: Gateway, device, tmp_path, version):
    base_ms = now_ms() - 30_000 + 7
    payload = senml_cbor([{"bt": base_ms / 1000, "n": "pm10",
                           "u": "ug/m3", "v": 31.0},
                          {"n": "pm2_5", "u": "ug/m3", "v": 17.25}])
    f = tmp_path / "payload.cbor"
    f.write_bytes(payload)
    p = mosquitto_pub(gw, device, device.topic + SENML_CBOR, file=f, version=version)
    assert p.returncode == 0, f"mosquitto_pub failed: {p.stderr}"
    rs = gw.readings(device.id)
    assert len(rs) == 2, rs
    assert (single(rs, "pm10")["value"], single(rs, "pm10")["unit"]) == (31.0, "ug/m3")
    assert single(rs, "pm2_5")["value"] == 17.25
    assert all(r["device_time_ms"] == base_ms for r in rs), rs


def test_mosquitto_pub_v5_content_type_names_format(gw: Gateway, device):
    """MQTT 5's content type property names the format on the plain telemetry topic."""
    base_ms = now_ms() - 10_000
    records = [{"bt": base_ms / 1000, "n": "temperature", "u": "Cel",
                "v": 30.5}]
    p = mosquitto_pub(gw, device, device.topic, message=json.dumps(records), version=5,
                      properties=[("publish", "content-type", "application/senml+json")])
    assert p.returncode == 0, f"mosquitto_pub failed: {p.stderr}"
    rs = gw.readings(device.id)
    r = single(rs, "temperature")
    assert (r["value"], r["unit"], r["device_time_ms"]) == (30.5, "Cel", base_ms)


# ---------------------------------------------------------------------------------------------
# paho-mqtt


@pytest.mark.parametrize("version", [311, 5], ids=["mqttv311", "mqttv5"])
def test_paho_json_shapes_and_timestamps(gw: Gateway, device, version):
    """Flat object with epoch-ms or RFC 3339 ts, array of objects, {"ts", "values"}, no ts."""
    base = now_ms() - 300_000
    t_rfc_utc = base + 1_250
    t_rfc_ict = base + 2_500          # Vietnam, UTC+7
    t_arr1, t_arr2 = base + 3_001, base + 4_002
    t_vals = base + 5_999
    with gw.connected_client(device, version=version) as c:
        t0 = now_ms()
        assert c.publish(device.topic, json.dumps({"ts": rfc3339_ms(t_rfc_utc), "noise": 55.5})) == 0
        assert c.publish(device.topic + "/json",
                         json.dumps({"ts": rfc3339_ms(t_rfc_ict, 7), "water_level": 1.75})) == 0
        assert c.publish(device.topic, json.dumps([{"ts": t_arr1, "temp": 20.5},
                                                   {"ts": t_arr2, "temp": 21.0}])) == 0
        assert c.publish(device.topic, json.dumps({"ts": t_vals,
                                                   "values": {"pm25": 8.5, "battery": 97}})) == 0
        t_now0 = now_ms()
        assert c.publish(device.topic, json.dumps({"vehicle_count": 42, "lamp_on": True,
                                                   "firmware": "1.4.2"})) == 0
        t1 = now_ms()

    rs = gw.readings(device.id)
    assert len(rs) == 9, rs
    q = by_quantity(rs)
    assert [(r["value"], r["device_time_ms"]) for r in q["noise"]] == [(55.5, t_rfc_utc)]
    assert [(r["value"], r["device_time_ms"]) for r in q["water_level"]] == [(1.75, t_rfc_ict)]
    assert [(r["value"], r["unit"], r["device_time_ms"]) for r in q["temperature"]] == [
        (20.5, "Cel", t_arr1), (21.0, "Cel", t_arr2)]
    assert [(r["value"], r["unit"], r["device_time_ms"]) for r in q["pm2_5"]] == [
        (8.5, "ug/m3", t_vals)]
    assert [(r["value"], r["device_time_ms"]) for r in q["battery"]] == [(97, t_vals)]
    # no ts: the device time is the receive time
    for name, value in (("vehicle_count", 42), ("lamp_on", True), ("firmware", "1.4.2")):
        (r,) = q[name]
        if isinstance(value, bool):
            assert r["value"] is value, r
        elif isinstance(value, str):
            assert r["value"] == value, r
        else:
            assert r["value"] == value and not isinstance(r["value"], (bool, str)), r
        assert t_now0 - 50 <= r["device_time_ms"] <= t1 + 50, (t_now0, r, t1)
        assert r["device_time_ms"] == r["received_time_ms"], r
    for r in rs:
        assert_common(r, device, t0, t1)
    times = [r["device_time_ms"] for r in rs]
    assert times == sorted(times), "readings come back oldest first"


def test_paho_senml_cbor_topic_and_content_type(gw: Gateway, device):
    base_ms = now_ms() - 20_000 + 999
    cbor_a = senml_cbor([{"bt": base_ms / 1000, "n": "temperature",
                          "u": "Cel", "v": 25.5},
                         {"n": "smoke_alarm", "vb": False, "t": 0.25}])
    cbor_b = senml_cbor([{"n": "humidity", "u": "%RH", "v": 71.0, "t": base_ms / 1000 + 2}])
    with gw.connected_client(device, version=5) as c:
        assert c.publish(device.topic + SENML_CBOR, cbor_a) == 0
        assert c.publish(device.topic, cbor_b, content_type="application/senml+cbor") == 0
    rs = gw.readings(device.id)
    assert len(rs) == 3, rs
    t = single(rs, "temperature")
    assert (t["value"], t["unit"], t["device_time_ms"]) == (25.5, "Cel", base_ms)
    s = single(rs, "smoke_alarm")
    assert (s["value"], s["device_time_ms"]) == (False, base_ms + 250)
    h = single(rs, "humidity")
    assert (h["value"], h["unit"], h["device_time_ms"]) == (71.0, "%RH", base_ms + 2000)


def test_paho_v311_senml_json(gw: Gateway, device):
    base_ms = now_ms() - 5_000
    with gw.connected_client(device, version=311) as c:
        assert c.publish(device.topic + SENML_JSON,
                         json.dumps([{"bt": base_ms / 1000,
                                      "n": "energy", "u": "kWh", "v": 1234.5}])) == 0
    r = single(gw.readings(device.id), "energy")
    assert (r["value"], r["unit"], r["device_time_ms"]) == (1234.5, "kWh", base_ms)


def test_json_seq_becomes_device_seq(gw: Gateway, device):
    """A `seq` in a JSON payload is the device's message sequence number."""
    ts = now_ms() - 1_000
    with gw.connected_client(device, version=5) as c:
        assert c.publish(device.topic, json.dumps({"ts": ts, "seq": 7, "temperature": 19.5})) == 0
        assert c.publish(device.topic, json.dumps({"ts": ts + 1, "temperature": 19.0})) == 0
    rs = gw.readings(device.id)
    temps = by_quantity(rs)["temperature"]
    assert [(r["value"], r["device_seq"]) for r in temps] == [(19.5, 7), (19.0, None)]


def test_device_without_location_has_null_location(gw: Gateway):
    d = gw.add_device(tenant="danang", kind="water_level")
    with gw.connected_client(d, version=311) as c:
        assert c.publish(d.topic, json.dumps({"water_level": 0.5})) == 0
    (r,) = gw.readings(d.id)
    assert r["location"] is None
    assert (r["tenant"], r["kind"], r["quantity"], r["unit"]) == ("danang", "water_level",
                                                                   "water_level", "m")


def test_qos0_publish_is_stored(gw: Gateway, device):
    """QoS 0 is best effort, but on a quiet loopback a QoS 0 reading does arrive."""
    with gw.connected_client(device, version=311) as c:
        c.publish(device.topic, json.dumps({"temperature": 22.0}), qos=0)
        assert c.publish(device.topic, json.dumps({"humidity": 50.0})) == 0
        rs = wait_until(lambda: len(gw.readings(device.id)) == 2 and gw.readings(device.id), 10,
                  desc="QoS 0 and QoS 1 readings stored")
    assert sorted(r["quantity"] for r in rs) == ["humidity", "temperature"]


# ---------------------------------------------------------------------------------------------
# IPv6


def test_ipv6_loopback_publish(gateway_factory, tmp_path):
    """The same publish over [::1]: all listeners on IPv6 loopback, clients and CLI over IPv6."""
    if not has_ipv6_loopback():
        pytest.skip("this host has no IPv6 loopback (cannot bind ::1)")
    gw6 = gateway_factory(host="::1")
    d = gw6.add_device(tenant=TENANT, kind="air_quality", commune=COMMUNE, lat=LAT, lon=LON)
    ts = now_ms() - 2_000
    p = mosquitto_pub(gw6, d, d.topic, message=json.dumps({"ts": ts, "temp": 23.5}), version=311)
    assert p.returncode == 0, p.stderr
    p = mosquitto_pub(gw6, d, d.topic + SENML_JSON, version=5,
                      message=json.dumps([{"bt": (ts + 1) / 1000, "n": "humidity", "u": "%RH",
                                           "v": 55.0}]))
    assert p.returncode == 0, p.stderr
    cbor = senml_cbor([{"bt": (ts + 2) / 1000, "n": "pm10", "u": "ug/m3", "v": 40.0}])
    with gw6.connected_client(d, version=5) as c:
        assert c.publish(d.topic + SENML_CBOR, cbor) == 0
    rs = gw6.readings(d.id)
    assert [(r["quantity"], r["value"], r["unit"], r["device_time_ms"]) for r in rs] == [
        ("temperature", 23.5, "Cel", ts), ("humidity", 55.0, "%RH", ts + 1),
        ("pm10", 40.0, "ug/m3", ts + 2)]


# ---------------------------------------------------------------------------------------------
# protobuf ReadingBatch


def test_paho_proto_reading_batch(gw: Gateway, device, citygw_pb):
    """A ReadingBatch on /proto (and via content type): identity comes from the session, never
    from what the device wrote into the message."""
    pb = citygw_pb
    ts = now_ms() - 45_000
    batch = pb.ReadingBatch(readings=[
        pb.Reading(id=999_999, device_id="someone-else", tenant="evil", quantity="temp",
                   number=24.5, device_time_ms=ts, device_seq=11, commune_code="99999"),
        pb.Reading(quantity="lamp_on", boolean=True, device_time_ms=ts + 1),
        pb.Reading(quantity="firmware", text="2.0.1", device_time_ms=ts + 2, unit=""),
    ])
    with gw.connected_client(device, version=5) as c:
        assert c.publish(device.topic + "/proto", batch.SerializeToString()) == 0
        assert c.publish(device.topic, pb.ReadingBatch(readings=[
            pb.Reading(quantity="humidity", number=66.0, device_time_ms=ts + 3)
        ]).SerializeToString(), content_type="application/x-protobuf") == 0
    rs = gw.readings(device.id)
    assert [(r["quantity"], r["value"], r["device_time_ms"]) for r in rs] == [
        ("temperature", 24.5, ts), ("lamp_on", True, ts + 1), ("firmware", "2.0.1", ts + 2),
        ("humidity", 66.0, ts + 3)]
    t = rs[0]
    assert (t["unit"], t["device_seq"]) == ("Cel", 11)
    assert t["id"] != 999_999
    for r in rs:
        assert (r["device_id"], r["tenant"], r["commune_code"]) == (device.id, TENANT, COMMUNE)
    assert not gw.readings("someone-else")

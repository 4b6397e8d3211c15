"""The Influx sink in InfluxDB 1.x mode (`kind = "influx1"`: `/write?db=&rp=`, basic auth)
against the Debian `influxdb` package (influxd 1.6.x), fed by mosquitto_pub.

- round trip with authentication enabled on the server (the sink's basic auth must work): float,
  count (integer), boolean and text values, a unit sent by the device, communes, seq; read back
  with `/query` point by point, and the field types InfluxDB recorded (float / integer / boolean /
  string).
- rejected points: a quantity first written as a number, then as a string in the same batch and
  again in a later one. InfluxDB 1.6 answers 400: for a batch that introduces the field and
  conflicts within itself, `{"error":"field type conflict"}` and nothing of the batch is written;
  once the field exists, `partial write: field type conflict: input field "value" on measurement
  ... is type string, already exists as type float dropped=1` (the other points are written).
  The good points must be delivered, each string reading dead-lettered (`sink_rejected`,
  `reading <id>`, the server's message) and forwarding must continue.
- a 4xx that is not about the data (database not found, 404) must not dead-letter anything: the
  readings wait until the database exists (issue 6: only "4xx data errors" are split and
  dead-lettered).
"""

from __future__ import annotations

from support import Gateway, now_ms, publish_json, publish_json_parallel, unique_id, wait_until
from support.tsdb import (compare_influx, expected_points, influx1_sink, influx_field_types,
                          sink_status, wait_drained)


def sink_rejections(gw: Gateway, device_id: str) -> list[dict]:
    return [d for d in gw.deadletters(device_id) if d["reason"] == "sink_rejected"]


def test_influx1_receives_readings_with_basic_auth(gateway_factory, stores):
    ifx = stores.influxdb1(auth=("admin", "adm-pw"))
    password = "pw-" + unique_id("x")
    ifx_user = ("citygw", password)
    # a write-only user for the gateway, as an operator would set it up
    ifx.execute(f"CREATE USER \"citygw\" WITH PASSWORD '{password}'")
    ifx.execute('GRANT WRITE ON "citygw" TO "citygw"')
    gw: Gateway = gateway_factory(
        config_toml=influx1_sink(ifx, username=ifx_user[0], password_env="INFLUX_PW",
                                 retention_policy="autogen", gzip=False),
        env={"INFLUX_PW": password})

    tenant = unique_id("danang")
    air = gw.add_device(unique_id("aq"), tenant=tenant, kind="air_quality", commune="20194")
    traffic = gw.add_device(unique_id("cnt"), tenant=tenant, kind="traffic")
    light = gw.add_device(unique_id("pole"), tenant=unique_id("hue"), kind="street_light",
                          commune="19774")
    base = now_ms() - 7_200_000 + 321
    published = {
        air: [{"ts": base + i * 1000, "seq": i, "temp": 27.25 + i / 8,
               "hum": {"value": 0.71 + i / 100, "unit": "/"}} for i in range(4)],
        traffic: [{"ts": base + i * 500 + 1, "seq": 1000 + i, "vehicles": 3 * i + 1} for i in range(5)],
        light: [{"ts": base + 5, "seq": 9, "lamp_state": True, "status": "on, dim=40%"},
                {"ts": base + 6, "lamp_state": False, "status": 'đèn "tắt"'}],
    }
    publish_json_parallel(gw, published)
    expected = [p for d, recs in published.items() for p in expected_points(d, recs)]

    wait_drained(gw, "influx", timeout=30)
    compare_influx(ifx, expected)
    types = influx_field_types(ifx)
    assert types.get("temperature") == {"value": "float", "seq": "integer"}, types
    assert types.get("humidity") == {"value": "float", "seq": "integer"}, types
    assert types.get("vehicle_count") == {"value": "integer", "seq": "integer"}, types
    assert types.get("lamp_state") == {"value": "boolean", "seq": "integer"}, types
    assert types.get("status") == {"value": "string", "seq": "integer"}, types
    st = sink_status(gw)["influx"]
    assert st["kind"] == "influx1" and st["lag_readings"] == 0, st
    assert gw.metric("citygw_sink_errors_total", sink="influx") == 0
    assert password not in gw.log_path.read_text(errors="replace"), "the sink password was logged"


def test_type_conflict_is_dead_lettered_and_forwarding_continues(gateway_factory, stores):
    ifx = stores.influxdb1()
    # a long linger so the first message's readings travel as one batch
    gw: Gateway = gateway_factory(config_toml=influx1_sink(ifx, linger_ms=300, batch_max=1000))
    tenant = unique_id("hanoi")
    gate = gw.add_device(unique_id("gate"), tenant=tenant, kind="flood", commune="00004")
    other = gw.add_device(unique_id("aq"), tenant=tenant, kind="air_quality")
    base = now_ms() - 600_000

    # 1. one message, one batch: number, string, number for gate_position (plus a good quantity)
    first = [{"ts": base + 1, "seq": 1, "gate_position": 1.5, "temp": 20.5},
             {"ts": base + 2, "seq": 2, "gate_position": "half open", "temp": 21.5},
             {"ts": base + 3, "seq": 3, "gate_position": 2.5, "temp": 22.5}]
    publish_json(gw, gate, first)                  # a JSON array: one MQTT message
    bad_1 = [r for r in gw.readings(gate.id) if r["value"] == "half open"]
    assert len(bad_1) == 1, gw.readings(gate.id)

    good_1 = [{k: v for k, v in r.items() if v != "half open"} for r in first]
    wait_drained(gw, "influx", timeout=30)
    compare_influx(ifx, expected_points(gate, good_1))

    dls = wait_until(lambda: sink_rejections(gw, gate.id), 10, desc="a sink_rejected dead letter")
    assert [d["address"] for d in dls] == [f"reading {bad_1[0]['id']}"], dls
    detail = dls[0]["detail"]
    assert detail.startswith("influx (400): "), detail
    assert "field type conflict" in detail, detail
    # the message of InfluxDB for the isolated point names the measurement and both types
    assert 'on measurement \\"gate_position\\" is type string, already exists as type float' in detail \
        or 'on measurement "gate_position" is type string, already exists as type float' in detail, detail

    # 2. a later batch: the string alone, while another device keeps publishing
    errors0 = gw.metric("citygw_sink_errors_total", sink="influx", status="400")
    # the whole batch was refused first, then its part holding the string: the good points of
    # that batch came through the split
    assert errors0 >= 2, f"{errors0} 400s: the first message did not travel as one batch"
    publish_json(gw, gate, {"ts": base + 4, "seq": 4, "gate_position": "closed"})
    publish_json(gw, other, *[{"ts": base + 10 + i, "seq": i, "temp": 30 + i / 4} for i in range(20)])
    bad_2 = [r for r in gw.readings(gate.id) if r["value"] == "closed"]
    wait_until(lambda: len(sink_rejections(gw, gate.id)) == 2, 20, desc="the second dead letter")
    dls = sink_rejections(gw, gate.id)
    assert sorted(d["address"] for d in dls) == sorted(f"reading {r['id']}" for r in bad_1 + bad_2), dls
    assert all(d["detail"].startswith("influx (400): ") and "field type conflict" in d["detail"]
               for d in dls), dls

    # 3. forwarding continues: a number published afterwards arrives
    after = {"ts": base + 5, "seq": 5, "gate_position": 3.5, "temp": 23.5}
    publish_json(gw, gate, after)
    wait_drained(gw, "influx", timeout=30)
    compare_influx(ifx, expected_points(gate, good_1 + [after]))
    compare_influx(ifx, expected_points(other, [{"ts": base + 10 + i, "seq": i, "temp": 30 + i / 4}
                                                for i in range(20)]))
    assert gw.metric("citygw_sink_errors_total", sink="influx", status="400") > errors0
    # only the two strings were dead-lettered, nothing of the other device
    assert len(sink_rejections(gw, gate.id)) == 2
    assert sink_rejections(gw, other.id) == []
    st = sink_status(gw)["influx"]
    assert st["cursor"] == st["last_reading_id"] and st["lag_readings"] == 0, st


def test_missing_database_is_retried_not_dead_lettered(gateway_factory, stores):
    ifx = stores.influxdb1(db=None)                # the database does not exist yet
    gw: Gateway = gateway_factory(config_toml=influx1_sink(ifx, db="late"))
    d = gw.add_device(unique_id("aq"), tenant=unique_id("city"), kind="air_quality")
    recs = [{"ts": now_ms() - 60_000 + i, "seq": i, "temp": 19 + i / 2} for i in range(10)]
    publish_json(gw, d, *recs)

    gw.wait_metric("citygw_sink_errors_total", 1, timeout=15, sink="influx")
    assert gw.metric("citygw_sink_errors_total", sink="influx", status="404") >= 1, \
        [s for s in gw.metrics().samples if s[0] == "citygw_sink_errors_total"]
    assert sink_status(gw)["influx"]["lag_readings"] == 10
    assert sink_rejections(gw, d.id) == [], "database not found is not a data error"

    ifx.create_database("late")
    wait_until(lambda: sink_status(gw)["influx"]["lag_readings"] == 0, 15, desc="lag 0")
    compare_influx(ifx, expected_points(d, recs), db="late")
    assert sink_rejections(gw, d.id) == []

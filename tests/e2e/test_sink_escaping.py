"""Line-protocol escaping end to end. Device ids, tenants and communes are restricted by the
registry, but quantity names (the measurement) and units (a tag) come from the device and can
hold anything: spaces, commas, equals signs, quotes, Vietnamese text. They must arrive intact in
both stores, which parse line protocol independently:

- VictoriaMetrics (influx2 mode) names the series `{measurement}_value`, so the metric name it
  reports is the quantity exactly as sent plus `_value`; the unit label is the unit as sent.
- InfluxDB 1.x (influx1 mode) lists the measurement exactly as sent (SHOW MEASUREMENTS) and
  keeps text values (quotes, backslashes, commas) byte for byte.

A wrong escape either fails the whole write (400 "unable to parse") — then the reading would be
dead-lettered, which the test also rules out — or silently renames the measurement or splits a tag.
A newline cannot be escaped at all: a device must not be able to inject a point for another one.
"""

from __future__ import annotations

import pytest

from support import Gateway, now_ms, publish_json, unique_id
from support.tsdb import (compare_influx, compare_vm, expected_points, influx1_sink, influx_ident,
                          vm_sink, wait_drained)

RIVER = "mực nước, sông=Hồng"               # spaces, a comma, an equals sign, Vietnamese
FLOW = "lưu lượng  (m3/s)"                   # a double space and parentheses
ODD_UNIT = "m3/h, x=y độ"                    # a tag value with a comma, an equals sign, spaces
TEXT = 'cống "số 3", a=b \\ mở'              # a string field with quotes, a backslash, a comma


@pytest.mark.parametrize("store", ["victoria_metrics", "influxdb1"])
def test_odd_quantity_names_and_units_arrive_intact(gateway_factory, stores, store):
    server = getattr(stores, store)()
    config = vm_sink(server) if store == "victoria_metrics" else influx1_sink(server)
    gw: Gateway = gateway_factory(config_toml=config)
    d = gw.add_device(unique_id("wl"), tenant=unique_id("hanoi"), kind="water_level", commune="00004")
    ts = now_ms() - 120_000 + 45
    recs = [{"ts": ts, "seq": 1, RIVER: 1.5, FLOW: {"value": 2.25, "unit": ODD_UNIT}},
            {"ts": ts + 1, "seq": 2, RIVER: 1.75}]
    if store == "influxdb1":
        recs.append({"ts": ts + 2, "seq": 3, "ghi chú, trạng thái": TEXT})   # text: 1.x only
    publish_json(gw, d, *recs)
    stored = {r["quantity"] for r in gw.readings(d.id)}
    assert stored >= {RIVER, FLOW}, f"the gateway itself renamed a quantity: {stored}"

    wait_drained(gw, "vm" if store == "victoria_metrics" else "influx", timeout=30)
    expected = expected_points(d, recs)
    if store == "victoria_metrics":
        samples = server.samples('{__name__=~".+"}')
        names = {m["__name__"] for m, _, _ in samples}
        assert {f"{RIVER}_value", f"{RIVER}_seq", f"{FLOW}_value"} <= names, names
        units = {m.get("unit") for m, _, _ in samples if m["__name__"] == f"{FLOW}_value"}
        assert units == {ODD_UNIT}, units
        compare_vm(samples, expected)
    else:
        shown = {v[0] for s in server.query("SHOW MEASUREMENTS") for v in s["values"]}
        assert {RIVER, FLOW, "ghi chú, trạng thái"} <= shown, shown
        compare_influx(server, expected)
    assert [x for x in gw.deadletters(d.id) if x["reason"] == "sink_rejected"] == []


@pytest.mark.parametrize("store", ["victoria_metrics", "influxdb1"])
def test_no_line_protocol_injection_and_backslashes(gateway_factory, stores, store):
    """A newline cannot be escaped in line protocol: a quantity name or unit carrying one must
    not end the line and start a point of the device's choosing (here: one claiming to be another
    device). Backslashes: InfluxDB and VictoriaMetrics read a backslash in a name back
    differently, so a reading whose quantity contains one is dead-lettered (documented) rather
    than written under a mangled name or without its tags.

    Checked: every measurement in the store is one of the device's quantity names exactly (line
    breaks replaced with a space, as documented), every
    series has exactly the device's tags, and each reading is either there with its value or
    dead-lettered (`reading <id>`)."""
    server = getattr(stores, store)()
    sink = "vm" if store == "victoria_metrics" else "influx"
    config = vm_sink(server) if store == "victoria_metrics" else influx1_sink(server)
    gw: Gateway = gateway_factory(config_toml=config)
    tenant = unique_id("hanoi")
    d = gw.add_device(unique_id("wl"), tenant=tenant, kind="water_level")
    ts = now_ms() - 60_000
    ns = ts * 1_000_000
    evil = f"x value=1 {ns}\nevil,device=victim,tenant={tenant},kind=flood,protocol=mqtt value=666 {ns}\ny"
    mid, trailing = "mid\\dle", "back\\slash\\"
    publish_json(gw, d, {"ts": ts, "seq": 1, evil: 1.5, "ok": {"value": 2, "unit": "u\nevil=1"},
                         mid: 3, trailing: 4})
    # line breaks cannot be carried: the documented mapping replaces them with a space
    stored = {r["quantity"].replace("\r", " ").replace("\n", " "): r for r in gw.readings(d.id)}
    assert set(stored) >= {mid, trailing, "ok"}, stored
    wait_drained(gw, sink, timeout=30)
    dead = {x["address"] for x in gw.deadletters(d.id)}
    tags = {"device": d.id, "tenant": tenant, "kind": "water_level", "protocol": "mqtt"}

    # name -> (tags without unit, value) as the store has them
    found: dict[str, list[tuple[dict, float]]] = {}
    if store == "victoria_metrics":
        for m, _, v in server.samples('{__name__=~".+"}'):
            if m["__name__"].endswith("_value"):
                labels = {k: x for k, x in m.items() if k not in ("__name__", "unit")}
                found.setdefault(m["__name__"][: -len("_value")], []).append((labels, v))
    else:
        shown = {v[0] for s in server.query("SHOW MEASUREMENTS") for v in s["values"]}
        for name in shown:
            for row in server.rows(f"SELECT * FROM {influx_ident(name)} GROUP BY *"):
                labels = {k: row[k] for k in ("commune", "device", "kind", "protocol", "tenant")
                          if row.get(k)}
                found.setdefault(name, []).append((labels, row.get("value")))
            if name not in found:       # a measurement no SELECT can read back
                found[name] = [({}, None)]

    assert all(lt == tags for pts in found.values() for lt, _ in pts), \
        f"a point without exactly the device's tags: {found}"
    assert not any(n.startswith("evil") for n in found), f"injected a point: {found}"
    unexpected = set(found) - set(stored)
    assert not unexpected, (f"measurements that are no quantity the device sent (mangled name?): "
                            f"{unexpected}; sent {sorted(stored)}")
    for q, r in stored.items():
        if q in found:
            assert [v for _, v in found[q]] == [r["value"]], (q, found[q])
        else:
            assert f"reading {r['id']}" in dead, f"{q!r}: neither in the store nor dead-lettered"
    # Documented: no spelling of a backslash in a name reads back the same in every store, so
    # such readings are dead-lettered with that reason instead of stored under a mangled name.
    details = {x["address"]: x["detail"] for x in gw.deadletters(d.id)}
    for q in (mid, trailing):
        assert q not in found
        assert "backslash" in details[f"reading {stored[q]['id']}"], details

"""The Influx sink (`kind = "influx2"`, InfluxDB 2 write API) against a real VictoriaMetrics
(Debian `/usr/bin/victoria-metrics`), fed by real MQTT publishers (mosquitto_pub).

VictoriaMetrics names a series `{measurement}_{field}` (`temperature_value`, `temperature_seq`)
with the tags as labels, keeps numeric and boolean (0/1) fields only, and keeps duplicate
samples; every comparison reads back through `/api/v1/export` and waits on conditions (with
`/internal/force_flush`), never on a sleep.

- round trip: several devices and tenants, float / count (integer) / boolean quantities, a value
  with its own unit, a device with a commune and one without, with and without seq; every point
  compared one by one (labels exactly, device timestamp in ms, value, seq); metrics and
  `citygw sink status`; the token never reaches the log.
- outage: VictoriaMetrics stopped (SIGTERM), 20,000 readings from 8 devices, lag visible and
  /readyz still 200, a second sink (another VictoriaMetrics) receives everything meanwhile,
  VictoriaMetrics started again on the same data dir and port: all 20,000 arrive unchanged
  (distinct (device, time) points; identical repeats are allowed, a changed value is not) and
  the lag returns to 0.
- kill -9 with a backlog: the backlog (sink down all along) is delivered after the restart,
  exactly once; killed again once drained, the gateway resumes at its durable cursor.
"""

from __future__ import annotations

import json
import uuid

from support import Gateway, now_ms, publish_json, publish_json_parallel, unique_id
from support.tsdb import (compare_vm, expected_points, sink_lag, sink_status, vm_sink,
                          wait_drained)

ALL = '{__name__=~".+"}'


def test_readings_reach_victoria_metrics(gateway_factory, stores):
    vm = stores.victoria_metrics()
    token = "tok-" + uuid.uuid4().hex
    gw: Gateway = gateway_factory(config_toml=vm_sink(vm, token=token))
    t_start_s = now_ms() / 1000

    tenant_a, tenant_b = unique_id("hanoi"), unique_id("hcmc")
    air = gw.add_device(unique_id("aq"), tenant=tenant_a, kind="air_quality", commune="00004")
    traffic = gw.add_device(unique_id("cnt"), tenant=tenant_a, kind="traffic")        # no commune
    river = gw.add_device(unique_id("wl"), tenant=tenant_b, kind="water_level", commune="26734")
    base = now_ms() - 3_600_000 + 123          # an hour ago, off the second: ms must survive
    published = {
        air: [{"ts": base + i * 60_000, "seq": 100 + i, "temp": 21.5 + i / 4, "hum": 60.25 + i,
               "pm25": 12 + i} for i in range(5)],
        traffic: [{"ts": base + i * 30_000 + 7, "seq": i, "vehicles": 17 * i} for i in range(6)],
        river: [{"ts": base + 1, "seq": 1, "level": {"value": 125.5, "unit": "cm"},
                 "lamp_state": True},
                {"ts": base + 2, "level": {"value": 126, "unit": "cm"}, "lamp_state": False}],
    }
    publish_json_parallel(gw, published)
    expected = [p for d, recs in published.items() for p in expected_points(d, recs)]
    assert len(expected) == 5 * 3 + 6 + 2 * 2

    samples = vm.wait_samples(ALL, len(expected) + sum(1 for p in expected if p["seq"] is not None))
    compare_vm(samples, expected)

    # what the gateway says about it
    wait_drained(gw, "vm")
    (st,) = gw.cli("sink", "status")
    last_id = max(r["id"] for d in published for r in gw.readings(d.id))
    assert st["name"] == "vm" and st["kind"] == "influx2", st
    assert st["cursor"] == last_id and st["last_reading_id"] == last_id, (st, last_id)
    assert st["lag_readings"] == 0 and st["lag_seconds"] == 0, st
    assert st["last_success_ms"] >= t_start_s * 1000, st
    # gauges are refreshed by the gateway's housekeeping (every few seconds): wait for it
    gw.wait_metric("citygw_sink_last_success_timestamp_seconds", t_start_s - 1, timeout=15, sink="vm")
    m = gw.metrics()
    assert m.value("citygw_sink_points_total", sink="vm") >= len(expected)
    assert m.value("citygw_sink_batches_total", sink="vm") >= 1
    assert m.value("citygw_sink_errors_total", sink="vm") == 0, \
        [s for s in m.samples if s[0] == "citygw_sink_errors_total"]
    assert m.value("citygw_sink_lag_seconds", sink="vm") == 0
    # the token is a secret: not in the log, not in `sink status`
    assert token not in gw.log_path.read_text(errors="replace"), "the sink token was logged"
    assert token not in json.dumps(st)


OUTAGE_DEVICES = 8
OUTAGE_PER_DEVICE = 2_500          # 8 x 2,500 = 20,000 readings


def test_outage_backlog_is_delivered_unchanged(gateway_factory, stores):
    vm = stores.victoria_metrics()
    token = "tok-" + uuid.uuid4().hex
    # token from the environment this time (token_env), batches smaller than the backlog
    # a second sink stays up all along: one sink's outage must not hold back another
    vm2 = stores.victoria_metrics()
    gw: Gateway = gateway_factory(
        config_toml=vm_sink(vm, token_env="VM_SINK_TOKEN", batch_max=2000) + "\n"
        + vm_sink(vm2, name="agency-vm", token=token),
        env={"VM_SINK_TOKEN": token})
    tenant = unique_id("city")
    devices = [gw.add_device(unique_id("cnt" if i % 2 else "aq"), tenant=tenant,
                             kind="traffic" if i % 2 else "air_quality",
                             commune="00004" if i % 3 == 0 else None)
               for i in range(OUTAGE_DEVICES)]

    # the sink works before the outage
    base = now_ms() - 2 * 3_600_000
    warm = {d: [{"ts": base - 1000, "seq": 0, ("vehicles" if i % 2 else "temp"): 0}]
            for i, d in enumerate(devices)}
    publish_json_parallel(gw, warm)
    vm.wait_samples(ALL, 2 * OUTAGE_DEVICES)
    wait_drained(gw, "vm")

    assert vm.stop() == 0, "VictoriaMetrics did not exit cleanly on SIGTERM"
    retries0 = gw.metric("citygw_sink_retries_total", sink="vm")

    def record(i: int, seq: int) -> dict:
        # a value that differs per device and seq, so any mix-up or change shows
        if i % 2:
            return {"ts": base + seq, "seq": seq, "vehicles": (seq * 7 + i) % 1000}
        return {"ts": base + seq, "seq": seq, "temp": round(15 + (seq % 400) / 16 + i / 100, 4)}

    outage = {d: [record(i, s) for s in range(1, OUTAGE_PER_DEVICE + 1)] for i, d in enumerate(devices)}
    publish_json_parallel(gw, outage)              # every message PUBACKed = stored
    expected = [p for d, recs in outage.items() for p in expected_points(d, recs)]
    expected += [p for d, recs in warm.items() for p in expected_points(d, recs)]

    # the backlog is visible, ingestion is still ready
    lag = gw.wait_metric("citygw_sink_lag_readings", OUTAGE_DEVICES * OUTAGE_PER_DEVICE,
                         timeout=20, sink="vm")
    assert lag == OUTAGE_DEVICES * OUTAGE_PER_DEVICE, lag
    assert gw.metric("citygw_sink_lag_seconds", sink="vm") > 0
    st = sink_status(gw)["vm"]
    assert st["lag_readings"] == OUTAGE_DEVICES * OUTAGE_PER_DEVICE, st
    r = gw.http_get("/readyz")
    assert r.status_code == 200, f"/readyz -> {r.status_code} while a sink is down: {r.text}"
    gw.wait_metric("citygw_sink_retries_total", retries0 + 1, timeout=10, sink="vm")
    assert gw.metric("citygw_sink_errors_total", sink="vm", status="network") >= 1
    # ... while the other sink got everything
    compare_vm(vm2.wait_samples(ALL, 2 * len(expected), timeout=60), expected)
    assert sink_status(gw)["agency-vm"]["lag_readings"] == 0
    assert sink_status(gw)["vm"]["lag_readings"] == OUTAGE_DEVICES * OUTAGE_PER_DEVICE

    vm.start()                                     # same data dir, same port
    samples = vm.wait_samples(ALL, 2 * len(expected), timeout=60)
    dups = compare_vm(samples, expected, allow_duplicates=True)
    print(f"{len(expected)} points, {dups} identical repeats (at-least-once)")
    wait_drained(gw, "vm", timeout=20)
    assert gw.metric("citygw_sink_lag_seconds", sink="vm") == 0
    assert token not in gw.log_path.read_text(errors="replace"), "the sink token was logged"


def test_kill9_with_backlog_then_restart_delivers_it(gateway_factory, stores, tmp_path):
    vm = stores.victoria_metrics(start=False)      # the sink is down from the start
    token_file = tmp_path / "vm.token"
    token_file.write_text("tok-" + uuid.uuid4().hex + "\n")
    gw: Gateway = gateway_factory(config_toml=vm_sink(vm, token_file=str(token_file)))
    tenant = unique_id("city")
    devices = [gw.add_device(unique_id("aq"), tenant=tenant, kind="air_quality", commune="00004")
               for _ in range(3)]
    base = now_ms() - 3_600_000
    published = {d: [{"ts": base + s * 10, "seq": s, "temp": s / 8 + i, "hum": 50 + s % 40}
                     for s in range(1_000)] for i, d in enumerate(devices)}
    publish_json_parallel(gw, published)
    n = sum(2 * len(recs) for recs in published.values())
    gw.wait_metric("citygw_sink_lag_readings", n, timeout=20, sink="vm")

    gw.kill9()
    vm.start()
    gw.start()                                     # same data dir
    # one more reading after the restart: the forwarder continues past the backlog
    tail = {"ts": base + 99_999, "seq": 5_000, "temp": -1.5}
    publish_json(gw, devices[0], tail)
    published[devices[0]].append(tail)

    expected = [p for d, recs in published.items() for p in expected_points(d, recs)]
    samples = vm.wait_samples(ALL, 2 * len(expected), timeout=60)
    # nothing had been delivered before the kill, so nothing may arrive twice either
    compare_vm(samples, expected)
    wait_drained(gw, "vm")
    st = sink_status(gw)["vm"]
    assert st["cursor"] == st["last_reading_id"], st
    assert sink_lag(gw, "vm") == 0

    # the cursor is durable: killed again once drained, the gateway resumes where it was
    gw.kill9()
    gw.start()
    st = sink_status(gw)["vm"]
    assert st["cursor"] == st["last_reading_id"] and st["lag_readings"] == 0, \
        f"after kill -9 of a drained gateway the cursor went back: {st}"

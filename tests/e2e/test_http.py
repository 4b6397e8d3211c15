"""HTTP endpoints (/healthz, /readyz, /metrics) and graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os

from support import SENML_JSON, Gateway, Metrics, connack_of, now_ms, unique_id, wait_until


def test_healthz_and_readyz(gw: Gateway):
    assert gw.http_get("/healthz").status_code == 200
    assert gw.http_get("/readyz").status_code == 200


def test_metrics_after_traffic(gateway_factory):
    gw: Gateway = gateway_factory()  # fresh counters
    good, disabled = gw.add_device(), gw.add_device()
    gw.cli("device", "disable", disabled.id)

    r = gw.http_get("/metrics")
    assert r.status_code == 200
    assert r.headers.get("content-type", "").startswith("text/plain"), r.headers

    with gw.connected_client(good, version=311) as c:
        wait_until(lambda: gw.metric("citygw_connected_devices", protocol="mqtt") == 1, 10,
                   desc="citygw_connected_devices{protocol=mqtt} == 1 while connected")
        assert c.publish(good.topic, json.dumps({"temperature": 20.5, "humidity": 40.0})) == 0
        assert c.publish(good.topic + SENML_JSON,
                         json.dumps([{"n": "noise", "u": "dB", "v": 50.0}])) == 0
        assert c.publish(good.topic, b'{"temperature": ') == 0      # malformed
    wait_until(lambda: gw.metric("citygw_connected_devices", protocol="mqtt") == 0, 10,
               desc="citygw_connected_devices{protocol=mqtt} == 0 after disconnect")

    assert connack_of(gw, 311, good.id, good.id, "wrong") == 0x04
    ghost = unique_id("ghost")
    assert connack_of(gw, 311, ghost, ghost, "x") == 0x05
    assert connack_of(gw, 5, disabled.id, disabled.id, disabled.secret) == 0x87
    assert connack_of(gw, 5, good.id, None, None) == 0x87

    gw.wait_metric("citygw_auth_failures_total", 4, protocol="mqtt")
    m: Metrics = gw.metrics()
    for name in ("citygw_messages_received_total", "citygw_messages_rejected_total",
                 "citygw_readings_stored_total", "citygw_connected_devices",
                 "citygw_auth_failures_total", "citygw_store_commit_seconds_bucket",
                 "citygw_store_commit_seconds_sum", "citygw_store_commit_seconds_count"):
        assert name in m.names(), f"{name} missing from /metrics:\n{m.text[:3000]}"
    assert m.value("citygw_messages_received_total", protocol="mqtt") >= 3
    assert m.value("citygw_readings_stored_total") == 3
    assert m.value("citygw_messages_rejected_total", protocol="mqtt", reason="malformed_json") == 1
    for reason in ("bad_credentials", "unknown_device", "disabled_device", "anonymous"):
        assert m.value("citygw_auth_failures_total", protocol="mqtt", reason=reason) == 1, reason
    assert m.value("citygw_store_commit_seconds_count") >= 1
    assert m.has("citygw_store_commit_seconds_bucket", le="+Inf")


def test_process_and_store_memory_are_exported(gateway_factory):
    """What an operator sizes a node by: the process series agree with the kernel's own view of
    the gateway process, and the store's unflushed write buffers show once readings are stored."""
    gw: Gateway = gateway_factory()
    d = gw.add_device()
    with gw.connected_client(d, version=5) as c:
        assert c.publish(d.topic, json.dumps({"temperature": 20.5})) == 0
    pid = gw.proc.pid
    # Refreshed with the other gauges every 5 s.
    wait_until(lambda: gw.metric("citygw_store_write_buffer_bytes") > 0, 15,
               desc="citygw_store_write_buffer_bytes > 0 after a stored reading")
    m: Metrics = gw.metrics()
    soft_nofile = next(int(line.split()[3]) for line in open(f"/proc/{pid}/limits")
                       if line.startswith("Max open files"))
    assert m.value("process_max_fds") == soft_nofile
    open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    assert 0 < m.value("process_open_fds") <= open_fds + 16, (m.value("process_open_fds"), open_fds)
    rss_kib = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status")
                   if line.startswith("VmRSS:"))
    exported = m.value("process_resident_memory_bytes") / 1024
    assert 0.5 * rss_kib < exported < 2 * rss_kib, (exported, rss_kib)
    assert m.value("citygw_mqtt_session_limit") < soft_nofile


def test_sigterm_graceful_shutdown_keeps_acknowledged_reading(gateway_factory):
    gw: Gateway = gateway_factory()
    d = gw.add_device()
    ts = now_ms() - 1000
    c = gw.connected_client(d, version=5)
    try:
        assert c.publish(d.topic, json.dumps({"ts": ts, "temperature": 18.25})) == 0
        code = gw.terminate(timeout=30)
        assert code == 0, f"citygw exited {code} on SIGTERM, want 0"
        assert c.wait_disconnected(10), "the MQTT session is closed by the shutdown"
    finally:
        c.close()
    gw.start()
    rs = gw.readings(d.id)
    assert [(r["quantity"], r["value"], r["device_time_ms"]) for r in rs] == [
        ("temperature", 18.25, ts)]
    assert connack_of(gw, 311, d.id, d.id, d.secret) == 0
    assert gw.terminate() == 0

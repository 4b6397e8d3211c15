"""MQTT sessions are capped below the process's open-files limit, so a flood of connections can
never take the descriptors the store needs: beyond the cap a device is refused (CONNACK 0x87,
counted as `session_limit`) and everyone already connected keeps publishing durably.

The cap is `min(mqtt.max_connections, open files - 1280 - 2 x mqtt.max_handshaking)`; the
gateway runs here under RLIMIT_NOFILE 1310 with 5 handshakes, so it holds exactly 20 sessions.
"""

from __future__ import annotations

import json

from support import now_ms, wait_until

OPEN_FILES, HANDSHAKES = 1310, 5
CAP = OPEN_FILES - 1280 - 2 * HANDSHAKES


def test_sessions_beyond_the_descriptor_budget_are_refused_and_the_store_keeps_working(
        gateway_factory):
    gw = gateway_factory(open_files=OPEN_FILES,
                         env={"CITYGW_MQTT__MAX_HANDSHAKING": str(HANDSHAKES)})
    assert gw.metric("citygw_mqtt_session_limit") == CAP
    devices = [gw.add_device() for _ in range(CAP + 1)]
    clients = [gw.connected_client(d) for d in devices[:CAP]]
    try:
        extra = gw.mqtt_client(devices[CAP])
        assert extra.connect() == 0x87, "a session beyond the cap must be refused"
        extra.close()
        assert gw.metric("citygw_auth_failures_total", protocol="mqtt",
                         reason="session_limit") == 1

        # Every connected device still gets durable acknowledgements.
        for i, (device, client) in enumerate(zip(devices, clients)):
            body = json.dumps({"ts": now_ms(), "temperature": 20 + i})
            assert client.publish(device.topic, body) == 0
        for i, device in enumerate(devices[:CAP]):
            assert [r["value"] for r in gw.readings(device.id)] == [20 + i]

        # A session that ends frees its place.
        clients.pop().close()

        def late_device_connects() -> bool:
            late = gw.mqtt_client(devices[CAP])
            try:
                return late.connect() == 0
            finally:
                late.close()
        wait_until(late_device_connects, 10, desc="a freed session slot accepts the next device")
    finally:
        for c in clients:
            c.close()

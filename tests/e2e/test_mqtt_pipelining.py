"""Pipelined QoS 1: one connection has up to `mqtt.max_inflight` (64) messages in the gateway at
once, and its PUBACKs still leave in the order the PUBLISH packets arrived (MQTT 3.1.1 and 5,
section 4.6), each only once its reading is durable; a refused message in the middle of a burst
gets its own reason code without disturbing the acknowledgements around it.

Clients are paho-mqtt with their own in-flight window; paho reports PUBACKs in the order they
arrive, and its message ids grow in publish order.
"""

from __future__ import annotations

import json

from support import Gateway

WINDOW = 64


def commit_stats(gw: Gateway) -> tuple[float, float]:
    m = gw.metrics()
    return (m.value("citygw_store_commit_batch_size_sum"),
            m.value("citygw_store_commit_batch_size_count"))


def vehicle_counts(gw: Gateway, device_id: str) -> list[int]:
    return sorted(int(r["value"]) for r in gw.readings(device_id)
                  if r["quantity"] == "vehicle_count")


def test_pubacks_follow_publish_order_with_64_in_flight(gw: Gateway):
    dev = gw.add_device(kind="traffic")
    n = 3000
    sum0, count0 = commit_stats(gw)
    with gw.connected_client(dev, version=5, max_inflight=WINDOW) as c:
        results = c.publish_many(dev.topic,
                                 (json.dumps({"seq": i, "vehicle_count": i}) for i in range(n)),
                                 max_inflight=WINDOW, timeout=120)
        order = list(c.ack_order)
        codes = [code for code, _ in results]
    assert codes == [0] * n, f"failure PUBACKs: {[(i, c) for i, c in enumerate(codes) if c]}"
    assert len(order) == n
    assert order == sorted(order), (
        "PUBACKs out of publish order, first inversion at "
        f"{next(i for i in range(1, n) if order[i] < order[i - 1])}")
    assert vehicle_counts(gw, dev.id) == list(range(n)), "every acknowledged message stored once"
    # Only this connection published meanwhile: commits holding several requests prove that
    # its messages were in the gateway side by side, not one at a time.
    sum1, count1 = commit_stats(gw)
    per_commit = (sum1 - sum0) / max(1.0, count1 - count0)
    assert per_commit > 2, f"{per_commit:.2f} messages per group commit from one connection"


def test_refused_messages_mid_burst_get_their_codes_in_place(gw: Gateway):
    dev = gw.add_device(kind="traffic")
    n = 200
    base = dev.topic
    # position -> (topic, payload, MQTT 5 PUBACK code, dead-letter reason)
    bad = {
        37: (base, b'{"vehicle_count": ', 0x99, "malformed_json"),
        80: (f"devices/{dev.id}/status", b'{"vehicle_count": 1}', 0x90, "bad_topic"),
        81: (base + "/xml", b"<vehicle_count>1</vehicle_count>", 0x99, "unknown_format"),
        150: (base, b'{"vehicle_count": "' + b"x" * (300 * 1024) + b'"}', 0x99,
              "payload_too_large"),
    }
    mids: list[int] = []
    with gw.connected_client(dev, version=5, max_inflight=WINDOW) as c:
        for i in range(n):
            topic, payload, _, _ = bad.get(i, (base, json.dumps({"seq": i, "vehicle_count": i})
                                               .encode(), 0, None))
            info = c.publish_async(topic, payload)
            assert info.rc == 0
            mids.append(info.mid)
        codes = [c.wait_ack(mid, timeout=60) for mid in mids]
        order = list(c.ack_order)
        assert not c.disconnected.is_set(), "refusals never close an MQTT 5 connection"
    assert order == mids, "PUBACKs in publish order, refused ones in their place"
    for i, code in enumerate(codes):
        want = bad[i][2] if i in bad else 0
        assert code == want, f"message {i}: PUBACK {code}, want {want:#04x}"
    good = [i for i in range(n) if i not in bad]
    assert vehicle_counts(gw, dev.id) == good
    assert sorted(d["reason"] for d in gw.deadletters(dev.id)) == sorted(
        r for *_, r in bad.values())


def test_spoofed_publish_mid_burst_closes_a_311_connection_after_the_ones_before_it(gw: Gateway):
    dev = gw.add_device(kind="traffic")
    other = gw.add_device(kind="traffic")
    n, spoofed = 120, 70
    mids: list[int] = []
    with gw.connected_client(dev, version=311, max_inflight=WINDOW) as c:
        for i in range(n):
            topic = other.topic if i == spoofed else dev.topic
            info = c.publish_async(topic, json.dumps({"seq": i, "vehicle_count": i}))
            mids.append(info.mid)
        assert c.wait_disconnected(30), "MQTT 3.1.1 cannot refuse in a PUBACK: the gateway closes"
        order = list(c.ack_order)
    # Everything before the spoofed message was answered, in order, before the close; nothing
    # from the spoofed one on (those published after it may have been stored, unacknowledged:
    # the device sends them again).
    assert order == mids[:spoofed]
    stored = vehicle_counts(gw, dev.id)
    assert stored[:spoofed] == list(range(spoofed))
    assert spoofed not in stored
    assert not vehicle_counts(gw, other.id), "nothing stored under the spoofed identity"

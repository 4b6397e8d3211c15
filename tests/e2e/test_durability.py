"""Crash durability: a QoS 1 PUBACK means the reading is stored.

Several paho clients (MQTT 3.1.1 and 5) publish QoS 1 messages, each with a unique sequence
number; the gateway is killed with SIGKILL in mid-stream and restarted on the same data dir;
every reading whose PUBACK a client received must be in the store. Three crash cycles on one
data dir, so recovery after a crash is itself crashed.

Each client keeps 100 messages in flight, more than the gateway's window (`mqtt.max_inflight`,
64): up to 64 per connection are being stored side by side when the kill lands, the rest wait in
the socket, and the PUBACKs a client saw came in publish order.
"""

from __future__ import annotations

import json
import threading

from support import Gateway, MqttClient, wait_until

CLIENTS = (311, 5, 311, 5)
CYCLES = 3
KILL_AFTER_ACKS = 1000        # PUBACKs seen (all clients) before each kill
SEQ_STRIDE = 100_000          # cycle k publishes seq k*SEQ_STRIDE, k*SEQ_STRIDE+1, ...
MAX_PER_CLIENT = 30_000       # safety bound per cycle (mids stay unique below 65535)
MAX_OUTSTANDING = 100         # published but not yet acknowledged, per client


class Publisher(threading.Thread):
    def __init__(self, client: MqttClient, topic: str, first_seq: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.c, self.topic, self.first_seq, self.stop = client, topic, first_seq, stop
        self.sent: dict[int, int] = {}    # seq -> mid
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for seq in range(self.first_seq, self.first_seq + MAX_PER_CLIENT):
                if self.stop.is_set() or self.c.disconnected.is_set():
                    return
                info = self.c.publish_async(self.topic,
                                            json.dumps({"seq": seq, "vehicle_count": seq}))
                if info.rc != 0:
                    return
                self.sent[seq] = info.mid
                with self.c._cv:
                    self.c._cv.wait_for(
                        lambda: len(self.sent) - len(self.c.acks) < MAX_OUTSTANDING
                        or self.stop.is_set() or self.c.disconnected.is_set(), 10)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def acked(self) -> set[int]:
        with self.c._cv:
            acks = dict(self.c.acks)
            order = list(self.c.ack_order)
        bad = {mid: code for mid, code in acks.items() if code != 0}
        assert not bad, f"PUBACKs with failure codes: {bad}"
        assert order == sorted(order), "PUBACKs arrive in publish order"
        return {seq for seq, mid in list(self.sent.items()) if mid in acks}


def publish_then_kill(gw: Gateway, devices, cycle: int) -> tuple[dict, dict]:
    """One cycle: all clients publish until KILL_AFTER_ACKS PUBACKs, then SIGKILL the gateway.
    Returns (acked, sent): device id -> set of seq."""
    stop = threading.Event()
    clients = [gw.connected_client(d, version=v, max_inflight=MAX_OUTSTANDING)
               for d, v in zip(devices, CLIENTS)]
    pubs = [Publisher(c, d.topic, cycle * SEQ_STRIDE, stop) for c, d in zip(clients, devices)]
    try:
        for p in pubs:
            p.start()
        wait_until(lambda: sum(len(p.c.acks) for p in pubs) >= KILL_AFTER_ACKS, 120,
                   interval=0.005, desc=f"{KILL_AFTER_ACKS} PUBACKs before the kill")
        gw.kill9()
        for c in clients:
            assert c.wait_disconnected(10), "clients notice the gateway is gone"
        stop.set()
        for p in pubs:
            p.join(10)
            assert p.error is None, p.error
    finally:
        stop.set()
        for c in clients:
            c.close()
    acked = {d.id: p.acked() for d, p in zip(devices, pubs)}
    sent = {d.id: set(p.sent) for d, p in zip(devices, pubs)}
    total_acked = sum(len(a) for a in acked.values())
    assert total_acked >= KILL_AFTER_ACKS
    assert sum(len(s) for s in sent.values()) > total_acked, \
        "the kill should land mid-stream, with publishes still unacknowledged"
    return acked, sent


def test_kill9_mid_stream_loses_no_acknowledged_reading(gateway_factory):
    gw: Gateway = gateway_factory()
    devices = [gw.add_device(kind="traffic") for _ in CLIENTS]
    acked_all = {d.id: set() for d in devices}
    sent_all = {d.id: set() for d in devices}

    for cycle in range(CYCLES):
        acked, sent = publish_then_kill(gw, devices, cycle)
        gw.start()  # same data dir
        for d in devices:
            acked_all[d.id] |= acked[d.id]
            sent_all[d.id] |= sent[d.id]
            rs = gw.readings(d.id)
            stored = [int(r["value"]) for r in rs if r["quantity"] == "vehicle_count"]
            print(f"cycle {cycle} {d.id}: sent {len(sent[d.id])}, acked {len(acked[d.id])}, "
                  f"stored in all {len(stored)}")
            missing = acked_all[d.id] - set(stored)
            assert not missing, (
                f"cycle {cycle}, {d.id}: {len(missing)} acknowledged readings lost after kill -9, "
                f"e.g. seq {sorted(missing)[:10]} (acked {len(acked_all[d.id])}, "
                f"stored {len(stored)})")
            assert set(stored) <= sent_all[d.id], "nothing stored that was never sent"
            assert len(stored) == len(set(stored)), "no reading stored twice"
            assert all(r["device_seq"] == r["value"] for r in rs), "seq kept as device_seq"

    # reading ids: unique store-wide, and a later cycle never reuses or goes below earlier ids
    by_cycle: dict[int, list[int]] = {}
    ids: list[int] = []
    for d in devices:
        for r in gw.readings(d.id):
            by_cycle.setdefault(int(r["value"]) // SEQ_STRIDE, []).append(r["id"])
            ids.append(r["id"])
    assert len(ids) == len(set(ids)), "reading ids are unique across crashes"
    for k in range(1, CYCLES):
        if by_cycle.get(k) and by_cycle.get(k - 1):
            assert min(by_cycle[k]) > max(by_cycle[k - 1]), \
                f"ids after crash {k} restart below ids before it"

    # the registry survived too: the devices connect again and keep publishing
    with gw.connected_client(devices[0], version=5) as c:
        assert c.publish(devices[0].topic, json.dumps({"seq": 10**7, "vehicle_count": 1})) == 0

"""Crash consistency: SIGKILL at random points, many times, on one data dir.

Each cycle restarts the gateway on the same data dir and kills it with SIGKILL after a random
delay, while MQTT 5 clients publish QoS 1 readings (unique sequence numbers, a window of PUBACKs
in flight), one of them also publishing undecodable payloads (each PUBACKed with 0x99 only once its
dead letter is durable) and the admin API adds devices (registry records). Some cycles kill the
process while it is still starting (journal replay). After every restart the store must open, and
hold every reading acknowledged so far, exactly once, with unique ids; every acknowledged refusal has its dead letter; every added device is there.

CI runs CYCLES cycles with a fixed seed; `CITYGW_CRASH_CYCLES=200 CITYGW_CRASH_SEED=$RANDOM` runs
longer elsewhere.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

from support import CliError, wait_until

CYCLES = int(os.environ.get("CITYGW_CRASH_CYCLES", "10"))
SEED = int(os.environ.get("CITYGW_CRASH_SEED", "19"))
WINDOW = 20  # PUBACKs awaited at once per client


class Publisher(threading.Thread):
    """Publishes until stopped or disconnected; remembers which seqs were acknowledged how."""

    def __init__(self, client, topic: str, first_seq: int, bad_every: int = 0):
        super().__init__(daemon=True)
        self.c, self.topic, self.seq, self.bad_every = client, topic, first_seq, bad_every
        self.sent: dict[int, tuple[int, bool]] = {}  # mid -> (seq, bad)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.c.disconnected.is_set():
            bad = self.bad_every and self.seq % self.bad_every == 0
            payload = b"\xff not json" if bad else json.dumps(
                {"seq": self.seq, "vehicle_count": self.seq})
            try:
                info = self.c.publish_async(self.topic, payload)
            except Exception:  # noqa: BLE001 - the connection went away with the process
                return
            if info.rc != 0:
                return
            self.sent[info.mid] = (self.seq, bool(bad))
            self.seq += 1
            with self.c._cv:
                self.c._cv.wait_for(lambda: len(self.sent) - len(self.c.acks) < WINDOW
                                    or self.stop.is_set() or self.c.disconnected.is_set(), 5)

    def acknowledged(self) -> tuple[list[int], list[int]]:
        """(stored seqs in PUBACK order, dead-lettered seqs)."""
        with self.c._cv:
            acks = dict(self.c.acks)
            times = dict(self.c.ack_times)
        good, bad = [], []
        for mid in sorted(acks, key=lambda m: times.get(m, 0)):
            seq, is_bad = self.sent[mid]
            code = acks[mid]
            if is_bad:
                assert code == 0x99, f"undecodable payload acked with {code:#x}"
                bad.append(seq)
            else:
                assert code == 0, f"reading {seq} acked with {code:#x}"
                good.append(seq)
        return good, bad


def test_sigkill_at_random_points(gateway_factory):
    rng = random.Random(SEED)
    gw = gateway_factory()
    devs = [gw.add_device(), gw.add_device()]
    added = {d.id for d in devs}
    acked: dict[str, list[int]] = {d.id: [] for d in devs}
    dead: dict[str, set[int]] = {d.id: set() for d in devs}
    next_seq = {d.id: 1 for d in devs}
    kills = {"starting": 0, "serving": 0}

    for cycle in range(CYCLES):
        if cycle and rng.random() < 0.25:
            # Killed while starting: the journal replay itself is cut.
            try:
                gw.start(timeout=0)  # spawned; not waiting for it to be ready
            except AssertionError:
                pass
            time.sleep(rng.uniform(0.0, 0.3))
            gw.kill9()
            kills["starting"] += 1
        if not gw.running:
            gw.start()
        pubs = []
        for i, d in enumerate(devs):
            c = gw.connected_client(d, version=5)
            p = Publisher(c, d.topic, next_seq[d.id], bad_every=17 if i == 1 else 0)
            p.start()
            pubs.append((d, c, p))
        wait_until(lambda: all(len(c.acks) >= 1 for _, c, _ in pubs), timeout=30,
                   desc="first PUBACKs of the cycle")
        deadline = time.monotonic() + rng.uniform(0.02, 0.8)
        while time.monotonic() < deadline:
            try:
                added.add(gw.add_device().id)
            except CliError:
                break
        gw.kill9()
        kills["serving"] += 1
        for d, c, p in pubs:
            p.stop.set()
            p.join(10)
            good, bad = p.acknowledged()
            acked[d.id] += good
            dead[d.id] |= set(bad)
            next_seq[d.id] = p.seq + 1
            c.close()

        gw.start()  # the store opens after every kill
        _check(gw, acked, dead, added, cycle)
        gw.kill9()

    assert kills["serving"] == CYCLES
    assert sum(len(v) for v in acked.values()) > 100 * CYCLES // 2, "too little load to mean much"


def _check(gw, acked, dead, added, cycle) -> None:
    for device_id, seqs in acked.items():
        stored = sorted(gw.readings(device_id), key=lambda r: r["id"])
        got = [r["device_seq"] for r in stored if r["quantity"] == "vehicle_count"]
        assert len(got) == len(set(got)), f"cycle {cycle}: a reading stored twice"
        missing = set(seqs) - set(got)
        assert not missing, f"cycle {cycle}: {len(missing)} acknowledged readings lost: " \
                            f"{sorted(missing)[:10]}"
        letters = gw.deadletters(device_id, limit=100_000)
        assert len(letters) >= len(dead[device_id]), \
            f"cycle {cycle}: {len(dead[device_id])} refusals acked, {len(letters)} dead letters"
    listed = {d["id"] for d in gw.cli("device", "list")}
    assert added <= listed, f"cycle {cycle}: devices lost: {sorted(added - listed)[:5]}"

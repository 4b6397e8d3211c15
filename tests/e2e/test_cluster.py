"""Cluster mode (issue 16): three `citygw run` nodes on a real 3-node NATS JetStream cluster
(nats-server from PyPI, `sync_interval: always`), all on loopback.

One NATS cluster, one VictoriaMetrics and three gateways serve the whole module (CI time); tests
that kill or stop a node bring it back before they end. Device ids are unique per test.

What a city operator would notice, checked end to end with real clients:
- any node accepts any device; a reading ingested on one node reaches an agency subscription,
  `citygw readings` and the KPI on every node, with the same ids; resume by id on another node
  is exact;
- `device disable` on node A closes the device's live session on node B within a second and
  refuses it there;
- a CoAP retransmission reaching other nodes (one after another, or two at once) is answered
  2.04 everywhere and stored once;
- one node at a time bridges a LoRaWAN network server's broker; every uplink is stored once,
  and when that node is killed -9 mid-burst another takes over its broker session, losing
  nothing;
- kill -9 of a gateway node under load (paho publishers on all three nodes, devices move to a
  survivor): every PUBACKed reading reaches a subscription on a survivor; duplicates are counted
  and reported, not hidden;
- kill -9 of the stream's leader NATS node under load: nothing acknowledged is lost;
- kill -9 of the NATS server holding nodes' registry watches: changes still reach them at once;
- two of three NATS nodes stopped: no success PUBACK, `/readyz` 503; restarted: ingestion
  resumes without restarting citygw;
- VictoriaMetrics ends with every reading after the node forwarding it is killed.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from types import SimpleNamespace

import pytest
import requests

from support import Device, Gateway, GatewayFactory, now_ms, unique_id, wait_until
from support.coap import CF_JSON, RawCoap, post_msg
from support.lorawan import (Brokers, chirpstack_topic, chirpstack_uplink, lorawan_toml,
                             new_dev_eui, wait_bridge_connected)
from support.nats import NatsCluster
from support.tsdb import Stores, vm_sink

LEASE_SECS = 3


@pytest.fixture(scope="module")
def cluster_nats():
    nats = NatsCluster().start()
    try:
        yield nats
    finally:
        nats.close()


@pytest.fixture(scope="module")
def cluster_stores():
    stores = Stores("cluster")
    try:
        yield stores
    finally:
        stores.close()


@pytest.fixture(scope="module")
def cluster_gateways():
    factory = GatewayFactory("cluster")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def cluster_brokers():
    brokers = Brokers("cluster")
    try:
        yield brokers
    finally:
        brokers.close()


@pytest.fixture(scope="module")
def cl(cluster_nats, cluster_stores, cluster_gateways, cluster_brokers):
    """The module's cluster; the fixtures above are what conftest attaches logs from. Every node
    forwards to one VictoriaMetrics and bridges one LoRaWAN network server's broker."""
    vm = cluster_stores.victoria_metrics()
    ns_broker = cluster_brokers.mosquitto()
    gws = [cluster_gateways(config_toml=vm_sink(vm) + lorawan_toml(ns_broker), env={
        "CITYGW_CLUSTER__BACKEND": "jetstream",
        "CITYGW_CLUSTER__NATS_URLS": cluster_nats.urls,
        "CITYGW_CLUSTER__NODE_NAME": f"gw{i + 1}",
        "CITYGW_CLUSTER__LEASE_SECS": str(LEASE_SECS),
        "CITYGW_CLUSTER__ACK_TIMEOUT_MS": "3000",
        "CITYGW_COAP__PLAIN_ENABLED": "true",
    }) for i in range(3)]
    return SimpleNamespace(nats=cluster_nats, vm=vm, gws=gws, ns_broker=ns_broker,
                           ns=cluster_brokers.publisher(ns_broker))


def payload(seq: int) -> str:
    return json.dumps({"seq": seq, "values": {"pm2_5": seq}})


def status(gw: Gateway) -> dict:
    return gw.cli("cluster", "status")


def ensure_up(cl) -> None:
    """Brings back whatever a test stopped: NATS nodes, then gateways; waits until ready."""
    for n in cl.nats.nodes:
        if not n.running:
            n.start()
    wait_until(lambda: all(n.healthy() for n in cl.nats.nodes), 60, desc="NATS nodes healthy")
    for g in cl.gws:
        if not g.running:
            g.start(timeout=90)
    for g in cl.gws:
        g.wait_ready(60)


class Publisher(threading.Thread):
    """A device publishing `seq` 1..n at QoS 1 through paho with a window in flight; when its
    node goes away it reconnects to the next gateway of `route` and resends what was not
    PUBACKed. `acked` holds every seq that got a success PUBACK."""

    def __init__(self, device: Device, route: list[Gateway], n: int, window: int = 10,
                 deadline_s: float = 120):
        super().__init__(daemon=True)
        self.device, self.route, self.n, self.window = device, route, n, window
        self.deadline = time.monotonic() + deadline_s
        self.acked: set[int] = set()
        self.refused = 0
        self.error: str | None = None

    def run(self) -> None:
        remaining = list(range(1, self.n + 1))
        hop = 0
        while remaining and time.monotonic() < self.deadline:
            gw = self.route[hop % len(self.route)]
            if not gw.running:
                hop += 1
                continue
            c = gw.mqtt_client(self.device, version=5)
            try:
                if c.connect() != 0:
                    hop += 1
                    time.sleep(0.2)
                    continue
                results = c.publish_many(self.device.topic, [payload(s) for s in remaining],
                                         max_inflight=self.window, timeout=60)
            except Exception as e:  # noqa: BLE001 - a dying node can fail a call anywhere
                self.error = repr(e)
                results = []
            finally:
                c.close()
            for (code, _), seq in zip(results, remaining):
                if code == 0:
                    self.acked.add(seq)
                elif code is not None:
                    self.refused += 1
            remaining = [s for s in remaining if s not in self.acked]
            if remaining:
                hop += 1
                time.sleep(0.1)

    def finish(self, timeout: float = 150) -> None:
        self.join(timeout)
        assert not self.is_alive(), f"{self.device.id} still publishing after {timeout}s"


def known_everywhere(cl, devices: list[Device] = (), agencies: list = (),
                     timeout: float = 10) -> None:
    """Waits until every node has applied these registry changes: a test's set-up, not the
    promise (milliseconds normally; the test host may be loaded, or NATS re-electing after the
    previous test). `reaches_within` measures the promise."""
    def applied() -> bool:
        for g in cl.gws:
            if any(g.cli_raw("device", "show", d.id).returncode != 0 for d in devices):
                return False
            names = {a["name"] for a in g.cli("agency", "list")} if agencies else set()
            if any(a.name not in names for a in agencies):
                return False
        return True
    wait_until(applied, timeout, interval=0.05, desc="registry changes on every node")


def reaches_within(probe, t0: float, promise: float, what: str) -> float:
    """The issue's promise "a change on one node reaches all nodes within a second", measured:
    the first `probe` (a CLI call to another node) that sees the change must have been issued
    within `promise` seconds of `t0`. Keeps probing up to 10 s so a failure says how late it was;
    a probe's own run time (spawning the CLI on a loaded host) is not counted against the node."""
    while True:
        issued = time.monotonic()
        if probe():
            delay = issued - t0
            assert delay <= promise, f"{what} after {delay:.2f} s (promise: {promise} s)"
            return delay
        assert issued - t0 < 10, f"{what}: not there after 10 s"
        time.sleep(0.02)


def subscribe_all(telemetry, gw: Gateway, token: str, devices: list[Device]):
    client = telemetry(gw, token)
    return client.subscribe({"device_ids": [d.id for d in devices]}, after_id=0)


def check_delivered(sub, publishers: list[Publisher], timeout: float = 60) -> int:
    """Waits until every PUBACKed (device, seq) is in the subscription; checks id order;
    returns the number of duplicates (a message stored, its PUBACK lost with the node, resent)."""
    want = {(p.device.id, s) for p in publishers for s in p.acked}

    def have(rs):
        return want <= {(r.device_id, r.device_seq) for r in rs}

    got = sub.wait_for(have, timeout, desc=f"{len(want)} acknowledged readings")
    ids = [r.id for r in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "ids out of order or repeated"
    keys = [(r.device_id, r.device_seq) for r in got]
    return len(keys) - len(set(keys))


def test_every_node_serves_everything(cl, telemetry):
    gw1, gw2, gw3 = cl.gws
    st = status(gw3)
    assert st["backend"] == "jetstream" and st["healthy"], st
    assert st["replicas"] == 3 and st["leader"], st
    assert sorted(n["name"] for n in st["nodes"]) == ["gw1", "gw2", "gw3"], st["nodes"]
    assert len(st["stream_replicas"]) == 3, st

    # Provisioned on node 1, known to nodes 2 and 3 within a second.
    dev = gw1.add_device()
    t0 = time.monotonic()
    for g in (gw2, gw3):
        reaches_within(lambda g=g: g.cli_raw("device", "show", dev.id).returncode == 0, t0, 1.0,
                       f"{dev.id} on {g.name}")
    agency = gw1.add_agency()
    known_everywhere(cl, agencies=[agency])
    sub3 = subscribe_all(telemetry, gw3, agency.token, [dev])

    # Ingested on nodes 2 and 1.
    with gw2.connected_client(dev) as c:
        for s in range(1, 6):
            assert c.publish(dev.topic, payload(s)) == 0
    with gw1.connected_client(dev) as c:
        for s in range(6, 11):
            assert c.publish(dev.topic, payload(s)) == 0
    got = sub3.wait_count(10)
    assert [r.device_seq for r in got] == list(range(1, 11))
    ids = [r.id for r in got]
    assert ids == sorted(ids)

    # The same readings, with the same ids, on every node.
    def stored(g):
        return [(r["id"], r["device_seq"]) for r in g.readings(dev.id)]
    wait_until(lambda: all(len(stored(g)) == 10 for g in cl.gws), 10, desc="10 readings on every node")
    assert stored(gw1) == stored(gw2) == stored(gw3)
    assert [i for i, _ in stored(gw1)] == ids

    # Resume by id on another node: exactly the readings after it.
    sub1 = telemetry(gw1, agency.token).subscribe({"device_ids": [dev.id]}, after_id=ids[4])
    assert [r.device_seq for r in sub1.wait_count(5)] == list(range(6, 11))

    # Last seen (the KPI's input) is the same on every node.
    seen = {g.name: g.cli("device", "show", dev.id)["last_seen_time_ms"] for g in cl.gws}
    assert len(set(seen.values())) == 1 and next(iter(seen.values())) > 0, seen


def test_disable_on_one_node_refuses_on_another(cl):
    gw1, gw2, _ = cl.gws
    dev = gw1.add_device()
    t0 = time.monotonic()
    reaches_within(lambda: gw2.cli_raw("device", "show", dev.id).returncode == 0, t0, 1.0,
                   "device known on gw2")
    c = gw2.connected_client(dev)
    try:
        assert c.publish(dev.topic, payload(1)) == 0
        t0 = time.monotonic()
        gw1.cli("device", "disable", dev.id)
        assert c.wait_disconnected(1.0), "live session on gw2 not closed within 1 s of disable on gw1"
        assert time.monotonic() - t0 < 1.5
    finally:
        c.close()
    again = gw2.mqtt_client(dev, version=5)
    try:
        assert again.connect() == 0x87, "disabled device accepted on another node"
    finally:
        again.close()


def lease_holder(gw: Gateway, name: str) -> str | None:
    """The node holding the lease `name` ("sink/vm", "lorawan/ns1"), as `gw` sees it."""
    return next((lease["node"] for lease in status(gw)["sink_leases"] if lease["sink"] == name),
                None)


def test_lorawan_bridge_on_one_node_fails_over_without_loss(cl):
    """One node at a time bridges the network server's broker (a lease; the same client id and
    broker session on every node). Every uplink is stored once, copies included; when the
    bridging node is killed -9 in the middle of a burst, another node takes over its broker
    session and everything the broker held (queued, or delivered but not acknowledged) is
    stored, each uplink once."""
    def bridging() -> list[Gateway]:
        return [g for g in cl.gws
                if g.running and g.metric("citygw_lorawan_connected", server="ns1") == 1]
    holder = wait_until(lambda: (lambda b: b[0] if len(b) == 1 else None)(bridging()),
                        6 * LEASE_SECS, desc="exactly one node bridging ns1")
    assert lease_holder(cl.gws[0], "lorawan/ns1") == node_name(holder)
    eui = new_dev_eui()
    dev = cl.gws[0].add_device(kind="water_meter", dev_eui=eui, codec="lpp")
    known_everywhere(cl, [dev])

    def uplinks(counters, t0):
        return [(chirpstack_topic(eui), chirpstack_uplink(
            eui, f_cnt=c, time_ms=t0 + c * 1000, data=bytes([1, 0x67, 0, c % 250])
        ).SerializeToString()) for c in counters]

    def frame_counters(g) -> collections.Counter:
        return collections.Counter(r["device_seq"] for r in g.readings(dev.id)
                                   if r["quantity"] == "frame_counter")
    # Every uplink twice, as a network server retrying: stored once.
    first = uplinks(range(1, 21), now_ms() - 3_600_000)
    cl.ns.publish_many(first + first)
    wait_until(lambda: set(frame_counters(holder)) == set(range(1, 21)), 30,
               desc="20 uplinks stored")

    # A burst, and the bridging node killed in the middle of it.
    burst = range(21, 621)
    stored = wait_until(lambda: sum(frame_counters(holder).values()), 10)
    cl.ns.publish_many(uplinks(burst, now_ms() - 1_800_000))
    wait_until(lambda: sum(frame_counters(holder).values()) >= stored + 100, 60, interval=0.01,
               desc="part of the burst stored")
    holder.kill9()
    try:
        survivor = next(g for g in cl.gws if g.running)
        successor = wait_until(lambda: (lambda b: b[0] if len(b) == 1 else None)(bridging()),
                               10 * LEASE_SECS, desc="another node bridging ns1")
        assert successor is not holder
        wait_until(lambda: set(frame_counters(survivor)) == set(range(1, 621)), 120,
                   interval=0.5, desc="every uplink of the burst stored after the failover")
        fc = frame_counters(survivor)
        assert max(fc.values()) == 1, f"stored twice: {[c for c, n in fc.items() if n > 1][:10]}"
        print(f"LoRaWAN failover {node_name(holder)} -> {node_name(successor)}: 620 uplinks "
              f"stored once; JetStream duplicates (redelivered after the kill): "
              f"{sum(g.metric('citygw_cluster_duplicates_total') for g in cl.gws if g.running)}")
    finally:
        ensure_up(cl)


def test_coap_retransmission_on_other_nodes_is_stored_once(cl):
    """A CoAP device whose ACK was lost retransmits the same datagram (message id, token,
    payload); behind a UDP balancer the copy can reach another node, or two nodes at once. Every
    copy is answered 2.04 and the message is stored once (JetStream's content id)."""
    gw1, gw2, gw3 = cl.gws
    dev = gw1.add_device()
    known_everywhere(cl, [dev])
    dups = sum(g.metric("citygw_cluster_duplicates_total") for g in cl.gws)
    body = json.dumps({"ts": now_ms() - 5000, "temp": 21.5, "hum": 63.25}).encode()
    m = post_msg(dev, body, mid=0x5A17, token=b"\x07\x08", content_format=CF_JSON)
    with RawCoap(gw1) as c:
        assert c.request(m).code_str == "2.04"
    # The copy on node 2, then on nodes 2 and 3 at the same moment.
    with RawCoap(gw2) as c:
        assert c.request(m).code_str == "2.04"
    with RawCoap(gw2) as c2, RawCoap(gw3) as c3:
        c2.send(m.encode())
        c3.send(m.encode())
        answers = [c2.recv(), c3.recv()]
    assert [a.code_str if a else None for a in answers] == ["2.04", "2.04"], answers
    wait_until(lambda: sum(g.metric("citygw_cluster_duplicates_total") for g in cl.gws)
               >= dups + 3, 10, desc="three copies recognised by JetStream")
    # A new message id is a new message.
    with RawCoap(gw3) as c:
        assert c.request(post_msg(dev, body, mid=0x5A18, content_format=CF_JSON)).code_str == "2.04"
    for g in cl.gws:
        wait_until(lambda g=g: len(g.readings(dev.id)) >= 4, 10, desc=f"readings on {node_name(g)}")
        rs = g.readings(dev.id)
        assert len(rs) == 4 and sorted(r["quantity"] for r in rs) == [
            "humidity", "humidity", "temperature", "temperature"], (node_name(g), rs)


def test_kill9_gateway_node_under_load(cl, telemetry):
    gw1, gw2, gw3 = cl.gws
    devices = [gw1.add_device() for _ in range(6)]
    agency = gw1.add_agency()
    known_everywhere(cl, devices, [agency])
    sub = subscribe_all(telemetry, gw1, agency.token, devices)
    n = 400
    # Two devices per node; those on gw3 move to gw1, then gw2, when gw3 dies.
    routes = [[gw1, gw2], [gw2, gw1], [gw3, gw1, gw2]]
    pubs = [Publisher(d, routes[i % 3], n) for i, d in enumerate(devices)]
    for p in pubs:
        p.start()
    victims = [p for i, p in enumerate(pubs) if i % 3 == 2]
    wait_until(lambda: all(len(p.acked) >= 50 for p in victims), 60, desc="load on gw3")
    gw3.kill9()
    for p in pubs:
        p.finish()
    assert all(len(p.acked) == n for p in pubs), [(p.device.id, len(p.acked), p.error) for p in pubs]
    dups = check_delivered(sub, pubs)
    print(f"kill -9 gw3 under load: {6 * n} PUBACKed, {dups} duplicates (resent after the kill)")
    # The killed node comes back and catches up to the same copy.
    gw3.start(timeout=90)
    first = devices[2]
    wait_until(lambda: len(gw3.readings(first.id)) == len(gw1.readings(first.id)), 30,
               desc="gw3 caught up")
    assert [r["id"] for r in gw3.readings(first.id)] == [r["id"] for r in gw1.readings(first.id)]


def stream_leader(cl) -> str:
    """The NATS server leading the readings stream ("" while an election runs)."""
    return status(cl.gws[0])["leader"]


def test_kill9_stream_leader_nats_node_under_load(cl, telemetry):
    gw1, gw2, gw3 = cl.gws
    devices = [gw1.add_device() for _ in range(3)]
    agency = gw1.add_agency()
    known_everywhere(cl, devices, [agency])
    sub = subscribe_all(telemetry, gw2, agency.token, devices)
    pubs = [Publisher(d, [g], 300) for d, g in zip(devices, cl.gws)]
    for p in pubs:
        p.start()
    wait_until(lambda: all(len(p.acked) >= 40 for p in pubs), 60, desc="load running")
    leader = cl.nats.node(wait_until(lambda: stream_leader(cl), 10, desc="a stream leader"))
    leader.kill9()
    for p in pubs:
        p.finish()
    try:
        assert all(len(p.acked) == 300 for p in pubs), [(p.device.id, len(p.acked)) for p in pubs]
        dups = check_delivered(sub, pubs)
        print(f"kill -9 stream leader {leader.name}: 900 PUBACKed, {dups} duplicates")
        wait_until(lambda: stream_leader(cl) not in ("", leader.name), 30,
                   desc="a new stream leader")
    finally:
        ensure_up(cl)


def node_name(gw: Gateway) -> str:
    return gw.env()["CITYGW_CLUSTER__NODE_NAME"]


def watch_placement(cl) -> tuple[dict[str, str], str, str]:
    """Which NATS server hosts each gateway's records-bucket watch (an ephemeral consumer that
    lives on one server), which leads the JetStream meta group and which the bucket; read from
    the servers' monitoring endpoints: a consumer's deliver subject is one of its gateway's
    subscriptions."""
    owner, hosts, meta, bucket = {}, {}, "", ""
    servers = [n for n in cl.nats.nodes if n.running]
    for n in servers:
        conns = requests.get(f"http://127.0.0.1:{n.monitor_port}/connz?subs=detail", timeout=5)
        for c in conns.json().get("connections", []):
            for sub in c.get("subscriptions_list_detail") or []:
                owner[sub["subject"]] = c.get("name", "").removeprefix("citygw-")
    for n in servers:
        jsz = requests.get(f"http://127.0.0.1:{n.monitor_port}/jsz?accounts=true&streams=true"
                           "&consumers=true&config=true", timeout=5).json()
        meta = jsz.get("meta_cluster", {}).get("leader") or meta
        for acc in jsz.get("account_details", []):
            for st in acc.get("stream_detail", []):
                if st["name"] != "KV_citygw_records":
                    continue
                bucket = st.get("cluster", {}).get("leader") or bucket
                for co in st.get("consumer_detail") or []:
                    gw = owner.get(co.get("config", {}).get("deliver_subject"))
                    if gw and co.get("config", {}).get("description") == "kv watch consumer":
                        hosts[gw] = co.get("cluster", {}).get("leader", n.name)
    return hosts, meta, bucket


def test_registry_changes_survive_the_loss_of_a_watch_server(cl):
    """A node's registry watch is a consumer on one NATS server; when that server dies, the
    node must not go deaf to registry changes until the client's heartbeat check notices (5 to
    10 s, then a retry: CI once saw a change take > 1 s): it notices within half a second and
    replaces the watch as soon as NATS places the new one on a live server (a second or two;
    5 s allowed for a loaded host)."""
    ensure_up(cl)
    names = {node_name(g) for g in cl.gws}

    def placed():
        hosts, meta, bucket = watch_placement(cl)
        return (hosts, meta, bucket) if set(hosts) == names and meta and bucket else None
    for attempt in range(4):
        hosts, meta, bucket = wait_until(placed, 30, interval=0.2,
                                         desc="every gateway's records watch")
        # Not the meta leader: without it no watch can be created until an election ends
        # (seconds), which is NATS's recovery time, not the gateway's. Best a server leading
        # nothing (the bucket's leader: the write below waits for its election first).
        victims = sorted(set(hosts.values()) - {meta, bucket}) or sorted(set(hosts.values()) - {meta})
        if victims:
            break
        # Every watch sits on the meta leader: move one by restarting its gateway.
        cl.gws[attempt % 3].restart(timeout=90)
    assert victims, f"every records watch stays on the meta leader {meta}: {hosts}"
    victim = cl.nats.node(victims[0])
    deaf = [g for g in cl.gws if hosts[node_name(g)] == victim.name]
    writer = next((g for g in cl.gws if g not in deaf), cl.gws[0])
    victim.kill9()
    try:
        # The write itself may wait for the bucket's new leader; then it returns once applied
        # on the writer.
        dev = wait_until(writer.add_device, 30, interval=0.5, desc="a device added")
        t0 = time.monotonic()
        delays = {node_name(g): round(reaches_within(
            lambda g=g: g.cli_raw("device", "show", dev.id).returncode == 0, t0, 5.0,
            f"{dev.id} on {node_name(g)} after {victim.name} died"), 2)
            for g in deaf if g is not writer}
        known_everywhere(cl, [dev])
        print(f"kill -9 {victim.name} (watches of {[node_name(g) for g in deaf]}, written on "
              f"{node_name(writer)}): registry change seen after {delays} s")
    finally:
        ensure_up(cl)


def test_quorum_loss_refuses_then_resumes_without_restart(cl):
    gw1, gw2, _ = cl.gws
    dev = gw1.add_device()
    # Set-up after the previous test restarted a NATS node; the promise is measured elsewhere.
    known_everywhere(cl, [dev])
    stopped = cl.nats.nodes[1:]
    try:
        for n in stopped:
            n.stop()
        for g in (gw1, gw2):
            wait_until(lambda g=g: g.http_get("/readyz").status_code == 503, 30,
                       desc=f"{g.name} /readyz 503 without quorum")
        assert "quorum" in gw1.http_get("/readyz").text or "jetstream" in gw1.http_get("/readyz").text
        c = gw2.mqtt_client(dev, version=5)
        try:
            rc = c.connect()
            if rc == 0:
                code = c.publish(dev.topic, payload(1), timeout=30)
                assert code != 0, "a success PUBACK without JetStream quorum"
        finally:
            c.close()
        assert gw1.metric("citygw_cluster_healthy") == 0
    finally:
        for n in stopped:
            n.start()
    for g in (gw1, gw2):
        wait_until(lambda g=g: g.http_get("/readyz").status_code == 200, 60,
                   desc=f"{g.name} ready again")

    def publishes():
        with gw2.connected_client(dev) as c:
            return c.publish(dev.topic, payload(2), timeout=10) == 0
    wait_until(publishes, 30, interval=0.5, desc="PUBACK 0 after quorum returned")
    wait_until(lambda: any(r["device_seq"] == 2 for r in gw1.readings(dev.id)), 10,
               desc="reading stored after recovery")
    assert all(g.running for g in cl.gws), "citygw was restarted"


def test_sink_forwarded_once_and_fails_over(cl):
    ensure_up(cl)
    gw1 = cl.gws[0]
    # After the previous test's quorum loss the buckets may still be electing leaders; the admin
    # API says "unavailable" meanwhile, as an operator would see it.
    dev = wait_until(gw1.add_device, 30, interval=0.5, desc="a device added")
    known_everywhere(cl, [dev])
    holder_name = wait_until(lambda: lease_holder(gw1, "sink/vm"), 3 * LEASE_SECS,
                             desc="a node forwards the sink")
    holder = next(g for g in cl.gws if g.env()["CITYGW_CLUSTER__NODE_NAME"] == holder_name)
    other = next(g for g in cl.gws if g is not holder)
    match = f'{{__name__="pm2_5_value",device="{dev.id}"}}'
    with other.connected_client(dev) as c:
        for s in range(1, 101):
            assert c.publish(dev.topic, payload(s)) == 0
    try:
        cl.vm.wait_samples(match, 100, timeout=30)
    except AssertionError:
        for g in cl.gws:
            print(g.name, json.dumps(status(g))[:3000])
            print(g.cli("sink", "status"))
        raise
    holder.kill9()
    try:
        with other.connected_client(dev) as c:
            for s in range(101, 201):
                assert c.publish(dev.topic, payload(s)) == 0
        samples = cl.vm.wait_samples(match, 200, timeout=10 * LEASE_SECS)
        values = sorted({v for _, _, v in samples})
        assert values == [float(s) for s in range(1, 201)], f"missing: {set(range(1, 201)) - set(map(int, values))}"
        assert lease_holder(other, "sink/vm") not in (None, holder_name), status(other)
    finally:
        ensure_up(cl)


def test_console_overview_lists_the_cluster_nodes(cl):
    """The operator console of any node shows the cluster: every node, healthy, with the stream
    and which node forwards each sink."""
    gw = cl.gws[1]
    s = requests.Session()
    r = s.post(gw.http_base + "/console/api/session", json={"token": gw.token}, timeout=10)
    assert r.status_code == 200, r.text

    def settled():
        c = s.get(gw.http_base + "/console/api/overview", timeout=10).json()["cluster"]
        names = sorted(n["name"] for n in c["nodes"])
        return c if (names == ["gw1", "gw2", "gw3"] and c["healthy"]
                     and all(n["healthy"] for n in c["nodes"])
                     and [lease["sink"] for lease in c["sink_leases"]] == ["vm"]) else None
    c = wait_until(settled, 30, desc="three healthy nodes and the vm sink's lease on the overview")
    assert c["backend"] == "jetstream" and c["node"] == "gw2" and c["replicas"] == 3
    assert [n["name"] for n in c["nodes"] if n["this_node"]] == ["gw2"]
    assert c["sink_leases"][0]["node"] in ("gw1", "gw2", "gw3"), c
    assert c["leader"], "a stream leader is named"


def test_stream_cap_refuses_then_resumes_without_restart(cl, cluster_gateways):
    """JetStream's own limit (issue 19): a stream at `cluster.stream_max_bytes` refuses new
    readings (never deletes acknowledged ones), `/readyz` says so, and raising the cap (here: a
    node started with a larger one updates the stream) makes the running node ingest again."""
    def env(node: str, cap: int) -> dict[str, str]:
        return {
            "CITYGW_CLUSTER__BACKEND": "jetstream",
            "CITYGW_CLUSTER__NATS_URLS": cl.nats.urls,
            "CITYGW_CLUSTER__NODE_NAME": node,
            "CITYGW_CLUSTER__STREAM": "CAPPED_READINGS",
            "CITYGW_CLUSTER__SUBJECT_PREFIX": "citygw.capped",
            "CITYGW_CLUSTER__RECORDS_BUCKET": "capped_records",
            "CITYGW_CLUSTER__LEASES_BUCKET": "capped_leases",
            "CITYGW_CLUSTER__STREAM_MAX_BYTES": str(cap),
            "CITYGW_CLUSTER__ACK_TIMEOUT_MS": "3000",
        }
    gw = cluster_gateways(env=env("cap1", 64 * 1024))
    dev = gw.add_device()
    acked: set[int] = set()
    refused = 0
    seq = 0
    with gw.connected_client(dev, version=5) as c:
        while not refused:
            assert seq < 5000, "64 KiB of readings never refused"
            batch = list(range(seq + 1, seq + 201))
            seq += 200
            for (code, _), s in zip(c.publish_many(dev.topic, [payload(s) for s in batch],
                                                   max_inflight=20), batch):
                if code == 0:
                    acked.add(s)
                else:
                    assert code == 0x80, f"reading {s} refused with {code:#x}"
                    refused += 1
    assert acked, "nothing acknowledged before the cap"
    wait_until(lambda: gw.http_get("/readyz").status_code == 503, 10,
               desc="/readyz 503 at the stream's cap")
    assert "is full" in gw.http_get("/readyz").text
    assert gw.metric("citygw_cluster_healthy") == 0

    # The operator raises the cap: a node started with a larger one updates the stream.
    gw2 = cluster_gateways(env=env("cap2", 4 * 1024 * 1024))
    try:
        wait_until(lambda: gw.http_get("/readyz").status_code == 200, 15,
                   desc="the running node ready again once the stream has room")
        with gw.connected_client(dev, version=5) as c:
            assert c.publish(dev.topic, payload(seq + 1), timeout=10) == 0
        acked.add(seq + 1)
        for g in (gw, gw2):
            wait_until(lambda g=g: acked <= {r["device_seq"] for r in g.readings(dev.id)}, 30,
                       desc=f"every acknowledged reading on {g.name}")
        assert gw.starts == 1, "citygw was restarted"
    finally:
        gw2.close()
        gw.close()

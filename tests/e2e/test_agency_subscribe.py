"""Live subscriptions of the agency API (`citygw.v1.Telemetry/Subscribe`, and the same tests
again through `SubscribeBatches`, which must deliver exactly the same readings in batches).

Peers: mosquitto_pub publishes as the devices (QoS 1: a PUBACK means stored); a grpcio client
generated from proto/ subscribes with an agency token. Every test gets its own tenant, agency
and devices on the module's gateway.

"Nothing else arrived" is checked without waiting on the clock: readings come in id (commit)
order, so once a subscription has received the last reading it should get, anything it must
not get but was published earlier would already be in front of it.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from support import Gateway, has_ipv6_loopback, now_ms, publish_json, unique_id, wait_until
from support.telemetry import summarise, value_of, wait_for_subscribers

PROTOCOL_MQTT = 1

C1, C2 = "00004", "00008"                      # 2025 commune codes (Ha Noi)
BBOX = (21.00, 105.80, 21.10, 105.90)          # min_lat, min_lon, max_lat, max_lon
INSIDE = (21.0285, 105.8542)
OUTSIDE = (21.20, 105.50)


@pytest.fixture(params=[False, True], ids=["Subscribe", "SubscribeBatches"])
def batched(request) -> bool:
    return request.param


def in_bbox(loc) -> bool:
    return loc is not None and BBOX[0] <= loc[0] <= BBOX[2] and BBOX[1] <= loc[1] <= BBOX[3]


class Published:
    """What the devices published, as the readings an agency should see: one entry per value,
    with the message's index so order is checked per message (a message's own values are
    readings with consecutive ids, in no promised order among themselves)."""

    UNITS = {"temperature": "Cel", "humidity": "%RH", "pm2_5": "ug/m3", "noise": "dBA"}
    NAMES = {"temp": "temperature", "hum": "humidity", "pm25": "pm2_5"}

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.rows: list[dict] = []
        self.messages = 0
        self.seq: dict[str, int] = {}
        self.window: tuple[int, int] = (0, 0)

    def publish(self, dev, registered: dict, lat_lon=None, **values) -> None:
        seq = self.seq[dev.id] = self.seq.get(dev.id, 0) + 1
        ts = now_ms() - 5000 + self.messages
        payload = {"ts": ts, "seq": seq, **values}
        if lat_lon is not None:
            payload["lat"], payload["lon"] = lat_lon
        t0 = now_ms()
        publish_json(self.gw, dev, payload)
        t1 = now_ms()
        self.window = (self.window[0] or t0, t1)
        loc = lat_lon if lat_lon is not None else registered.get("loc")
        for key, value in values.items():
            q = self.NAMES.get(key, key)
            self.rows.append(dict(msg=self.messages, device_id=dev.id, seq=seq, ts=ts,
                                  quantity=q, value=value, unit=self.UNITS.get(q, ""), loc=loc,
                                  tenant=registered["tenant"], kind=registered["kind"],
                                  commune=registered["commune"]))
        self.messages += 1

    def expected(self, match) -> list[dict]:
        return [r for r in self.rows if match(r)]


def key(row: dict) -> tuple:
    return (row["device_id"], row["seq"], row["quantity"], row["value"], row["unit"])


def reading_key(r) -> tuple:
    return (r.device_id, r.device_seq, r.quantity, value_of(r), r.unit)


def check_stream(name: str, got: list, expected: list[dict], published: Published) -> None:
    """`got` is exactly `expected`: same readings, values, units, registry fields and location,
    in id order, message by message."""
    ids = [r.id for r in got]
    assert ids == sorted(set(ids)), f"{name}: ids not strictly increasing: {ids}"
    by_key = {key(e): e for e in expected}
    unexpected = [r for r in got if reading_key(r) not in by_key]
    assert not unexpected, f"{name}: received readings outside the filter: {summarise(unexpected)}"
    assert sorted(reading_key(r) for r in got) == sorted(by_key), (
        f"{name}: expected {sorted(by_key)}, got {summarise(got)}")
    msgs = [by_key[reading_key(r)]["msg"] for r in got]
    assert msgs == sorted(msgs), f"{name}: readings out of publish order (message indexes {msgs})"
    lo, hi = published.window
    for r in got:
        e = by_key[reading_key(r)]
        assert (r.tenant, r.kind, r.commune_code) == (e["tenant"], e["kind"], e["commune"]), r
        assert r.protocol == PROTOCOL_MQTT, r
        assert r.device_time_ms == e["ts"], r
        assert lo - 50 <= r.received_time_ms <= hi + 50, (lo, r, hi)
        if e["loc"] is None:
            assert not r.HasField("location"), r
        else:
            assert (r.location.lat, r.location.lon) == pytest.approx(e["loc"]), r


def test_filtered_subscriptions_receive_exactly_the_matching_readings(gw: Gateway, telemetry, batched):
    tenant, other_tenant = unique_id("city"), unique_id("city")
    agency = gw.add_agency(tenants=[tenant], kinds=["*"])
    reg = {
        "A": dict(tenant=tenant, kind="air_quality", commune=C1, loc=INSIDE),
        "B": dict(tenant=tenant, kind="air_quality", commune=C2, loc=OUTSIDE),
        "N": dict(tenant=tenant, kind="noise", commune=C1, loc=None),
        "X": dict(tenant=other_tenant, kind="air_quality", commune=C1, loc=INSIDE),
    }
    devs = {}
    for name, r in reg.items():
        lat_lon = r["loc"] or (None, None)
        devs[name] = gw.add_device(tenant=r["tenant"], kind=r["kind"], commune=r["commune"],
                                   lat=lat_lon[0], lon=lat_lon[1])
    A, B, N, X = (devs[n] for n in "ABNX")

    api = telemetry(gw, agency.token)
    filters = {
        "device+quantity": (dict(device_ids=[A.id], quantities=["temperature"]),
                            lambda r: r["device_id"] == A.id and r["quantity"] == "temperature"),
        "kind": (dict(kinds=["noise"]), lambda r: r["kind"] == "noise"),
        "commune+quantities": (dict(commune_codes=[C1], quantities=["temperature", "humidity"]),
                               lambda r: r["commune"] == C1 and r["quantity"] in ("temperature", "humidity")),
        "bbox": (dict(bbox=BBOX), lambda r: in_bbox(r["loc"])),
        "tenant+quantity": (dict(tenants=[tenant], quantities=["pm2_5"]),
                            lambda r: r["quantity"] == "pm2_5"),
        "unfiltered": ({}, lambda r: True),
    }
    streamed0 = gw.metric("citygw_readings_streamed_total", agency=agency.name)
    subs = {name: api.subscribe(f, batched=batched) for name, (f, _) in filters.items()}
    wait_for_subscribers(gw, agency.name, len(subs))

    pub = Published(gw)
    pub.publish(X, reg["X"], temp=30.0, hum=70.0, pm25=40.0)          # another tenant
    pub.publish(A, reg["A"], temp=21.5, hum=60.25, pm25=12.5)
    pub.publish(B, reg["B"], temp=22.0, status="ok")                  # text value
    pub.publish(N, reg["N"], noise=61.2)
    pub.publish(B, reg["B"], lat_lon=(21.05, 105.85), temp=23.5)      # B's position, inside the bbox
    pub.publish(A, reg["A"], lat_lon=(21.30, 105.30), temp=19.0)      # A's position, outside it
    pub.publish(N, reg["N"], noise=58.0, door_open=True)              # boolean value
    pub.publish(X, reg["X"], temp=31.0)
    pub.publish(N, reg["N"], temp=25.0)
    pub.publish(A, reg["A"], temp=21.75, hum=61.0, pm25=13.0)

    in_scope = lambda r: r["tenant"] == tenant  # noqa: E731 - what the agency may see at all
    total = 0
    for name, (_, match) in filters.items():
        expected = pub.expected(lambda r: in_scope(r) and match(r))
        assert expected, name
        last = key(expected[-1])
        got = subs[name].wait_for(lambda rs: any(reading_key(r) == last for r in rs),
                                  desc=f"{name}: its last reading {last}")
        check_stream(name, got, expected, pub)
        total += len(got)

    # a spot check of the values and units as a user sees them
    unfiltered = subs["unfiltered"].snapshot()
    first_a = [r for r in unfiltered if r.device_id == A.id and r.device_seq == 1]
    assert {(r.quantity, r.number, r.unit) for r in first_a} == {
        ("temperature", 21.5, "Cel"), ("humidity", 60.25, "%RH"), ("pm2_5", 12.5, "ug/m3")}
    text = [r for r in unfiltered if r.quantity == "status"]
    assert [(r.WhichOneof("value"), r.text) for r in text] == [("text", "ok")]
    flag = [r for r in unfiltered if r.quantity == "door_open"]
    assert [(r.WhichOneof("value"), r.boolean) for r in flag] == [("boolean", True)]
    assert not [r for r in unfiltered if r.tenant != tenant or r.device_id == X.id]

    assert gw.wait_metric("citygw_readings_streamed_total", streamed0 + total,
                          agency=agency.name) == streamed0 + total
    for s in subs.values():
        s.cancel()
    wait_for_subscribers(gw, agency.name, 0)


def test_subscription_without_resume_starts_with_readings_committed_after_it(gw: Gateway, telemetry, batched):
    tenant = unique_id("city")
    agency = gw.add_agency(tenants=[tenant], kinds=["water_level"])
    dev = gw.add_device(tenant=tenant, kind="water_level")
    publish_json(gw, dev, {"seq": 1, "level": 1.0}, {"seq": 2, "level": 1.1})
    sub = telemetry(gw, agency.token).subscribe(batched=batched)
    publish_json(gw, dev, {"seq": 3, "level": 1.2})
    got = sub.wait_device_seq(dev.id, 3)
    assert [(r.device_seq, r.quantity, r.number, r.unit) for r in got] == [(3, "water_level", 1.2, "m")]


class Trickle:
    """mosquitto_pub -l fed line by line from a thread: one device publishing `seqs` as a steady
    stream of QoS 1 messages (paced only to spread them over time; nothing depends on the pace)."""

    def __init__(self, gw: Gateway, dev, seqs: range, pace_s: float = 0.002):
        import shutil
        exe = shutil.which("mosquitto_pub")
        assert exe
        self.proc = subprocess.Popen(
            [exe, "-h", gw.host, "-p", str(gw.mqtt_port), "-V", "mqttv311", "-q", "1",
             "-i", dev.id, "-u", dev.id, "-P", dev.secret, "-t", dev.topic, "-l"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.seqs, self.pace = seqs, pace_s
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        assert self.proc.stdin is not None
        for seq in self.seqs:
            self.proc.stdin.write(f'{{"seq": {seq}, "level": {seq / 100}}}\n')
            self.proc.stdin.flush()
            time.sleep(self.pace)
        self.proc.stdin.close()

    def wait(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)
        rc = self.proc.wait(timeout)
        assert rc == 0, f"mosquitto_pub exited {rc}: {self.proc.stderr.read() if self.proc.stderr else ''}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_resume_after_id_delivers_every_missed_reading_once_then_live(gw: Gateway, telemetry, batched):
    tenant = unique_id("city")
    agency = gw.add_agency(tenants=[tenant], kinds=["water_level"])
    dev = gw.add_device(tenant=tenant, kind="water_level")
    other = gw.add_device(tenant=tenant, kind="water_level")   # same scope, not in the filter
    api = telemetry(gw, agency.token)
    flt = dict(device_ids=[dev.id])

    first = api.subscribe(flt, batched=batched)
    publish_json(gw, dev, *({"seq": s, "level": s / 100} for s in (1, 2, 3)))
    first.wait_device_seq(dev.id, 3)

    # the device keeps publishing (and so does another) while the client goes away and comes back
    trickles = [Trickle(gw, dev, range(4, 404)), Trickle(gw, other, range(1, 201))]
    try:
        first.wait_for(lambda rs: len(rs) >= 30, desc="30 readings before disconnecting")
        first.cancel()
        got1 = first.snapshot()
        last_id = got1[-1].id
        wait_for_subscribers(gw, agency.name, 0)
        # readings keep arriving while no one listens
        wait_until(lambda: len(gw.readings(dev.id)) >= min(403, len(got1) + 40), 30,
                   desc="40 more stored readings while disconnected")
        second = api.subscribe(flt, after_id=last_id, batched=batched)     # catch-up, probably while publishing
        for t in trickles:
            t.wait()
    finally:
        for t in trickles:
            t.kill()
    stored_while_resuming = len(gw.readings(dev.id))
    assert stored_while_resuming == 403
    second.wait_device_seq(dev.id, 403, timeout=30)
    publish_json(gw, dev, {"seq": 404, "level": 4.04}, {"seq": 405, "level": 4.05})   # live
    got2 = second.wait_device_seq(dev.id, 405)

    assert got2[0].id > last_id, (last_id, summarise(got2))
    if batched:
        # the catch-up came from the store a page at a time, not a reading at a time
        assert max(second.batches) > 1, second.batches
    both = got1 + got2
    seqs = [r.device_seq for r in both]
    assert seqs == list(range(1, 406)), (
        f"missing {sorted(set(range(1, 406)) - set(seqs))[:20]}, "
        f"duplicated {sorted(s for s in set(seqs) if seqs.count(s) > 1)[:20]}")
    ids = [r.id for r in both]
    assert ids == sorted(set(ids))
    assert {r.device_id for r in both} == {dev.id}
    assert [(r.number, r.unit) for r in got2[-2:]] == [(4.04, "m"), (4.05, "m")]


def test_resume_since_ms_replays_readings_received_from_then(gw: Gateway, telemetry, batched):
    tenant = unique_id("city")
    agency = gw.add_agency(tenants=[tenant], kinds=["*"])
    dev = gw.add_device(tenant=tenant, kind="water_level")
    publish_json(gw, dev, *({"seq": s, "level": s / 10} for s in (1, 2, 3)))
    r3 = gw.readings(dev.id)[-1]
    wait_until(lambda: now_ms() > r3["received_time_ms"] + 1, 5, desc="the clock to move past seq 3")
    publish_json(gw, dev, *({"seq": s, "level": s / 10} for s in (4, 5, 6)))
    stored = gw.readings(dev.id)
    since = next(r for r in stored if r["device_seq"] == 4)["received_time_ms"]
    # independent answer: what the store says was received at or after `since`
    expected = [r["device_seq"] for r in stored if r["received_time_ms"] >= since]
    assert expected == [4, 5, 6]

    api = telemetry(gw, agency.token)
    sub = api.subscribe(dict(device_ids=[dev.id]), since_ms=since, batched=batched)
    everything = api.subscribe(dict(device_ids=[dev.id]), after_id=0, batched=batched)
    sub.wait_device_seq(dev.id, 6)
    publish_json(gw, dev, {"seq": 7, "level": 0.7})
    got = sub.wait_device_seq(dev.id, 7)
    assert [(r.device_seq, r.number) for r in got] == [(4, 0.4), (5, 0.5), (6, 0.6), (7, 0.7)]
    assert all(r.received_time_ms >= since for r in got)
    all_got = everything.wait_device_seq(dev.id, 7)
    assert [r.device_seq for r in all_got] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_subscribe_over_ipv6_loopback(gateway_factory, telemetry):
    gw6 = gateway_factory(host="::1")
    tenant = unique_id("city")
    agency = gw6.add_agency(tenants=[tenant], kinds=["*"])
    dev = gw6.add_device(tenant=tenant, kind="air_quality")
    sub = telemetry(gw6, agency.token).subscribe()
    publish_json(gw6, dev, {"seq": 1, "pm25": 9.5})
    got = sub.wait_device_seq(dev.id, 1)
    assert [(r.quantity, r.number, r.unit) for r in got] == [("pm2_5", 9.5, "ug/m3")]

"""History of the agency API (`citygw.v1.Telemetry/QueryHistory`), raw and downsampled.

Devices publish (mosquitto_pub, QoS 1) records with explicit `ts`, so the test owns device time:
three devices of one tenant (two air-quality stations with temperature and humidity, one noise
meter), numbers mixed with text and boolean values, data before, inside and after the queried
range, published out of time order; a fourth device of another tenant publishes at the same
times and must never show up. Every expected answer (window statistics, order, limits) is
computed here from what was published, not read back from the gateway.
"""

from __future__ import annotations

import random
from collections import defaultdict

import grpc
import pytest

from support import Gateway, now_ms, publish_json, unique_id
from support.telemetry import rpc_error, value_of

MIN, HOUR = 60_000, 3_600_000
W1M, W15M, W1H = 1, 2, 3                      # AggregateWindow values
WINDOW_MS = {W1M: MIN, W15M: 15 * MIN, W1H: HOUR}
UNITS = {"temperature": "Cel", "humidity": "%RH", "noise": "dBA"}
NAMES = {"temp": "temperature", "hum": "humidity", "noise": "noise"}


class Dataset:
    def __init__(self, gw: Gateway):
        self.gw = gw
        self.tenant, self.other_tenant = unique_id("city"), unique_id("city")
        self.agency = gw.add_agency(tenants=[self.tenant], kinds=["*"])
        self.base = (now_ms() - 3 * HOUR) // HOUR * HOUR          # an hour boundary
        # the queried range: starts off a minute boundary, ends on a quarter-hour one
        self.from_ms = self.base + 30_000
        self.to_ms = self.base + 45 * MIN
        self.devices = {
            "A": gw.add_device(unique_id("aq"), tenant=self.tenant, kind="air_quality", commune="00004"),
            "B": gw.add_device(unique_id("aq"), tenant=self.tenant, kind="air_quality", commune="00008"),
            "N": gw.add_device(unique_id("noise"), tenant=self.tenant, kind="noise", commune="00004"),
            "X": gw.add_device(unique_id("aq"), tenant=self.other_tenant, kind="air_quality", commune="00004"),
        }
        self.kinds = {"A": "air_quality", "B": "air_quality", "N": "noise", "X": "air_quality"}
        self.rows: list[dict] = []       # one per published value

    def generate_and_publish(self) -> None:
        rng = random.Random(20261123)
        b, f, t = self.base, self.from_ms, self.to_ms
        # times that must be handled exactly: range edges, window edges, shared instants
        edges = [f - 1, f, f + 29_999, f + 30_000, b + 15 * MIN - 1, b + 15 * MIN, t - 1, t, t + 1,
                 b - 1, b + 7 * MIN, b + 7 * MIN]
        for name, dev in self.devices.items():
            times = edges + [rng.randrange(b - 10 * MIN, b + 55 * MIN) for _ in range(45)]
            rng.shuffle(times)                                   # published out of time order
            records = []
            for seq, ts in enumerate(times, start=1):
                rec: dict = {"ts": ts, "seq": seq}
                if name == "N":
                    rec["noise"] = round(rng.uniform(40, 90), 2)
                else:
                    rec["temp"] = round(rng.uniform(18, 36), 2)
                    if rng.random() < 0.7:
                        rec["hum"] = round(rng.uniform(40, 95), 1)
                r = rng.random()
                if r < 0.15:
                    rec["status"] = rng.choice(["ok", "degraded"])     # text: never aggregated
                elif r < 0.25:
                    rec["tamper"] = rng.random() < 0.5                  # boolean: neither
                records.append(rec)
                for k, v in rec.items():
                    if k in ("ts", "seq"):
                        continue
                    q = NAMES.get(k, k)
                    self.rows.append(dict(dev=name, device_id=dev.id, seq=seq, ts=ts, quantity=q,
                                          value=v, unit=UNITS.get(q, ""), kind=self.kinds[name],
                                          tenant=self.other_tenant if name == "X" else self.tenant))
            publish_json(self.gw, dev, *records)

    # -- independent answers
    def raw(self, match=lambda r: True, from_ms=None, to_ms=None) -> list[dict]:
        f = self.from_ms if from_ms is None else from_ms
        t = self.to_ms if to_ms is None else to_ms
        return [r for r in self.rows
                if r["tenant"] == self.tenant and f <= r["ts"] < t and match(r)]

    def aggregates(self, window_ms: int, match=lambda r: True, from_ms=None, to_ms=None) -> list[dict]:
        groups: dict[tuple, list[float]] = defaultdict(list)
        for r in self.raw(match, from_ms, to_ms):
            if isinstance(r["value"], bool) or not isinstance(r["value"], (int, float)):
                continue
            start = r["ts"] // window_ms * window_ms
            groups[(start, r["device_id"], r["quantity"])].append(float(r["value"]))
        out = []
        for (start, dev, q), vs in sorted(groups.items()):
            out.append(dict(start=start, device_id=dev, quantity=q, count=len(vs), min=min(vs),
                            max=max(vs), mean=sum(vs) / len(vs)))
        return out


@pytest.fixture(scope="module")
def data(gw: Gateway) -> Dataset:
    d = Dataset(gw)
    d.generate_and_publish()
    return d


def check_aggregates(got, expected: list[dict], window_ms: int, data: Dataset) -> None:
    summary = [(r.aggregate.window_start_ms, r.device_id, r.quantity, r.aggregate.count) for r in got]
    want = [(e["start"], e["device_id"], e["quantity"], e["count"]) for e in expected]
    assert summary == want, f"windows/devices/quantities/counts differ:\n got {summary}\nwant {want}"
    by_id = {d.id: n for n, d in data.devices.items()}
    for r, e in zip(got, expected):
        a = r.aggregate
        assert r.HasField("aggregate"), r
        assert a.window_ms == window_ms
        assert (a.min, a.max) == (e["min"], e["max"]), (r, e)
        assert a.mean == pytest.approx(e["mean"], rel=1e-12), (r, e)
        assert r.WhichOneof("value") == "number" and r.number == pytest.approx(e["mean"], rel=1e-12)
        assert r.device_time_ms == e["start"], r
        assert r.unit == UNITS[r.quantity], r
        assert (r.tenant, r.kind) == (data.tenant, data.kinds[by_id[r.device_id]]), r


def test_downsampled_1m_windows_match_independent_statistics(data: Dataset, telemetry):
    api = telemetry(data.gw, data.agency.token)
    got = api.history(from_ms=data.from_ms, to_ms=data.to_ms, every=W1M)
    expected = data.aggregates(MIN)
    assert len({e["device_id"] for e in expected}) == 3 and len(expected) > 60
    check_aggregates(got, expected, MIN, data)


def test_downsampled_15m_windows_with_filters(data: Dataset, telemetry):
    api = telemetry(data.gw, data.agency.token)
    got = api.history(from_ms=data.from_ms, to_ms=data.to_ms, every=W15M)
    expected = data.aggregates(15 * MIN)
    assert len({e["start"] for e in expected}) == 3
    check_aggregates(got, expected, 15 * MIN, data)

    A, N = data.devices["A"], data.devices["N"]
    got = api.history(dict(device_ids=[A.id, N.id], quantities=["temperature", "noise"]),
                      from_ms=data.from_ms, to_ms=data.to_ms, every=W15M)
    expected = data.aggregates(15 * MIN, lambda r: r["device_id"] in (A.id, N.id)
                               and r["quantity"] in ("temperature", "noise"))
    check_aggregates(got, expected, 15 * MIN, data)

    got = api.history(dict(kinds=["noise"]), from_ms=data.base - HOUR, to_ms=data.base + HOUR,
                      every=W1H)
    expected = data.aggregates(HOUR, lambda r: r["kind"] == "noise", data.base - HOUR, data.base + HOUR)
    assert [e["start"] for e in expected] == [data.base - HOUR, data.base]
    check_aggregates(got, expected, HOUR, data)


def test_raw_history_is_ordered_by_device_time_and_honours_limit(data: Dataset, telemetry):
    gw = data.gw
    api = telemetry(gw, data.agency.token)
    count0 = gw.metric("citygw_query_seconds_count", method="query_history")
    got = api.history(from_ms=data.from_ms, to_ms=data.to_ms)
    expected = data.raw()
    keys = [(r.device_time_ms, r.id) for r in got]
    assert keys == sorted(keys), "raw history not ordered by device time, then id"
    assert len(set(r.id for r in got)) == len(got)
    got_rows = sorted((r.device_id, r.device_seq, r.device_time_ms, r.quantity, value_of(r), r.unit)
                      for r in got)
    want_rows = sorted((e["device_id"], e["seq"], e["ts"], e["quantity"], e["value"], e["unit"])
                       for e in expected)
    assert got_rows == want_rows
    assert not any(r.HasField("aggregate") for r in got)
    assert data.devices["X"].id not in {r.device_id for r in got}
    assert min(r.device_time_ms for r in got) == data.from_ms        # inclusive
    assert max(r.device_time_ms for r in got) == data.to_ms - 1      # exclusive

    # limit: the first N of the same answer
    assert [r.id for r in api.history(from_ms=data.from_ms, to_ms=data.to_ms, limit=7)] == \
        [r.id for r in got[:7]]
    agg = api.history(from_ms=data.from_ms, to_ms=data.to_ms, every=W1M)
    limited = api.history(from_ms=data.from_ms, to_ms=data.to_ms, every=W1M, limit=5)
    assert [(r.device_id, r.quantity, r.aggregate.window_start_ms) for r in limited] == \
        [(r.device_id, r.quantity, r.aggregate.window_start_ms) for r in agg[:5]]

    # one quantity of one device over its whole life
    B = data.devices["B"]
    hum = api.history(dict(device_ids=[B.id], quantities=["humidity"]),
                      from_ms=data.base - HOUR, to_ms=data.base + HOUR)
    want = sorted((e["ts"], e["value"]) for e in data.rows
                  if e["device_id"] == B.id and e["quantity"] == "humidity")
    assert [(r.device_time_ms, r.number) for r in hum] == want

    assert gw.wait_metric("citygw_query_seconds_count", count0 + 5, method="query_history") >= count0 + 5


@pytest.mark.parametrize("span", [0, -1], ids=["from==to", "from>to"])
def test_empty_or_inverted_range_is_invalid_argument(data: Dataset, telemetry, span):
    api = telemetry(data.gw, data.agency.token)
    err = rpc_error(lambda: api.history(from_ms=data.from_ms, to_ms=data.from_ms + span))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err

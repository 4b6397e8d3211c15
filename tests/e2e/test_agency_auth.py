"""Who may read what through the agency API: tokens, scopes, revocation, config-file agencies.

Every refusal is checked for its gRPC status code and for what it lets through: a refused
Subscribe delivers no reading, and an agency's unfiltered calls never return another tenant's
(or another kind's) devices or readings. Positive controls (an all-tenant agency seeing the same
data) make sure the data an agency must not see really exists.
"""

from __future__ import annotations

import hashlib
import secrets

import grpc
import pytest

from support import CliError, Gateway, now_ms, publish_json, unique_id, wait_until
from support.telemetry import SLOW_READER_OPTIONS, rpc_error, summarise, wait_for_subscribers

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
C1 = "00004"
HOUR = 3_600_000


def every_call(api, flt=None):
    """One attempt at each Telemetry method, returning the RpcError each ends with (a refused
    Subscribe or SubscribeBatches must also deliver nothing)."""
    errors = {}
    for method, batched in (("Subscribe", False), ("SubscribeBatches", True)):
        sub = api.subscribe(flt, wait=False, batched=batched)
        errors[method] = sub.wait_ended()
        assert sub.snapshot() == [], f"a refused {method} delivered {summarise(sub.snapshot())}"
    errors["QueryHistory"] = rpc_error(lambda: api.history(flt, from_ms=0, to_ms=now_ms()))
    errors["ListDevices"] = rpc_error(lambda: api.list_devices(flt))
    return errors


@pytest.fixture(scope="module")
def scene(gw: Gateway):
    """Two tenants with look-alike devices (same kind, commune and position)."""
    t1, t2 = unique_id("hanoi"), unique_id("hcmc")
    loc = dict(lat=21.0285, lon=105.8542)
    mine = [gw.add_device(f"{t1}-aq-{i}", tenant=t1, kind="air_quality", commune=C1, **loc)
            for i in range(3)]
    my_noise = gw.add_device(f"{t1}-noise", tenant=t1, kind="noise", commune=C1, **loc)
    theirs = [gw.add_device(f"{t2}-aq-{i}", tenant=t2, kind="air_quality", commune=C1, **loc)
              for i in range(2)]
    return dict(t1=t1, t2=t2, mine=mine, my_noise=my_noise, theirs=theirs)


def test_missing_wrong_and_admin_tokens_are_unauthenticated(gw: Gateway, telemetry, scene):
    dev = scene["mine"][0]
    failures0 = gw.metric("citygw_api_auth_failures_total", api="telemetry")
    for label, token in [("no token", None), ("wrong token", "not-a-token-" + secrets.token_hex(8)),
                         ("admin token", gw.token)]:
        api = telemetry(gw, token)
        errors = every_call(api)
        errors["GetDevice"] = rpc_error(lambda: api.get_device(dev.id))
        got = {m: e.code() for m, e in errors.items()}
        assert got == dict.fromkeys(got, UNAUTHENTICATED), f"{label}: {got}"
    # a token in the wrong scheme is no bearer token
    api = telemetry(gw, None)
    api.metadata = (("authorization", f"Basic {gw.token}"),)
    assert rpc_error(lambda: api.list_devices()).code() == UNAUTHENTICATED
    # unknown tokens (wrong, admin) on the five methods are counted
    gw.wait_metric("citygw_api_auth_failures_total", failures0 + 10, api="telemetry")


def test_filters_outside_the_scope_are_permission_denied_and_named(gw: Gateway, telemetry, scene):
    t1, t2 = scene["t1"], scene["t2"]
    agency = gw.add_agency(unique_id("env"), tenants=[t1], kinds=["air_quality"])
    api = telemetry(gw, agency.token)
    unknown = unique_id("no-such-device")
    cases = [
        (dict(tenants=[t2]), f'tenant "{t2}"'),
        (dict(tenants=[t1, t2]), f'tenant "{t2}"'),
        (dict(kinds=["noise"]), '"noise"'),
        (dict(device_ids=[scene["theirs"][0].id]), f'device "{scene["theirs"][0].id}"'),
        (dict(device_ids=[scene["mine"][0].id, scene["my_noise"].id]), f'device "{scene["my_noise"].id}"'),
        (dict(device_ids=[unknown]), f'device "{unknown}"'),
    ]
    for flt, named in cases:
        for method, err in every_call(api, flt).items():
            assert err.code() == PERMISSION_DENIED, (flt, method, err.code(), err.details())
            assert named in err.details() and agency.name in err.details(), (flt, method, err.details())
    # out of scope and unknown look alike: an agency cannot probe for device ids
    for dev_id in (scene["theirs"][0].id, scene["my_noise"].id, unknown):
        err = rpc_error(lambda: api.get_device(dev_id))
        assert err.code() == PERMISSION_DENIED, (dev_id, err)
        assert err.details() == f'device "{dev_id}" is outside agency "{agency.name}"\'s scope'
    # naming what is in scope is fine
    mine = scene["mine"][0]
    assert [d.id for d in api.list_devices(dict(tenants=[t1], kinds=["air_quality"],
                                                device_ids=[mine.id]))] == [mine.id]


def test_an_agency_never_sees_another_tenants_devices_or_readings(gw: Gateway, telemetry, scene):
    t1 = scene["t1"]
    mine, theirs, my_noise = scene["mine"], scene["theirs"], scene["my_noise"]
    agency = gw.add_agency(unique_id("hanoi-env"), tenants=[t1], kinds=["air_quality"])
    city = gw.add_agency(unique_id("ops"), tenants=["*"], kinds=["*"])   # the positive control
    api, ops = telemetry(gw, agency.token), telemetry(gw, city.token)

    # filters that never name the other tenant, but whose other fields match its devices
    flts = {"unfiltered": None, "commune": dict(commune_codes=[C1]),
            "bbox": dict(bbox=(21.0, 105.8, 21.1, 105.9)), "quantity": dict(quantities=["temperature"]),
            "kind": dict(kinds=["air_quality"])}
    subs = {name: api.subscribe(f) for name, f in flts.items()}
    control = ops.subscribe(dict(commune_codes=[C1]))

    t0 = now_ms()
    for d in theirs + [my_noise]:
        publish_json(gw, d, {"ts": t0, "seq": 1, "temp": 30.5})
    publish_json(gw, mine[0], {"ts": t0, "seq": 1, "temp": 21.0})      # the last one published
    for name, sub in subs.items():
        got = sub.wait_device_seq(mine[0].id, 1)
        assert [r.device_id for r in got] == [mine[0].id], f"{name}: leaked {summarise(got)}"
    seen = {r.device_id for r in control.wait_device_seq(mine[0].id, 1)}
    assert seen == {d.id for d in theirs + [my_noise, mine[0]]}

    # history: the same readings exist, the agency gets only its own
    span = dict(from_ms=t0 - HOUR, to_ms=t0 + HOUR)
    for name, f in flts.items():
        assert [r.device_id for r in api.history(f, **span)] == [mine[0].id], name
        assert {r.device_id for r in api.history(f, **span, every=1)} == {mine[0].id}, name
    assert {r.device_id for r in ops.history(dict(commune_codes=[C1]), **span)} == seen

    # devices: listed and fetched only within the scope
    my_ids = sorted(d.id for d in mine)
    for name, f in flts.items():
        if name == "quantity":
            continue
        assert [d.id for d in api.list_devices(f)] == my_ids, name
    paged, after = [], ""
    while True:
        page = api.list_devices(after_id=after, limit=2)
        assert len(page) <= 2
        if not page:
            break
        paged += [d.id for d in page]
        after = page[-1].id
    assert paged == my_ids
    for d in theirs + [my_noise]:
        assert rpc_error(lambda: api.get_device(d.id)).code() == PERMISSION_DENIED
        assert ops.get_device(d.id).id == d.id
    got = api.get_device(mine[0].id)
    assert (got.tenant, got.kind, got.commune_code) == (t1, "air_quality", C1)
    assert (got.lat, got.lon) == pytest.approx((21.0285, 105.8542))
    assert got.last_seen_time_ms >= t0 and got.enabled


def test_get_device_reports_online_state(gw: Gateway, telemetry, scene):
    agency = gw.add_agency(unique_id("env"), tenants=[scene["t1"]], kinds=["*"])
    api = telemetry(gw, agency.token)
    dev = scene["mine"][1]
    assert api.get_device(dev.id).online is False
    with gw.connected_client(dev):
        wait_until(lambda: api.get_device(dev.id).online, 10, desc="online while connected")
    wait_until(lambda: not api.get_device(dev.id).online, 10, desc="offline after disconnect")


def test_revoking_an_agency_ends_its_live_stream_at_once(gw: Gateway, telemetry, scene):
    dev = scene["mine"][2]
    agency = gw.add_agency(unique_id("revoked"), tenants=[scene["t1"]], kinds=["*"])
    keeper = gw.add_agency(unique_id("keeper"), tenants=[scene["t1"]], kinds=["*"])
    api, other = telemetry(gw, agency.token), telemetry(gw, keeper.token)
    sub = api.subscribe(dict(device_ids=[dev.id]))
    control = other.subscribe(dict(device_ids=[dev.id]))
    publish_json(gw, dev, {"seq": 101, "temp": 20.0})
    sub.wait_device_seq(dev.id, 101)

    gw.remove_agency(agency.name)
    assert agency.name not in {a["name"] for a in gw.cli("agency", "list")}
    publish_json(gw, dev, {"seq": 102, "temp": 20.5})
    err = sub.wait_ended()
    assert err is not None and err.code() == UNAUTHENTICATED, sub.status()
    assert [r.device_seq for r in sub.snapshot()] == [101], "a reading reached a revoked agency"
    assert [r.device_seq for r in control.wait_device_seq(dev.id, 102)] == [101, 102]
    wait_for_subscribers(gw, agency.name, 0)
    for method, e in every_call(api).items():
        assert e.code() == UNAUTHENTICATED, (method, e)


def test_revoking_an_agency_stops_a_replay_in_progress(gateway_factory, telemetry):
    """An agency replaying history (resume.after_id = 0) is revoked before it has read much: it
    must not go on receiving the stored readings. The client reads slowly (small HTTP/2 window,
    buffer of 20), so at most the buffer and transport slack were sent before the revocation."""
    gw = gateway_factory(env={"CITYGW_GRPC__SUBSCRIPTION_BUFFER": "20"})
    tenant = unique_id("city")
    agency = gw.add_agency(unique_id("revoked"), tenants=[tenant], kinds=["*"])
    dev = gw.add_device(tenant=tenant, kind="noise")
    stored = 2000
    publish_json(gw, dev, *([{"seq": s, "noise": 50 + s % 30} for s in range(b, b + 100)]
                            for b in range(0, stored, 100)))
    sub = telemetry(gw, agency.token, options=SLOW_READER_OPTIONS).subscribe(after_id=0, reading=False)
    gw.wait_metric("citygw_readings_streamed_total", 20, agency=agency.name)
    gw.remove_agency(agency.name)
    publish_json(gw, dev, {"seq": stored, "noise": 55.0})     # a live reading after revocation
    sub.start_reading()
    err = sub.wait_ended(30)
    got = sub.snapshot()
    assert err is not None and err.code() == UNAUTHENTICATED, (
        f"revoked agency: stream {sub.status()} after {len(got)} of {stored + 1} readings")
    assert len(got) < 500, f"a revoked agency kept replaying: {len(got)} of {stored} stored readings"
    assert stored not in {r.device_seq for r in got}


def test_invalid_bbox_is_invalid_argument(gw: Gateway, telemetry, scene):
    agency = gw.add_agency(unique_id("env"), tenants=[scene["t1"]], kinds=["*"])
    api = telemetry(gw, agency.token)
    for bbox in [(21.1, 105.8, 21.0, 105.9), (21.0, 105.9, 21.1, 105.8), (float("nan"), 105.8, 21.1, 105.9)]:
        for method, err in every_call(api, dict(bbox=bbox)).items():
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (bbox, method, err)


def test_agency_from_the_config_file(gateway_factory, telemetry):
    token = "cfg-" + secrets.token_urlsafe(24)
    gw0 = gateway_factory(start=False)
    proc = gw0.cli_raw("agency", "hash-token", token, output_json=False)
    assert proc.returncode == 0, proc.stderr
    digest = proc.stdout.strip()
    assert digest == hashlib.sha256(token.encode()).hexdigest()
    gw = gateway_factory(config_toml=f'''
[[agencies]]
name = "water-authority"
token_sha256 = "{digest}"
tenants = ["danang"]
kinds = ["water_level", "flood"]
kpi = false
''')
    gauge = gw.add_device(tenant="danang", kind="water_level")
    gw.add_device(tenant="danang", kind="air_quality")
    gw.add_device(tenant="hue", kind="water_level")
    listed = {a["name"]: a for a in gw.cli("agency", "list")}
    assert listed["water-authority"]["from_config"] is True
    assert listed["water-authority"]["tenants"] == ["danang"]

    api = telemetry(gw, token)
    assert [d.id for d in api.list_devices()] == [gauge.id]
    assert rpc_error(lambda: api.list_devices(dict(tenants=["hue"]))).code() == PERMISSION_DENIED
    sub = api.subscribe()
    publish_json(gw, gauge, {"seq": 1, "level": 2.5})
    got = sub.wait_device_seq(gauge.id, 1)
    assert [(r.quantity, r.number, r.unit) for r in got] == [("water_level", 2.5, "m")]
    # a config-file agency cannot be removed through the API
    with pytest.raises(CliError):
        gw.remove_agency("water-authority")
    assert api.list_devices()

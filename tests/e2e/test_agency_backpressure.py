"""A deliberately stalled subscriber while 5 devices publish.

The gateway runs with `grpc.subscription_buffer = 20` (CITYGW_GRPC__SUBSCRIPTION_BUFFER). One
agency's client subscribes and then reads nothing; its channel has a small HTTP/2 receive window
(no BDP probing, 1 KiB lookahead) so that only a few dozen readings can hide in transport buffers
and the gateway-side buffer really fills. Five paho-mqtt devices publish QoS 1 meanwhile, and a
second agency's client reads normally.

The same again through SubscribeBatches: its buffer counts readings too, so the stalled batch
client gets at most the buffer's readings and no batch is larger.

Expected: every publish is PUBACKed while the stalled client still has read nothing; the second
subscriber receives every reading once, in order; the stalled client, once it reads, gets what
was buffered and then RESOURCE_EXHAUSTED with the `citygw-resume-after-id` trailer; subscribing
again from that id yields exactly the rest; the overflow is counted for that agency only.
"""

from __future__ import annotations

import json
import threading

import grpc
import pytest

from support import Gateway, publish_json, unique_id
from support.telemetry import SLOW_READER_OPTIONS, summarise, trailer, wait_for_subscribers

DEVICES = 5
PER_DEVICE = 300
BUFFER = 20
RESUME_TRAILER = "citygw-resume-after-id"
# generous: a subscriber that blocked ingestion would show as missing or seconds-long PUBACKs
PUBACK_CEILING_S = 5.0


def publish_from_all(gw: Gateway, devices) -> dict[str, list[tuple[int | None, float]]]:
    """All devices publish PER_DEVICE messages at once, one paho client (MQTT 5) each."""
    results: dict[str, list] = {}
    errors: list[BaseException] = []
    clients = [gw.connected_client(d) for d in devices]

    def run(client, dev) -> None:
        try:
            payloads = [json.dumps({"seq": i, "vehicle_count": i}) for i in range(PER_DEVICE)]
            results[dev.id] = client.publish_many(dev.topic, payloads, max_inflight=20, timeout=60)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c, d)) for c, d in zip(clients, devices)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
    finally:
        for c in clients:
            c.close()
    assert not errors, errors
    return results


@pytest.mark.parametrize("batched", [False, True], ids=["Subscribe", "SubscribeBatches"])
def test_stalled_subscriber_is_cut_off_with_a_resume_point_and_slows_no_one(gateway_factory, telemetry,
                                                                           batched):
    gw = gateway_factory(env={"CITYGW_GRPC__SUBSCRIPTION_BUFFER": str(BUFFER)})
    tenant = unique_id("city")
    slow = gw.add_agency(unique_id("slow"), tenants=[tenant], kinds=["*"])
    fast = gw.add_agency(unique_id("fast"), tenants=[tenant], kinds=["*"])
    devices = [gw.add_device(tenant=tenant, kind="traffic") for _ in range(DEVICES)]

    stalled = telemetry(gw, slow.token, options=SLOW_READER_OPTIONS).subscribe(reading=False,
                                                                               batched=batched)
    healthy = telemetry(gw, fast.token).subscribe(batched=batched)
    wait_for_subscribers(gw, slow.name, 1)
    wait_for_subscribers(gw, fast.name, 1)

    results = publish_from_all(gw, devices)

    # ingestion: every message PUBACKed with success, while the stalled client read nothing
    total = DEVICES * PER_DEVICE
    codes = [code for rs in results.values() for code, _ in rs]
    assert len(codes) == total and set(codes) == {0}, {c: codes.count(c) for c in set(codes)}
    latencies = sorted(lat for rs in results.values() for _, lat in rs)
    assert latencies[-1] < PUBACK_CEILING_S, (
        f"PUBACK latency p50 {latencies[total // 2]:.3f}s, max {latencies[-1]:.3f}s")

    # the other subscriber: everything, once, in order
    got = healthy.wait_count(total, timeout=30)
    ids = [r.id for r in got]
    assert ids == sorted(set(ids)) and len(got) == total
    for dev in devices:
        assert [r.number for r in got if r.device_id == dev.id] == list(range(PER_DEVICE)), dev
    # the slow agency was cut off (counted), the fast one not
    gw.wait_metric("citygw_subscriber_overflows_total", 1, agency=slow.name)
    assert gw.metric("citygw_subscriber_overflows_total", agency=fast.name) == 0
    assert stalled.snapshot() == []

    # the stalled client finally reads: what was buffered, then the reason and the resume point
    stalled.start_reading()
    err = stalled.wait_ended(30)
    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, stalled.status()
    resume = trailer(err, RESUME_TRAILER)
    assert resume is not None and resume.isdigit(), err.trailing_metadata()
    resume_after = int(resume)
    assert resume in err.details(), err.details()
    before = stalled.snapshot()
    assert BUFFER <= len(before) < total, len(before)
    assert [r.id for r in before] == ids[:len(before)], "the stalled client's readings are not a prefix"
    assert before[-1].id <= resume_after < ids[-1]
    wait_for_subscribers(gw, slow.name, 0)

    # resuming from the trailer: exactly the rest, then live readings
    if batched:
        # the buffer counts readings, not batches: no batch is larger than it
        assert max(stalled.batches + healthy.batches) <= BUFFER, (stalled.batches, healthy.batches)
    resumed = telemetry(gw, slow.token).subscribe(after_id=resume_after, batched=batched)
    rest = resumed.wait_count(total - len(before), timeout=30)
    union = [r.id for r in before + rest]
    assert union == ids, (
        f"missing {sorted(set(ids) - set(union))[:10]}, extra {summarise(r for r in rest if r.id not in set(ids))}, "
        f"duplicated {len(union) - len(set(union))}")
    publish_json(gw, devices[0], {"seq": PER_DEVICE, "vehicle_count": PER_DEVICE})
    live = resumed.wait_device_seq(devices[0].id, PER_DEVICE)
    assert [r.number for r in live[len(rest):]] == [PER_DEVICE]
    assert gw.metric("citygw_subscriber_overflows_total", agency=slow.name) == 1


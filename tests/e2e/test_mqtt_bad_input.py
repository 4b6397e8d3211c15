"""Bad payloads are dead-lettered with a reason and counted, the sender's connection survives
(3.1.1: a normal PUBACK; 5: PUBACK >= 0x80, 0x99 "payload format invalid" for undecodable
payloads), and other devices publishing at the same time lose nothing.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from support import SENML_CBOR, SENML_JSON, Device, Gateway, b64_head, now_ms, senml_cbor

VERSIONS = pytest.mark.parametrize("version", [311, 5], ids=["mqttv311", "mqttv5"])

_cbor_full = senml_cbor([{"n": "temperature", "u": "Cel", "v": 21.5},
                         {"n": "humidity", "u": "%RH", "v": 60.0}])
TEN_MB = 10 * 1024 * 1024

# (reason, topic suffix, payload, exact MQTT 5 PUBACK code or None for "any >= 0x80")
BAD_PAYLOADS = [
    ("malformed_json", "", b'{"temperature": 21.5', 0x99),
    ("malformed_json", "/json", b"temperature=21.5", 0x99),
    ("malformed_senml", SENML_JSON, b'[{"n": "temperature", "v": "warm"}]', 0x99),
    ("malformed_cbor", SENML_CBOR, _cbor_full[:-5], 0x99),
    ("non_finite_value", "", b'{"temperature": NaN}', 0x99),
    ("unknown_format", "/xml", b"<temperature>21.5</temperature>", None),
    ("payload_too_large", "", b'{"blob": "' + b"x" * (TEN_MB - 12) + b'"}', None),
]
assert len(BAD_PAYLOADS[-1][2]) == TEN_MB

GOOD_MESSAGES = 150
WINDOW = 10


def rejected(gw: Gateway, reason: str) -> float:
    return gw.metric("citygw_messages_rejected_total", protocol="mqtt", reason=reason)


def publish_stream(gw: Gateway, dev: Device, version: int, n: int) -> dict[int, int | None]:
    """Publish n QoS 1 messages {"seq": i, "vehicle_count": i}, up to WINDOW in flight;
    return seq -> PUBACK code (None if never acknowledged)."""
    acks: dict[int, int | None] = {}
    with gw.connected_client(dev, version=version) as c:
        pending: list[tuple[int, int]] = []
        for i in range(n):
            info = c.publish_async(dev.topic, json.dumps({"seq": i, "vehicle_count": i}))
            pending.append((i, info.mid))
            if len(pending) >= WINDOW:
                seq, mid = pending.pop(0)
                acks[seq] = c.wait_ack(mid)
        for seq, mid in pending:
            acks[seq] = c.wait_ack(mid)
    return acks


@VERSIONS
def test_bad_payloads_dead_lettered_while_others_publish(gw: Gateway, version):
    bad = gw.add_device(kind="noise")
    good = [gw.add_device(kind="traffic") for _ in range(3)]
    reasons = sorted({r for r, *_ in BAD_PAYLOADS})
    before = {r: rejected(gw, r) for r in reasons}

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {d.id: pool.submit(publish_stream, gw, d, v, GOOD_MESSAGES)
                   for d, v in zip(good, (311, 5, 311))}
        with gw.connected_client(bad, version=version) as c:
            for reason, suffix, payload, v5_code in BAD_PAYLOADS:
                code = c.publish(bad.topic + suffix, payload, timeout=60)
                assert code is not None, f"{reason}: connection closed instead of a PUBACK"
                if version == 311:
                    assert code == 0, f"{reason}: 3.1.1 gets a normal PUBACK"
                elif v5_code is not None:
                    assert code == v5_code, f"{reason}: PUBACK {code:#04x}, want {v5_code:#04x}"
                else:
                    assert code >= 0x80, f"{reason}: PUBACK {code:#04x}, want a failure code"
                assert not c.disconnected.is_set(), f"{reason}: the connection must stay up"
            # the same connection still delivers good data
            ts = now_ms() - 1000
            assert c.publish(bad.topic, json.dumps({"ts": ts, "noise": 61.5})) == 0
        acks = {dev_id: f.result() for dev_id, f in futures.items()}

    # the bad device: exactly the one good reading
    assert [(r["quantity"], r["value"], r["device_time_ms"]) for r in gw.readings(bad.id)] == [
        ("noise", 61.5, ts)]

    # the other devices: every message acknowledged, every acknowledged message stored once
    for d in good:
        a = acks[d.id]
        assert sorted(a) == list(range(GOOD_MESSAGES))
        assert all(code == 0 for code in a.values()), {s: c for s, c in a.items() if c != 0}
        rs = gw.readings(d.id)
        counts = sorted(r["value"] for r in rs if r["quantity"] == "vehicle_count")
        assert counts == list(range(GOOD_MESSAGES)), \
            f"{d.id}: {len(counts)} stored of {GOOD_MESSAGES} acknowledged"

    # dead letters: one per bad payload, with reason, where it came from, size and head
    dls = gw.deadletters(bad.id)
    assert sorted(x["reason"] for x in dls) == sorted(r for r, *_ in BAD_PAYLOADS), dls
    for reason, suffix, payload, _ in BAD_PAYLOADS:
        (dl,) = [x for x in dls if x["reason"] == reason and x["address"] == bad.topic + suffix]
        assert dl["device_id"] == bad.id and dl["protocol"] == "mqtt", dl
        assert dl["payload_size"] == len(payload), dl
        head = b64_head(dl)
        assert 0 < len(head) <= 1024 and payload.startswith(head), (reason, head[:64])
    # counted by reason
    for reason in reasons:
        want = before[reason] + sum(1 for r, *_ in BAD_PAYLOADS if r == reason)
        gw.wait_metric("citygw_messages_rejected_total", want, protocol="mqtt", reason=reason)
        assert rejected(gw, reason) == want, reason


@VERSIONS
def test_mosquitto_pub_malformed_json_keeps_working(gw: Gateway, version):
    """An operator's mosquitto_pub of a broken payload: not stored, dead-lettered."""
    from support import mosquitto_pub
    d = gw.add_device()
    p = mosquitto_pub(gw, d, d.topic, message='{"temperature": }', version=version)
    if version == 311:
        assert p.returncode == 0, p.stderr   # normal PUBACK
    dls = gw.deadletters(d.id)
    assert [(x["reason"], x["payload_size"]) for x in dls] == [("malformed_json", 17)]
    assert gw.readings(d.id) == []


def test_max_payload_bytes_is_configurable(gateway_factory):
    limit = 2048
    gw = gateway_factory(env={"CITYGW_MQTT__MAX_PAYLOAD_BYTES": str(limit)})
    d = gw.add_device()
    body = b'{"temperature": 21.5}'
    at_limit = body + b" " * (limit - len(body))          # valid JSON, exactly the limit
    over = body + b" " * (limit + 1 - len(body))
    with gw.connected_client(d, version=5) as c:
        assert c.publish(d.topic, at_limit) == 0
        code = c.publish(d.topic, over)
        assert code is not None and code >= 0x80, code
    assert [r["value"] for r in gw.readings(d.id)] == [21.5]
    assert [(x["reason"], x["payload_size"]) for x in gw.deadletters(d.id)] == [
        ("payload_too_large", limit + 1)]

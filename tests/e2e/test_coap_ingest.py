"""Telemetry over plain CoAP (UDP) from real clients: libcoap's coap-client-notls and aiocoap.

A CON request is answered (2.04 piggybacked in the ACK) only once its readings are stored, so
readings are queried right after the answer; a NON is stored best effort, so its readings are
awaited. Plain CoAP is off by default; these gateways enable it and carry the device secret in
the Uri-Query `t=`.
"""

from __future__ import annotations

import json
import os

import pytest

from support import Gateway, by_quantity, has_ipv6_loopback, now_ms, senml_cbor, wait_until
from support.coap import (CF_JSON, CF_OCTET_STREAM, CF_SENML_CBOR, CF_SENML_JSON, CON, GET, NON,
                          RST, Msg, RawCoap, aiocoap_post, code, coap_client, post_msg,
                          telemetry_uri)

MAX_PAYLOAD = 16 * 1024
PLAIN = {"CITYGW_COAP__PLAIN_ENABLED": "true",
         "CITYGW_COAP__MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD)}


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways(env=PLAIN)


@pytest.fixture
def device(gw: Gateway):
    return gw.add_device(kind="weather", commune="00004", lat=21.0285, lon=105.8542)


def payload_for(fmt: str, ts_ms: int) -> tuple[bytes, int]:
    if fmt == "json":
        return json.dumps({"ts": ts_ms, "temp": 21.5, "hum": 63.25}).encode(), CF_JSON
    records = [{"bn": "urn:dev:x:", "bt": ts_ms / 1000, "n": "temp", "u": "Cel", "v": 21.5},
               {"n": "hum", "u": "%RH", "v": 63.25}]
    if fmt == "senml+json":
        return json.dumps(records).encode(), CF_SENML_JSON
    return senml_cbor(records), CF_SENML_CBOR


def assert_stored(gw: Gateway, device, ts_ms: int, wait: bool) -> None:
    def two():
        rs = gw.readings(device.id)
        return rs if len(rs) >= 2 else None

    rs = wait_until(two, desc="2 readings") if wait else gw.readings(device.id)
    assert len(rs) == 2, rs
    q = by_quantity(rs)
    assert (q["temperature"][0]["value"], q["temperature"][0]["unit"]) == (21.5, "Cel")
    assert (q["humidity"][0]["value"], q["humidity"][0]["unit"]) == (63.25, "%RH")
    for r in rs:
        assert r["protocol"] == "coap", r
        assert r["device_id"] == device.id and r["commune_code"] == "00004"
        assert r["device_time_ms"] == ts_ms, r


FORMATS = ["json", "senml+json", "senml+cbor"]


@pytest.mark.parametrize("non", [False, True], ids=["con", "non"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_libcoap_posts_telemetry(gw: Gateway, device, fmt, non):
    ts = now_ms() - 30_000 + 7
    payload, cf = payload_for(fmt, ts)
    p = coap_client(telemetry_uri(gw, device), payload, cf, non=non)
    assert p.returncode == 0, p.stderr
    assert b"4." not in p.stderr and b"5." not in p.stderr, p.stderr
    assert_stored(gw, device, ts, wait=non)


@pytest.mark.parametrize("non", [False, True], ids=["con", "non"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_aiocoap_posts_telemetry(gw: Gateway, device, fmt, non):
    ts = now_ms() - 20_000 + 3
    payload, cf = payload_for(fmt, ts)
    status, body = aiocoap_post(telemetry_uri(gw, device), payload, cf, non=non)
    assert status == "2.04", (status, body)
    assert_stored(gw, device, ts, wait=non)


def test_format_in_path_wins_over_content_format(gw: Gateway, device):
    ts = now_ms() - 10_000
    payload, _ = payload_for("senml+cbor", ts)
    p = coap_client(telemetry_uri(gw, device, fmt="senml-cbor"), payload, CF_OCTET_STREAM)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    assert_stored(gw, device, ts, wait=False)


def test_retransmitted_con_is_acked_twice_stored_once(gw: Gateway, device):
    before = gw.metric("citygw_coap_retransmissions_total")
    ts = now_ms() - 5_000
    payload, cf = payload_for("json", ts)
    m = post_msg(device, payload, mid=0x1234, token=b"\x01\x02", content_format=cf)
    with RawCoap(gw) as c:
        first = c.request(m)
        second = c.request(m)  # the same datagram again: what a device does when an ACK is lost
    for a in (first, second):
        assert (a.type, a.mid, a.token, a.code_str) == (2, 0x1234, b"\x01\x02", "2.04"), a
    assert first.encode() == second.encode()
    assert_stored(gw, device, ts, wait=False)
    assert gw.metric("citygw_coap_retransmissions_total") == before + 1
    # a new message id from the same endpoint is a new request
    with RawCoap(gw) as c:
        assert c.request(post_msg(device, payload, mid=0x1235, content_format=cf)).code_str == "2.04"
    assert len(gw.readings(device.id)) == 4


def senml_pack(n: int, ts_ms: int) -> bytes:
    records = [{"bn": "urn:dev:big:", "bt": ts_ms / 1000, "n": "level_0", "u": "m", "v": 0.0}]
    records += [{"n": f"level_{i}", "u": "m", "t": i, "v": i * 0.25} for i in range(1, n)]
    return json.dumps(records).encode()


@pytest.mark.parametrize("client", ["libcoap", "aiocoap"])
def test_block1_10kb_senml_arrives_whole(gw: Gateway, device, client):
    ts = now_ms() - 600_000
    n = 200
    body = senml_pack(n, ts)
    assert 10_000 <= len(body) <= MAX_PAYLOAD, len(body)
    if client == "libcoap":
        p = coap_client(telemetry_uri(gw, device), body, CF_SENML_JSON, block=256)
        assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    else:
        status, answer = aiocoap_post(telemetry_uri(gw, device), body, CF_SENML_JSON)
        assert status == "2.04", (status, answer)
    rs = gw.readings(device.id)
    assert len(rs) == n
    got = {r["quantity"]: r for r in rs}
    assert got["level_199"]["value"] == 199 * 0.25
    assert got["level_199"]["device_time_ms"] == ts + 199_000


def test_oversize_is_refused_with_413_and_size1(gw: Gateway, device):
    before = gw.metric("citygw_coap_refused_total", reason="payload_too_large")
    big = senml_pack(400, now_ms())
    assert len(big) > MAX_PAYLOAD
    # libcoap in blocks: the transfer stops at the limit with 4.13
    p = coap_client(telemetry_uri(gw, device), big, CF_SENML_JSON, block=1024)
    assert b"4.13" in p.stderr, p.stderr
    # one datagram over the limit: 4.13 and Size1 says what fits
    with RawCoap(gw) as c:
        a = c.request(post_msg(device, big, mid=77, content_format=CF_SENML_JSON))
    assert a.code_str == "4.13", a
    assert int.from_bytes(a.option(60), "big") == MAX_PAYLOAD
    assert b"limit" in a.payload
    # announced up front with Size1 in the first block
    with RawCoap(gw) as c:
        m = post_msg(device, big[:1024], mid=78, content_format=CF_SENML_JSON)
        m.options += [(27, bytes([0x0e])), (60, len(big).to_bytes(3, "big"))]
        assert c.request(m).code_str == "4.13"
    assert gw.readings(device.id) == []
    dls = gw.deadletters(device.id)
    assert {d["reason"] for d in dls} == {"payload_too_large"}, dls
    gw.wait_metric("citygw_coap_refused_total", before + 3, reason="payload_too_large")


def test_specific_error_codes_with_diagnostics(gw: Gateway, device):
    other = gw.add_device(kind="weather")
    good, _ = payload_for("json", now_ms())
    cases = [
        # (what, message, code, dead-lettered reason)
        ("no token", post_msg(device.id, good, 1, content_format=CF_JSON), "4.01", None),
        ("wrong token", post_msg(device.id, good, 2, secret="wrong-secret", content_format=CF_JSON),
         "4.01", None),
        ("someone else's token", post_msg(other.id, good, 3, secret=device.secret,
                                          content_format=CF_JSON), "4.01", None),
        ("unknown path", Msg(CON, code("0.02"), 4, b"t", [(11, b"telemetry")], good), "4.04", None),
        ("GET", Msg(CON, GET, 5, b"t", [(11, b"t"), (11, device.id.encode()),
                                        (15, b"t=" + device.secret.encode())]), "4.05", None),
        ("unknown content format", post_msg(device, good, 6, content_format=0), "4.15",
         "unknown_format"),
        ("octet-stream without a format", post_msg(device, good, 7, content_format=CF_OCTET_STREAM),
         "4.15", "unknown_format"),
        ("truncated Cayenne LPP", post_msg(device, b"\x01\x67\x00", 8, fmt="lpp",
                                           content_format=CF_OCTET_STREAM), "4.00", "malformed_lpp"),
        ("malformed JSON", post_msg(device, b'{"temp": ', 9, content_format=CF_JSON), "4.00",
         "malformed_json"),
        ("unknown critical option", Msg(CON, code("0.02"), 10, b"t",
                                        post_msg(device, good, 0).options + [(2049, b"x")], good),
         "4.02", None),
    ]
    with RawCoap(gw) as c:
        for what, m, want, _ in cases:
            a = c.request(m)
            assert (a.type, a.mid, a.code_str) == (2, m.mid, want), (what, a)
            assert a.payload, f"{what}: a diagnostic payload is expected"
    assert gw.readings(device.id) == []
    assert sorted(d["reason"] for d in gw.deadletters(device.id)) == sorted(
        r for *_, r in cases if r), gw.deadletters(device.id)
    m = gw.metrics()
    for reason in ("unauthenticated", "not_found", "method_not_allowed", "unknown_format",
                   "malformed_json", "bad_option"):
        assert m.value("citygw_coap_refused_total", reason=reason) >= 1, reason
    assert m.value("citygw_coap_responses_total", code="4.01") >= 3

    # a disabled device is refused with 4.03
    gw.cli("device", "disable", device.id)
    with RawCoap(gw) as c:
        a = c.request(post_msg(device, good, 11, content_format=CF_JSON))
    assert a.code_str == "4.03" and b"disabled" in a.payload, a


def test_cayenne_lpp_over_coap(gw: Gateway, device):
    from cayennelpp import LppFrame
    frame = LppFrame()
    frame.add_temperature(1, 21.5)
    frame.add_humidity(2, 63.5)
    with RawCoap(gw) as c:
        a = c.request(post_msg(device, bytes(frame), 300, fmt="lpp",
                               content_format=CF_OCTET_STREAM))
    assert a.code_str == "2.04", a
    got = {r["quantity"]: (r["value"], r["unit"]) for r in gw.readings(device.id)}
    assert got == {"temperature": (21.5, "Cel"), "humidity": (63.5, "%RH")}, got


def test_malformed_datagrams_are_dropped_or_reset_and_others_keep_posting(gw: Gateway, device):
    before = gw.metric("citygw_coap_malformed_total", reason="unparseable")
    good, cf = payload_for("json", now_ms() - 1000)
    with RawCoap(gw) as c:
        # bad version (2): silently ignored
        bad_version = bytearray(post_msg(device, good, 100, content_format=cf).encode())
        bad_version[0] = (bad_version[0] & 0x3F) | 0x80
        c.send(bytes(bad_version))
        assert c.recv(0.5) is None
        # truncated option (says 5 bytes, has 2) in a CON: Reset
        c.send(bytes([0x40, 0x02, 0x00, 0x65, 0xB5]) + b"ab")
        r = c.recv()
        assert r is not None and (r.type, r.mid, r.code) == (RST, 0x65, 0), r
        # token length 9: Reset
        c.send(bytes([0x49, 0x02, 0x00, 0x66]) + b"123456789")
        r = c.recv()
        assert r is not None and (r.type, r.mid) == (RST, 0x66), r
        # random bytes, empty and tiny datagrams: dropped (or Reset when they look like a CON)
        for junk in (os.urandom(64), b"", b"\x40", os.urandom(1200)):
            c.send(junk)
        # a CoAP ping (empty CON) gets a Reset
        assert c.request(Msg(CON, 0, 0x77)).type == RST
    # another device keeps being served
    with RawCoap(gw) as c:
        a = c.request(post_msg(device, good, 200, content_format=cf))
    assert a.code_str == "2.04"
    assert len(gw.readings(device.id)) == 2
    assert gw.metric("citygw_coap_malformed_total", reason="unparseable") >= before + 2
    assert gw.metric("citygw_coap_malformed_total", reason="bad_version") >= 1


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_post_over_ipv6(gateway_factory):
    gw6 = gateway_factory(host="::1", env=PLAIN)
    d = gw6.add_device(kind="weather", commune="00004", lat=21.0, lon=105.8)
    ts = now_ms() - 1234
    payload, cf = payload_for("senml+cbor", ts)
    p = coap_client(telemetry_uri(gw6, d), payload, cf)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    assert_stored(gw6, d, ts, wait=False)


def test_plain_coap_is_off_by_default(gateway_factory):
    g = gateway_factory()  # no CITYGW_COAP__PLAIN_ENABLED
    d = g.add_device(kind="weather")
    payload, cf = payload_for("json", now_ms())
    with RawCoap(g) as c:
        c.send(post_msg(d, payload, 1, content_format=cf).encode())
        try:
            answer = c.recv(1.0)
        except ConnectionRefusedError:  # ICMP port unreachable: nobody listens
            answer = None
    assert answer is None
    assert g.readings(d.id) == []

"""LwM2M over the CoAP listener: a real LwM2M 1.0 client (npm lwm2m-node-lib, run with node)
registers, the gateway observes its temperature (/3303/0/5700) and battery (/3/0/9) and stores
the values as readings; de-registration and lifetime expiry take the device offline. aiocoap acts
as an LwM2M 1.1 client that reports with Send (POST /dp, SenML CBOR).

lwm2m-node-lib cannot add the device secret to its registration, so that gateway runs with
`coap.lwm2m_nosec` (LwM2M NoSec mode, for private networks); the aiocoap client registers with
`?t=<secret>` on a gateway without NoSec.
"""

from __future__ import annotations

import asyncio

import pytest

from support import Gateway, by_quantity, senml_cbor, wait_until
from support.coap import CF_SENML_CBOR, CON, POST, Msg, RawCoap
from support.lwm2m import NodeClient

PLAIN = {"CITYGW_COAP__PLAIN_ENABLED": "true"}
NOSEC = {**PLAIN, "CITYGW_COAP__LWM2M_NOSEC": "true"}


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways(env=NOSEC)


def online(gw: Gateway, device_id: str) -> bool:
    return gw.cli("device", "show", device_id)["online"]


def test_node_client_registers_is_observed_and_deregisters(gw: Gateway):
    d = gw.add_device(kind="weather")
    client = NodeClient(gw, d.id, lifetime=300, temperature=21.5, battery=87)
    try:
        reg = client.expect("registered")
        assert reg["location"].startswith("rd/"), reg
        assert online(gw, d.id)
        (r,) = gw.cli("lwm2m", "list", "--device", d.id)
        assert r["id"] == "/" + reg["location"] and r["lifetime_s"] == 300, r
        assert {"/3303/0", "/3/0"} <= set(r["objects"]) and r["secure"] is False, r
        assert r["address"].startswith("127.0.0.1:"), r

        def observed():
            q = by_quantity(gw.readings(d.id))
            return q if "temperature" in q and "battery" in q else None

        q = wait_until(observed, timeout=20, desc="temperature and battery read by observe")
        (t,) = q["temperature"]
        assert (t["value"], t["unit"], t["protocol"]) == (21.5, "Cel", "lwm2m"), t
        (b,) = q["battery"]
        assert (b["value"], b["unit"]) == (87, "%EL"), b

        # a new value reaches the observing server as a notification
        client.command("set 23.25")
        wait_until(lambda: [r for r in by_quantity(gw.readings(d.id))["temperature"]
                            if r["value"] == 23.25], timeout=20, desc="notified 23.25")
        assert gw.metric("citygw_lwm2m_notifications_total") >= 3

        client.command("deregister")
        client.expect("deregistered")
        assert not online(gw, d.id)
        assert gw.cli("lwm2m", "list", "--device", d.id) == []
        assert gw.metric("citygw_lwm2m_registrations_total", event="deregister") >= 1
    finally:
        client.close()


async def _register_and_send(uri_base: str, endpoint: str, secret: str, pack: bytes):
    import aiocoap

    ctx = await aiocoap.Context.create_client_context()
    try:
        reg = aiocoap.Message(code=aiocoap.POST, payload=b"</1/0>,</3/0>",
                              uri=f"{uri_base}/rd?ep={endpoint}&lt=60&lwm2m=1.1&b=U&t={secret}")
        reg.opt.content_format = 40
        r = await asyncio.wait_for(ctx.request(reg).response, 20)
        location = "/".join(r.opt.location_path)
        send = aiocoap.Message(code=aiocoap.POST, payload=pack, uri=f"{uri_base}/dp")
        send.opt.content_format = CF_SENML_CBOR
        s = await asyncio.wait_for(ctx.request(send).response, 20)
        return str(r.code), location, str(s.code)
    finally:
        await ctx.shutdown()


def test_aiocoap_registers_and_sends_senml_cbor(gateway_factory):
    g = gateway_factory(env=PLAIN)  # no NoSec: the registration carries the secret
    d = g.add_device(kind="water_level")
    pack = senml_cbor([{"bn": "/3303/0/", "bt": 1_790_000_000, "n": "5700", "v": 19.75},
                       {"bn": "/3/0/", "n": "9", "v": 64},
                       {"bn": "/3330/0/", "n": "5700", "v": 1.5}])
    reg, location, sent = asyncio.run(_register_and_send(
        f"coap://{g.host}:{g.coap_port}", d.id, d.secret, pack))
    assert reg.startswith("2.01") and location.startswith("rd/"), (reg, location)
    assert sent.startswith("2.04"), sent
    q = by_quantity(g.readings(d.id))
    assert (q["temperature"][0]["value"], q["temperature"][0]["unit"]) == (19.75, "Cel")
    assert q["temperature"][0]["device_time_ms"] == 1_790_000_000_000
    assert (q["battery"][0]["value"], q["battery"][0]["unit"]) == (64, "%EL")
    assert (q["distance"][0]["value"], q["distance"][0]["unit"]) == (1.5, "m")
    assert all(r["protocol"] == "lwm2m" for rs in q.values() for r in rs)
    # The registration listed /3/0, so the server observed /3/0/9; aiocoap serves no resources
    # and refused: the failure is visible in the admin API and counted.
    (r,) = wait_until(lambda: [x for x in g.cli("lwm2m", "list") if x["last_error"]],
                      timeout=15, desc="observation error recorded")
    assert r["device_id"] == d.id and "/3/0/9" in r["last_error"], r
    assert g.metric("citygw_lwm2m_observe_errors_total", reason="refused") >= 1


def rd(endpoint: str, mid: int, lt: int | None = None, secret: str | None = None) -> Msg:
    query = [b"ep=" + endpoint.encode()]
    if lt is not None:
        query.append(b"lt=%d" % lt)
    if secret is not None:
        query.append(b"t=" + secret.encode())
    return Msg(CON, POST, mid, b"r1", [(11, b"rd")] + [(15, q) for q in query], b"</1/0>")


def test_registration_refusals_and_expiry(gateway_factory):
    g = gateway_factory(env=PLAIN)
    d = g.add_device(kind="weather")
    pack = senml_cbor([{"bn": "/3303/0/", "n": "5700", "v": 1.0}])
    with RawCoap(g) as c:
        # no secret and no NoSec: refused; a wrong one too; an unknown endpoint too
        assert c.request(rd(d.id, 1)).code_str == "4.01"
        assert c.request(rd(d.id, 2, secret="wrong-secret")).code_str == "4.01"
        assert c.request(rd("nobody", 3, secret=d.secret)).code_str == "4.01"
        assert not online(g, d.id)
        # Send from an address with no registration
        send = Msg(CON, POST, 4, b"s1", [(11, b"dp"), (12, bytes([CF_SENML_CBOR]))], pack)
        assert c.request(send).code_str == "4.01"
        # registered for one second, never updated: expires and the device goes offline
        a = c.request(rd(d.id, 5, lt=1, secret=d.secret))
        assert a.code_str == "2.01", a
        assert [v for n, v in a.options if n == 8][0] == b"rd"
        assert online(g, d.id)
        wait_until(lambda: not online(g, d.id), timeout=10, desc="registration expired")
        assert g.metric("citygw_lwm2m_registrations_total", event="expire") >= 1
        # updating an expired registration: 4.04, register again
        loc = [v for n, v in a.options if n == 8]
        upd = Msg(CON, POST, 6, b"u1", [(11, seg) for seg in loc] + [(15, b"t=" + d.secret.encode())])
        assert c.request(upd).code_str == "4.04"
        # malformed SenML in a Send from a registered address: 4.00 and a dead letter
        assert c.request(rd(d.id, 7, lt=60, secret=d.secret)).code_str == "2.01"
        bad = Msg(CON, POST, 8, b"s2", [(11, b"dp"), (12, bytes([CF_SENML_CBOR]))], b"\xff\x00")
        assert c.request(bad).code_str == "4.00"
    assert [x["reason"] for x in g.deadletters(d.id)] == ["malformed_lwm2m"]

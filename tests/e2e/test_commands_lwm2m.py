"""Commands to LwM2M clients: the Control API queues a Write (PUT) or Execute (POST), the gateway's
LwM2M server sends it to the client's registered address as a confirmable CoAP request, and the
client's answer decides the command's fate (2.04 -> SUCCEEDED, 4.xx/5.xx -> FAILED with the code).

The client is the real lwm2m-node-lib (tests/e2e/lwm2m/client.js), which registers without a
secret, so this gateway runs in LwM2M NoSec mode; raw UDP sockets (support.coap.RawCoap) play a
client that answers with chosen codes and a second client that tries to answer for it.
One gateway for the module; the kill -9 test restarts it and runs last.
"""

from __future__ import annotations

import time

import grpc
import pytest

from support import Gateway, wait_until
from support.coap import CON, POST, Msg, RawCoap
from support.lwm2m import NodeClient
from support.telemetry import rpc_error

AWAKE_S = 2
ENV = {
    "CITYGW_COAP__PLAIN_ENABLED": "true",
    "CITYGW_COAP__LWM2M_NOSEC": "true",
    # A queue-mode client listens this long after each Register/Update (default 93 s).
    "CITYGW_COAP__LWM2M_QUEUE_AWAKE_SECS": str(AWAKE_S),
    # RFC 7252 ACK_TIMEOUT (default 2000): an unanswered request gives up after 9-14 s, not 93.
    "CITYGW_COAP__LWM2M_ACK_TIMEOUT_MS": "300",
}
ACK, PUT, CHANGED = 2, 3, 0x44


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways(env=ENV)


def states(admin, command) -> list[str]:
    return [admin.state(e.state) for e in command.history]


def node_client(gw: Gateway, device_id: str, queue_mode: bool = False) -> NodeClient:
    c = NodeClient(gw, device_id, lifetime=300, temperature=20.0, battery=90,
                   queue_mode=queue_mode)
    c.expect("registered")
    return c


def test_write_and_execute_reach_the_client(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    client = node_client(gw, d.id)
    try:
        on = admin.send(d.id, "on", lwm2m=("write", "/3311/0/5850", "true"), ttl_ms=60_000)
        assert on.transport == "lwm2m" and admin.state(on.state) == "QUEUED", on
        # LwM2M plain text: a boolean resource is written "1"
        assert client.expect("write") == {"event": "write", "path": "/3311/0/5850", "value": "1"}
        done = admin.wait_state(on.id, "SUCCEEDED")
        assert states(admin, done) == ["QUEUED", "SENT", "SUCCEEDED"], done
        assert done.result == "2.04" and done.history[-1].by == f"device:{d.id}", done
        assert "PUT /3311/0/5850" in done.history[1].detail, done

        # the CLI's form
        dim = gw.cli("command", "send", d.id, "dim", "--lwm2m-write", "/3311/0/5851=40")
        assert client.expect("write")["value"] == "40"
        admin.wait_state(dim["id"], "SUCCEEDED")

        # Execute: the client answers after 800 ms, so an empty ACK comes first (DELIVERED)
        # and the answer as a separate response
        reboot = admin.send(d.id, "reboot", lwm2m=("execute", "/3/0/4", ""))
        assert client.expect("execute") == {"event": "execute", "path": "/3/0/4", "args": ""}
        done = admin.wait_state(reboot.id, "SUCCEEDED")
        assert states(admin, done) == ["QUEUED", "SENT", "DELIVERED", "SUCCEEDED"], done

        # a value the client refuses: FAILED with its code
        bad = admin.send(d.id, "dim", lwm2m=("write", "/3311/0/5851", "150"))
        assert client.expect("write")["value"] == "150"
        failed = admin.wait_state(bad.id, "FAILED")
        assert "4.00" in failed.error and "PUT /3311/0/5851" in failed.error, failed
        assert failed.history[-1].by == f"device:{d.id}"
    finally:
        client.close()
    assert gw.metric("citygw_command_requests_total", transport="lwm2m", event="sent") >= 4
    assert gw.metric("citygw_command_answers_total", transport="lwm2m", code="2.04") >= 3
    assert gw.metric("citygw_command_answers_total", transport="lwm2m", code="4.00") >= 1
    assert gw.metric("citygw_commands_total", transport="lwm2m", state="SUCCEEDED") >= 3


def test_queue_mode_client_gets_commands_after_its_update(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    client = node_client(gw, d.id, queue_mode=True)
    try:
        # registered with b=UQ; once its awake time has passed the client is asleep
        time.sleep(AWAKE_S + 0.5)
        first = admin.send(d.id, "on", lwm2m=("write", "/3311/0/5850", "1"))
        second = admin.send(d.id, "dim", lwm2m=("write", "/3311/0/5851", "60"))
        client.nothing("write", within=3)
        assert admin.state(admin.get(first.id).state) == "QUEUED"
        assert admin.state(admin.get(second.id).state) == "QUEUED"

        client.command("update")
        # both go out while it is awake, in order, one at a time
        assert client.expect("write")["path"] == "/3311/0/5850"
        assert client.expect("write")["path"] == "/3311/0/5851"
        a = admin.wait_state(first.id, "SUCCEEDED")
        b = admin.wait_state(second.id, "SUCCEEDED")
        assert b.history[1].time_ms >= a.history[-1].time_ms, (a, b)
    finally:
        client.close()


def rd(endpoint: str, mid: int) -> Msg:
    """A NoSec registration from a raw socket, binding U."""
    return Msg(CON, POST, mid, b"r", [(11, b"rd"), (15, b"ep=" + endpoint.encode()),
                                      (15, b"lt=300"), (15, b"b=U")], b"</3311/0>")


def test_answers_match_token_and_address(gw: Gateway, control):
    admin = control(gw)
    a, b = gw.add_device(kind="street_light"), gw.add_device(kind="street_light")
    with RawCoap(gw) as ca, RawCoap(gw) as cb:
        assert ca.request(rd(a.id, 1)).code_str == "2.01"
        assert cb.request(rd(b.id, 1)).code_str == "2.01"
        sent = admin.send(a.id, "off", lwm2m=("write", "/3311/0/5850", "false"))
        put = ca.recv(timeout=15)
        assert put is not None and put.type == CON and put.code == PUT, put
        assert [v for n, v in put.options if n == 11] == [b"3311", b"0", b"5850"]
        assert put.option(12) == b"" and put.payload == b"0", put  # text/plain, "0"
        admin.wait_state(sent.id, "SENT")

        before = {r: gw.metric("citygw_lwm2m_responses_ignored_total", reason=r)
                  for r in ("wrong_peer", "unknown_token")}
        # the other registered client answers a's request: ignored and counted
        cb.send(Msg(ACK, CHANGED, put.mid, put.token).encode())
        # an answer with a token nobody used
        cb.send(Msg(ACK, CHANGED, put.mid, b"nobody!!").encode())
        gw.wait_metric("citygw_lwm2m_responses_ignored_total", before["wrong_peer"] + 1,
                       reason="wrong_peer")
        gw.wait_metric("citygw_lwm2m_responses_ignored_total", before["unknown_token"] + 1,
                       reason="unknown_token")
        assert admin.state(admin.get(sent.id).state) == "SENT"

        # the client itself refuses it: FAILED with the code and its diagnostic
        ca.send(Msg(ACK, 0x85, put.mid, put.token, [], b"read-only").encode())  # 4.05
        failed = admin.wait_state(sent.id, "FAILED")
        assert "4.05 read-only" in failed.error, failed
        assert gw.metric("citygw_command_answers_total", transport="lwm2m", code="4.05") >= 1

    # an LwM2M operation for a device that reports another way is refused, not queued
    lora = gw.add_device(kind="street_light", dev_eui="70b3d57ed0000ab2")
    e = rpc_error(lambda: admin.send(lora.id, "on", lwm2m=("write", "/3311/0/5850", "1")))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "LwM2M" in e.details(), e
    assert admin.list(device_id=lora.id) == []


def test_unanswered_request_waits_for_the_next_update(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    with RawCoap(gw) as c:
        reg = c.request(rd(d.id, 1))
        assert reg.code_str == "2.01", reg
        location = [v for n, v in reg.options if n == 8]
        first = admin.send(d.id, "on", lwm2m=("write", "/3311/0/5850", "1"))
        second = admin.send(d.id, "dim", lwm2m=("write", "/3311/0/5851", "10"))
        # the client does not answer: the same message, five times (RFC 7252 retransmission)
        puts = [c.recv(timeout=10) for _ in range(5)]
        assert all(p is not None and p.code == PUT for p in puts), puts
        assert {(p.mid, p.token) for p in puts} == {(puts[0].mid, puts[0].token)}
        back = wait_until(lambda: (x := admin.get(first.id)) and len(x.history) == 3 and x,
                          timeout=20, desc="first command back in QUEUED")
        assert states(admin, back) == ["QUEUED", "SENT", "QUEUED"], back
        detail = back.history[2].detail
        assert "no answer to PUT /3311/0/5850 after 5 transmissions" in detail, detail
        assert "attempt 1 of 3" in detail, detail
        # nothing more goes to a client that did not answer, until it speaks again
        assert c.recv(timeout=1.5) is None
        assert admin.state(admin.get(second.id).state) == "QUEUED"

        # its next Update: the first command goes again (a new message), then the second
        c.send(Msg(CON, POST, 2, b"u", [(11, seg) for seg in location]).encode())
        got = [c.recv(timeout=10) for _ in range(2)]
        assert sorted(m.code_str for m in got if m is not None) == ["0.03", "2.04"], got
        (put,) = [m for m in got if m.code == PUT]
        assert put.mid != puts[0].mid and put.payload == b"1", put
        c.send(Msg(ACK, CHANGED, put.mid, put.token).encode())
        done = admin.wait_state(first.id, "SUCCEEDED")
        assert states(admin, done) == ["QUEUED", "SENT", "QUEUED", "SENT", "SUCCEEDED"], done
        put = c.recv(timeout=10)
        assert put is not None and put.payload == b"10", put
        c.send(Msg(ACK, CHANGED, put.mid, put.token).encode())
        admin.wait_state(second.id, "SUCCEEDED")
    assert gw.metric("citygw_command_requests_total", transport="lwm2m", event="no_answer") >= 1
    assert gw.metric("citygw_command_requests_total", transport="lwm2m",
                     event="retransmitted") >= 4


def test_queued_command_survives_kill9(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device(kind="street_light")
    # never registered: the command waits for the client
    waiting = admin.send(d.id, "on", lwm2m=("write", "/3311/0/5850", "1"), ttl_ms=600_000)
    assert admin.state(waiting.state) == "QUEUED" and waiting.transport == "lwm2m"
    admin.close()  # no gRPC channel open across the fork of the restart
    gw.kill9()
    gw.start()
    admin = control(gw)
    assert admin.state(admin.get(waiting.id).state) == "QUEUED"
    client = node_client(gw, d.id)
    try:
        assert client.expect("write")["path"] == "/3311/0/5850"
        done = admin.wait_state(waiting.id, "SUCCEEDED")
        assert states(admin, done) == ["QUEUED", "SENT", "SUCCEEDED"], done
    finally:
        client.close()

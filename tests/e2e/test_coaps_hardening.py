"""CoAP, CoAPS and LwM2M as an attacker tries them (issue 17): a flood of spoofed DTLS
ClientHellos, half-open handshakes, a device probing another's LwM2M registration, secrets
guessed over CoAP. Regression tests of defects found before the fix.

DTLS ClientHellos are built byte by byte (RFC 6347 section 4.2 and 4.3.2) from plain UDP
sockets, as a spoofing attacker would send them; the real device is libcoap's
`coap-client-openssl`.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess

import pytest

from support import Gateway, now_ms, senml_cbor, wait_until
from support.coap import CF_SENML_CBOR, POST, CON, Msg, coap_client, post_msg, telemetry_uri

# TLS_PSK_WITH_AES_128_CCM_8, TLS_PSK_WITH_AES_128_GCM_SHA256
PSK_SUITES = (0xC0A8, 0x00A8)


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways(env={
        "CITYGW_COAP__DTLS_MAX_SESSIONS": "300",
        "CITYGW_COAP__DTLS_HANDSHAKE_TIMEOUT_SECS": "3",
        "CITYGW_COAP__PLAIN_ENABLED": "true",
    })


def client_hello(cookie: bytes = b"", message_seq: int = 0, record_seq: int = 0,
                 random: bytes | None = None) -> bytes:
    """A DTLS 1.2 ClientHello in one record, offering CoAP's PSK suites."""
    random = random or os.urandom(32)
    suites = b"".join(struct.pack(">H", s) for s in PSK_SUITES)
    # renegotiation_info (empty) and extended_master_secret, as OpenSSL clients send them
    extensions = b"\xff\x01\x00\x01\x00" + b"\x00\x17\x00\x00"
    body = (b"\xfe\xfd" + random + b"\x00" + bytes([len(cookie)]) + cookie
            + struct.pack(">H", len(suites)) + suites + b"\x01\x00"
            + struct.pack(">H", len(extensions)) + extensions)
    hs = (b"\x01" + len(body).to_bytes(3, "big") + struct.pack(">H", message_seq)
          + b"\x00\x00\x00" + len(body).to_bytes(3, "big") + body)
    return (b"\x16\xfe\xfd" + b"\x00\x00" + record_seq.to_bytes(6, "big")
            + struct.pack(">H", len(hs)) + hs)


def handshake_type(datagram: bytes) -> int:
    """The handshake message type of the first record (3: HelloVerifyRequest, 2: ServerHello)."""
    assert datagram[0] == 22, f"not a handshake record: {datagram[:16].hex()}"
    return datagram[13]


def hello_verify_cookie(datagram: bytes) -> bytes:
    assert handshake_type(datagram) == 3
    body = datagram[13 + 12:]
    return body[3:3 + body[2]]


def rss_kib(gw: Gateway) -> int:
    status = open(f"/proc/{gw.proc.pid}/status").read()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def udp(gw: Gateway) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.connect((gw.host, gw.coaps_port))
    return s


# -- defect 1: the handshake flood


def test_a_hello_without_cookie_gets_a_stateless_hello_verify_request(gw: Gateway):
    s = udp(gw)
    try:
        hello = client_hello()
        s.send(hello)
        answer = s.recv(65535)
        assert handshake_type(answer) == 3, "answered with state (ServerHello) before a cookie"
        assert len(answer) <= len(hello), f"amplification: {len(answer)} bytes for {len(hello)}"
        assert len(hello_verify_cookie(answer)) >= 16
    finally:
        s.close()
    assert gw.metric("citygw_coaps_sessions") == 0
    assert gw.metric("citygw_coaps_hello_verify_requests_total") >= 1


def test_a_flood_of_spoofed_hellos_holds_no_state_and_locks_out_no_device(gw: Gateway):
    device = gw.add_device(kind="water_level", psk=True)
    rss_before = rss_kib(gw)
    datagrams0 = gw.metric("citygw_coaps_datagrams_total")
    hvr0 = gw.metric("citygw_coaps_hello_verify_requests_total")
    for _ in range(2000):  # each from a fresh port, none ever answers the cookie
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(client_hello(), (gw.host, gw.coaps_port))
        s.close()
    # UDP may drop some of a burst before the gateway reads them; every one it read is answered
    # with a HelloVerifyRequest and nothing else.
    seen: list[float] = []

    def settled() -> bool:
        seen.append(gw.metric("citygw_coaps_datagrams_total"))
        return len(seen) > 5 and seen[-1] == seen[-6]

    wait_until(settled, timeout=60, interval=0.2, desc="the flood to be read")
    received = gw.metric("citygw_coaps_datagrams_total") - datagrams0
    answered = gw.metric("citygw_coaps_hello_verify_requests_total") - hvr0
    assert received >= 1000, f"only {received} of 2000 hellos reached the gateway"
    assert answered == received, (received, answered)
    assert gw.metric("citygw_coaps_sessions") == 0
    grown = rss_kib(gw) - rss_before
    assert grown < 20_000, f"2000 spoofed hellos cost {grown} KiB"
    ts = now_ms()
    p = coap_client(telemetry_uri(gw, device.id, scheme="coaps", port=gw.coaps_port),
                    senml_cbor([{"bt": ts / 1000, "n": "water_level", "u": "m", "v": 2.5}]),
                    CF_SENML_CBOR, psk=(device.id, device.psk))
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    assert [r["value"] for r in gw.readings(device.id)] == [2.5]


def test_a_half_open_handshake_expires_on_time_and_is_counted(gw: Gateway):
    before = gw.metric("citygw_coaps_handshake_failures_total", reason="timeout")
    s = udp(gw)
    try:
        random = os.urandom(32)
        s.send(client_hello(random=random))
        cookie = hello_verify_cookie(s.recv(65535))
        # The cookie proves the address: now a session exists, handshaking...
        s.send(client_hello(cookie, message_seq=1, record_seq=1, random=random))
        assert handshake_type(s.recv(65535)) == 2, "no ServerHello after a valid cookie"
        gw.wait_metric("citygw_coaps_sessions", 1)
        # ...and this client never finishes it (timeout 3 s in this module).
        wait_until(lambda: gw.metric("citygw_coaps_sessions") == 0, timeout=10,
                   desc="the half-open session to expire")
        gw.wait_metric("citygw_coaps_handshake_failures_total", before + 1, reason="timeout")
    finally:
        s.close()


# -- defect 6: a device probing another's LwM2M registration learns nothing


def test_another_devices_registration_is_not_named(gw: Gateway):
    owner = gw.add_device(kind="weather", psk=True)
    prober = gw.add_device(kind="weather", psk=True)
    base = f"coaps://{gw.host}:{gw.coaps_port}"
    p = coap_client(f"{base}/rd?ep={owner.id}&lt=60", b"</3303/0>", 40,
                    psk=(owner.id, owner.psk))
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr
    (reg,) = gw.cli("lwm2m", "list", "--device", owner.id)
    path = reg["id"].lstrip("/")
    for method in ("post", "delete"):
        p = subprocess.run(["coap-client-openssl", "-m", method, "-B", "10",
                            "-u", prober.id, "-k", prober.psk, f"{base}/{path}"],
                           capture_output=True, timeout=20)
        out = (p.stdout + p.stderr).decode(errors="replace")
        assert "4.04" in out, out
        assert owner.id not in out, f"the answer names the device behind {path}: {out}"
    # still registered
    assert gw.cli("lwm2m", "list", "--device", owner.id)


# -- defect 3: guessing secrets over CoAP and LwM2M backs off


@pytest.mark.parametrize("what", ["telemetry", "lwm2m"])
def test_guessing_a_coap_secret_backs_off_without_locking_out_the_device(gw: Gateway, what):
    d = gw.add_device()
    attacker, device_host = ("127.0.0.2", "127.0.0.3") if what == "telemetry" \
        else ("127.0.0.4", "127.0.0.5")

    def ask(source: str, secret: str, mid: int) -> Msg:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((source, 0))
        s.settimeout(10)
        try:
            if what == "telemetry":
                m = post_msg(d.id, b'{"temp": 20}', mid, secret=secret)
            else:
                m = Msg(type=CON, code=POST, mid=mid, token=b"rg",
                        options=[(11, b"rd"), (15, f"ep={d.id}".encode()),
                                 (15, f"t={secret}".encode()), (15, b"lt=60")],
                        payload=b"</3303/0>")
            s.sendto(m.encode(), (gw.host, gw.coap_port))
            return Msg.decode(s.recvfrom(65535)[0])
        finally:
            s.close()

    answers = [ask(attacker, "wrong-" + d.secret, 100 + i).code_str for i in range(8)]
    assert answers[:5] == ["4.01"] * 5, answers
    assert set(answers[5:]) == {"4.29"}, answers
    throttled = ask(attacker, d.secret, 200)
    assert throttled.code_str == "4.29" and throttled.option(14), "4.29 with Max-Age"
    ok = ask(device_host, d.secret, 300)
    assert ok.code_str in ("2.04", "2.01"), ok.code_str

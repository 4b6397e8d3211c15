"""Garbage on every listener: bytes that are not the protocol at all, truncated packets, absurd
lengths. Each offender's connection is closed (or answered with an error); the gateway keeps
serving a well-behaved device on the same listener, and nothing it acknowledged is lost.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from support import Gateway, wait_until

GARBAGE = {
    "random bytes": os.urandom(4096),
    "http on the mqtt port": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    # CONNECT with protocol name "MQTX".
    "bad protocol name": bytes([0x10, 0x0C, 0x00, 0x04]) + b"MQTX" + bytes([0x04, 0x02, 0x00, 0x3C, 0x00, 0x00]),
    # CONNECT announcing 200 bytes, then the peer stops after 3.
    "truncated connect": bytes([0x10, 0xC8, 0x01, 0x00, 0x04]) + b"MQ",
    # A remaining length of 268,435,455 (the maximum) before any CONNECT.
    "absurd remaining length": bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]) + b"x" * 64,
    # PUBLISH before CONNECT.
    "publish before connect": bytes([0x30, 0x0A, 0x00, 0x03]) + b"a/b" + b"hello",
}


def _host_port(listen: str) -> tuple[str, int]:
    host, port = listen.rsplit(":", 1)
    return host.strip("[]"), int(port)


def _closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the server closed the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("name", list(GARBAGE))
def test_mqtt_garbage_is_dropped_and_others_keep_publishing(gw: Gateway, name: str):
    dev = gw.add_device(kind="traffic")
    with gw.connected_client(dev, version=5) as good:
        assert good.publish(dev.topic, json.dumps({"vehicle_count": 1})) == 0
        sock = socket.create_connection(_host_port(gw.mqtt_listen), timeout=5)
        try:
            try:
                sock.sendall(GARBAGE[name])
                if name == "truncated connect":
                    # The peer stalls mid-packet; the server must not wait forever for it,
                    # but the handshake timeout (30 s) is longer than this test: shut our
                    # side so the server sees the truncation now.
                    sock.shutdown(socket.SHUT_WR)
            except (ConnectionResetError, BrokenPipeError):
                pass
            assert _closed_by_server(sock), f"server kept a connection open after {name!r}"
        finally:
            sock.close()
        assert good.publish(dev.topic, json.dumps({"vehicle_count": 2})) == 0
        assert good.connected
    values = [r["value"] for r in gw.readings(dev.id)]
    assert values == [1.0, 2.0]


def test_grpc_and_http_listeners_survive_garbage(gw: Gateway):
    for listen in (gw.grpc_url.removeprefix("http://"), gw.http_base.removeprefix("http://")):
        for payload in (os.urandom(2048), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(512)):
            sock = socket.create_connection(_host_port(listen), timeout=5)
            try:
                try:
                    sock.sendall(payload)
                except (ConnectionResetError, BrokenPipeError):
                    pass
                assert _closed_by_server(sock), f"{listen} kept a garbage connection open"
            finally:
                sock.close()
    # Both still answer real clients.
    assert gw.http_get("/healthz").status_code == 200
    assert gw.http_get("/no-such-path").status_code == 404
    assert isinstance(gw.cli("device", "list"), list)
    wait_until(lambda: gw.running, timeout=1)

"""MQTT packets written byte by byte, for what no client library will send on purpose: topic
names with wildcards or U+0000, topic aliases the server never offered, 65,535-byte client ids,
a will on another device's topic and a connection dropped without DISCONNECT so the will fires.
MQTT 3.1.1 (OASIS, section 3) and MQTT 5 (section 3) encodings.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect(client_id: str, username: str | None = None, password: str | None = None,
            version: int = 4, will: tuple[str, bytes, int, bool] | None = None,
            clean: bool = True, keepalive: int = 30) -> bytes:
    """CONNECT; `version` 4 is MQTT 3.1.1, 5 is MQTT 5; `will` = (topic, payload, qos, retain)."""
    flags = 0x02 if clean else 0
    payload = _str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        if version == 5:
            payload += _varint(0)  # will properties
        payload += _str(topic) + _str(message)
    if username is not None:
        flags |= 0x80
        payload += _str(username)
    if password is not None:
        flags |= 0x40
        payload += _str(password)
    header = _str("MQTT") + bytes([version, flags]) + struct.pack(">H", keepalive)
    if version == 5:
        header += _varint(0)  # connect properties
    return _packet(0x10, header + payload)


def publish(topic: str | bytes, payload: bytes, qos: int = 1, packet_id: int = 1,
            version: int = 4, topic_alias: int | None = None) -> bytes:
    body = _str(topic)
    if qos:
        body += struct.pack(">H", packet_id)
    if version == 5:
        props = b"" if topic_alias is None else bytes([0x23]) + struct.pack(">H", topic_alias)
        body += _varint(len(props)) + props
    return _packet(0x30 | (qos << 1), body + payload)


def disconnect(version: int = 4) -> bytes:
    return b"\xe0\x00" if version == 4 else b"\xe0\x01\x00"


@dataclass
class Packet:
    type: int
    flags: int
    body: bytes


def read_packet(sock: socket.socket, timeout: float = 10.0) -> Packet | None:
    """The next packet, or None when the server closed the connection."""
    sock.settimeout(timeout)

    def exactly(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    first = exactly(1)
    if first is None:
        return None
    length, mult = 0, 1
    while True:
        b = exactly(1)
        if b is None:
            return None
        length += (b[0] & 0x7F) * mult
        mult *= 128
        if not b[0] & 0x80:
            break
    body = exactly(length) if length else b""
    if body is None:
        return None
    return Packet(first[0] >> 4, first[0] & 0x0F, body)


def connack_code(p: Packet | None) -> int | None:
    """CONNACK return code (3.1.1) or reason code (5); None when the connection closed first."""
    if p is None:
        return None
    assert p.type == 2, f"expected CONNACK, got packet type {p.type}"
    return p.body[1]


def open_socket(host: str, port: int, source: str | None = None,
                timeout: float = 10.0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source is not None:
        s.bind((source, 0))
    s.connect((host, port))
    return s


def raw_connect(host: str, port: int, client_id: str, username: str | None = None,
                password: str | None = None, version: int = 4, source: str | None = None,
                will: tuple[str, bytes, int, bool] | None = None) -> tuple[socket.socket, int | None]:
    """Opens a connection and sends CONNECT; returns the socket and the CONNACK code."""
    s = open_socket(host, port, source)
    s.sendall(connect(client_id, username, password, version, will))
    return s, connack_code(read_packet(s))


def closed_after(sock: socket.socket, data: bytes, timeout: float = 10.0) -> tuple[bool, list[Packet]]:
    """Sends `data`; returns whether the server then closed the connection (within `timeout`)
    and the packets it sent before."""
    sock.sendall(data)
    seen: list[Packet] = []
    while True:
        try:
            p = read_packet(sock, timeout)
        except socket.timeout:
            return False, seen
        if p is None:
            return True, seen
        seen.append(p)

"""MQTT packets written byte by byte, for what no client library does on purpose or on cue:
a CONNECT right after the previous connection of the same client id dropped, with the exact
CONNACK code. MQTT 3.1.1 (OASIS, section 3) and MQTT 5 (section 3) encodings.
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
            version: int = 4, clean: bool = True, keepalive: int = 30) -> bytes:
    """CONNECT; `version` 4 is MQTT 3.1.1, 5 is MQTT 5."""
    flags = 0x02 if clean else 0
    payload = _str(client_id)
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
                password: str | None = None, version: int = 4,
                source: str | None = None) -> tuple[socket.socket, int | None]:
    """Opens a connection and sends CONNECT; returns the socket and the CONNACK code."""
    s = open_socket(host, port, source)
    s.sendall(connect(client_id, username, password, version))
    return s, connack_code(read_packet(s))

"""CoAP peers for the end-to-end tests: libcoap's `coap-client-notls` / `coap-client-openssl`
(Debian libcoap3-bin), aiocoap (PyPI), and a raw UDP socket for what no client library will send
on purpose (the same message id twice, broken datagrams).

Telemetry goes to `POST /t/{device}[/{format}]`; on plain CoAP the device secret rides in the
Uri-Query `t=<secret>`.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
from dataclasses import dataclass, field

from . import Device, Gateway

# CoAP Content-Format numbers (IANA registry)
CF_JSON = 50
CF_SENML_JSON = 110
CF_SENML_CBOR = 112
CF_CBOR = 60
CF_OCTET_STREAM = 42

CON, NON, ACK, RST = 0, 1, 2, 3
POST, GET = 2, 1


def code(s: str) -> int:
    """"2.04" -> 0x44."""
    c, d = s.split(".")
    return (int(c) << 5) | int(d)


def code_str(c: int) -> str:
    return f"{c >> 5}.{c & 31:02d}"


def telemetry_uri(gw: Gateway, device: Device | str, fmt: str | None = None,
                  secret: str | None = None, scheme: str = "coap", host: str | None = None,
                  port: int | None = None) -> str:
    dev_id = device if isinstance(device, str) else device.id
    h = host or gw.host
    h = f"[{h}]" if ":" in h else h
    uri = f"{scheme}://{h}:{port or gw.coap_port}/t/{dev_id}" + (f"/{fmt}" if fmt else "")
    if secret is None and isinstance(device, Device) and scheme == "coap":
        secret = device.secret
    if secret is not None:
        uri += f"?t={secret}"
    return uri


# --------------------------------------------------------------------------------------------
# libcoap


def coap_client(uri: str, payload: bytes, content_format: int | None = None, *, non: bool = False,
                block: int | None = None, psk: tuple[str, str] | None = None,
                timeout: float = 20.0) -> subprocess.CompletedProcess:
    """POST with libcoap's client (-notls, or -openssl with a PSK); the payload goes through a
    file on stdin (-f -) so binary CBOR survives. Output is bytes (stdout: response payload)."""
    exe = shutil.which("coap-client-openssl" if psk else "coap-client-notls")
    assert exe, "libcoap3-bin not installed (tests/run installs it)"
    argv = [exe, "-m", "post", "-B", str(int(timeout / 2)), "-f", "-"]
    if content_format is not None:
        argv += ["-t", str(content_format)]
    if non:
        argv.append("-N")
    if block is not None:
        argv += ["-b", str(block)]
    if psk is not None:
        argv += ["-u", psk[0], "-k", psk[1]]
    argv.append(uri)
    return subprocess.run(argv, input=payload, capture_output=True, timeout=timeout)


# --------------------------------------------------------------------------------------------
# aiocoap


async def _aiocoap_post(uri: str, payload: bytes, content_format: int | None, non: bool):
    import aiocoap

    ctx = await aiocoap.Context.create_client_context()
    try:
        kw = {}
        if non:
            kw["transport_tuning"] = aiocoap.Unreliable
        msg = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=payload, **kw)
        if content_format is not None:
            msg.opt.content_format = content_format
        resp = await asyncio.wait_for(ctx.request(msg).response, 20)
        return code_str(int(resp.code)), resp.payload
    finally:
        await ctx.shutdown()


def aiocoap_post(uri: str, payload: bytes, content_format: int | None = None,
                 non: bool = False) -> tuple[str, bytes]:
    """POST with aiocoap (blockwise automatically for large payloads); returns ("2.04", payload)."""
    return asyncio.run(_aiocoap_post(uri, payload, content_format, non))


# --------------------------------------------------------------------------------------------
# raw datagrams


@dataclass
class Msg:
    type: int
    code: int
    mid: int
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""

    def encode(self) -> bytes:
        out = bytearray([0x40 | (self.type << 4) | len(self.token), self.code])
        out += struct.pack("!H", self.mid) + self.token
        last = 0
        for num, val in sorted(self.options, key=lambda o: o[0]):
            delta, length = num - last, len(val)
            last = num

            def nib(n: int) -> tuple[int, bytes]:
                if n < 13:
                    return n, b""
                if n < 269:
                    return 13, bytes([n - 13])
                return 14, struct.pack("!H", n - 269)

            d, dx = nib(delta)
            ln, lx = nib(length)
            out += bytes([(d << 4) | ln]) + dx + lx + val
        if self.payload:
            out += b"\xff" + self.payload
        return bytes(out)

    @staticmethod
    def decode(b: bytes) -> "Msg":
        assert len(b) >= 4 and b[0] >> 6 == 1, b
        tkl = b[0] & 15
        m = Msg(type=(b[0] >> 4) & 3, code=b[1], mid=struct.unpack("!H", b[2:4])[0],
                token=b[4:4 + tkl])
        i, num = 4 + tkl, 0
        while i < len(b):
            if b[i] == 0xFF:
                m.payload = b[i + 1:]
                break
            d, ln = b[i] >> 4, b[i] & 15
            i += 1
            vals = []
            for x in (d, ln):
                if x == 13:
                    vals.append(b[i] + 13)
                    i += 1
                elif x == 14:
                    vals.append(struct.unpack("!H", b[i:i + 2])[0] + 269)
                    i += 2
                else:
                    vals.append(x)
            num += vals[0]
            m.options.append((num, b[i:i + vals[1]]))
            i += vals[1]
        return m

    def option(self, num: int) -> bytes | None:
        return next((v for n, v in self.options if n == num), None)

    @property
    def code_str(self) -> str:
        return code_str(self.code)


def uint(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""


def post_msg(device: Device | str, payload: bytes, mid: int, *, token: bytes = b"tk",
             secret: str | None = None, content_format: int | None = None,
             type: int = CON, fmt: str | None = None) -> Msg:
    dev_id = device if isinstance(device, str) else device.id
    if secret is None and isinstance(device, Device):
        secret = device.secret
    opts = [(11, b"t"), (11, dev_id.encode())]
    if fmt:
        opts.append((11, fmt.encode()))
    if content_format is not None:
        opts.append((12, uint(content_format)))
    if secret is not None:
        opts.append((15, b"t=" + secret.encode()))
    return Msg(type=type, code=POST, mid=mid, token=token, options=opts, payload=payload)


class RawCoap:
    """One UDP socket (one endpoint) talking to the gateway's CoAP port."""

    def __init__(self, gw: Gateway, host: str | None = None):
        self.host = host or gw.host
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.settimeout(10)
        self.addr = (self.host, gw.coap_port)

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.addr)

    def recv(self, timeout: float = 10.0) -> Msg | None:
        self.sock.settimeout(timeout)
        try:
            data, _ = self.sock.recvfrom(65535)
        except socket.timeout:
            return None
        return Msg.decode(data)

    def request(self, m: Msg, timeout: float = 10.0) -> Msg:
        self.send(m.encode())
        r = self.recv(timeout)
        assert r is not None, f"no answer to {m}"
        return r

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "RawCoap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

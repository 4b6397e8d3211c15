"""LoRaWAN network-server side of the bridge tests: a real Mosquitto broker standing in for the
network server's broker, events built with ChirpStack's own published classes (the
`chirpstack-api` package) or after the documented TTS examples, and the `[[lorawan]]` config.

- `Mosquitto` (`/usr/sbin/mosquitto`, Debian package): one broker on a free loopback port with a
  generated config, anonymous access, and persistence in its temp dir (`persistence true`,
  `persistence_location`), so a SIGTERM + start keeps the queued QoS 1 messages of persistent
  sessions. `stop()`/`start()` reuse the port and the data dir.
- `NetworkServer`: a paho-mqtt publisher on that broker, publishing as a network server would
  (QoS 1, waits for the broker's PUBACK).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import tempfile
from pathlib import Path

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from . import Gateway, MqttClient, free_port, unique_id
from .tsdb import ServerProcess

MOSQUITTO_BIN = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Mosquitto(ServerProcess):
    name = "mosquitto"

    def __init__(self, workdir: Path, max_inflight: int = 20, tls: "Pki | None" = None,
                 log_packets: bool = False):
        super().__init__(workdir)
        self.tls = tls
        self.port = free_port("127.0.0.1")       # kept across stop()/start()
        self.data_dir = self.workdir / "mosquitto-data"
        self.data_dir.mkdir(exist_ok=True)
        self.conf = self.workdir / "mosquitto.conf"
        # Started as root, mosquitto switches to the user "mosquitto", who cannot write the
        # persistence file into our temp dir: stay who we are.
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(user +
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.data_dir}/\n"
            f"max_inflight_messages {max_inflight}\n"
            "max_queued_messages 100000\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # every packet sent and received, with its packet id, in order (into log_path)
            + ("log_type debug\n" if log_packets else "") +
            "log_dest stderr\n"
            + (f"cafile {tls.ca}\ncertfile {tls.cert}\nkeyfile {tls.key}\n" if tls else ""))

    def argv(self) -> list[str]:
        return [MOSQUITTO_BIN, "-c", str(self.conf)]

    def healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def publisher(self, client_id: str | None = None) -> "NetworkServer":
        ns = NetworkServer(self, client_id or unique_id("ns"))
        return ns


class NetworkServer:
    """Publishes network-server events on the broker, QoS 1, waiting for each PUBACK."""

    def __init__(self, broker: Mosquitto, client_id: str):
        self.client = MqttClient("127.0.0.1", broker.port, client_id=client_id, version=311)
        if broker.tls is not None:
            self.client.client.tls_set(ca_certs=str(broker.tls.ca))
        rc = self.client.connect()
        assert rc == 0, f"publisher could not connect to mosquitto: {rc}"

    def publish(self, topic: str, payload: bytes | str) -> None:
        rc = self.client.publish(topic, payload, qos=1)
        assert rc == 0, f"mosquitto refused {topic}: {rc}"

    def publish_many(self, topic_payloads: list[tuple[str, bytes | str]]) -> None:
        infos = [self.client.publish_async(t, p, qos=1) for t, p in topic_payloads]
        for info in infos:
            assert self.client.wait_ack(info.mid) == 0

    def close(self) -> None:
        self.client.close()


class Brokers:
    """Starts Mosquitto brokers in temp dirs; `close()` kills them all."""

    def __init__(self, name: str):
        self.name = name
        self.servers: list[Mosquitto] = []
        self.dirs: list[Path] = []
        self.publishers: list[NetworkServer] = []

    def mosquitto(self, start: bool = True, max_inflight: int = 20, tls: "Pki | None" = None,
                  log_packets: bool = False) -> Mosquitto:
        d = Path(tempfile.mkdtemp(prefix="citygw-mosquitto-"))
        self.dirs.append(d)
        m = Mosquitto(d, max_inflight=max_inflight, tls=tls, log_packets=log_packets)
        self.servers.append(m)
        if start:
            m.start()
        return m

    def pki(self, name: str = "city-ca") -> "Pki":
        d = Path(tempfile.mkdtemp(prefix="citygw-pki-"))
        self.dirs.append(d)
        return Pki(d, name)

    def publisher(self, broker: Mosquitto) -> NetworkServer:
        p = broker.publisher()
        self.publishers.append(p)
        return p

    def close(self) -> None:
        for p in self.publishers:
            p.close()
        for s in self.servers:
            s.close()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


class Pki:
    """A throw-away CA and a server certificate for 127.0.0.1 (SAN IP), made with openssl."""

    def __init__(self, workdir: Path, name: str):
        import subprocess

        self.ca, self.ca_key = workdir / "ca.pem", workdir / "ca.key"
        self.cert, self.key = workdir / "server.pem", workdir / "server.key"
        csr, ext = workdir / "server.csr", workdir / "san.ext"
        ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n"
                       "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\n"
                       "extendedKeyUsage = serverAuth\n")

        def run(*argv):
            p = subprocess.run(["openssl", *argv], capture_output=True, text=True)
            assert p.returncode == 0, f"openssl {argv[0]}: {p.stderr}"

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", str(self.ca_key), "-out", str(self.ca))
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(self.key), "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(self.cert))
        for f in (self.key, self.cert, self.ca):
            f.chmod(0o644)


# --------------------------------------------------------------------------------------------
# config


def lorawan_toml(broker: Mosquitto, name: str = "ns1", server_type: str = "chirpstack_v4",
                 **extra) -> str:
    """One `[[lorawan]]` entry for `broker`; quick reconnects so restarts are found fast."""
    lines = ["[[lorawan]]", f'name = "{name}"', f'type = "{server_type}"',
             'host = "127.0.0.1"', f"port = {broker.port}", "backoff_min_ms = 50",
             "backoff_max_ms = 500", "keep_alive_secs = 5"]
    for k, v in extra.items():
        if isinstance(v, str):
            lines.append(f'{k} = "{v}"')
        elif isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        else:
            lines.append(f"{k} = {v}")
    return "\n".join(lines) + "\n"


def wait_bridge_connected(gw: Gateway, name: str = "ns1", connects: int = 1,
                          timeout: float = 20.0) -> None:
    gw.wait_metric("citygw_lorawan_connects_total", connects, timeout=timeout, server=name)
    gw.wait_metric("citygw_lorawan_connected", 1, timeout=timeout, server=name)


def new_dev_eui() -> str:
    return os.urandom(8).hex()


# --------------------------------------------------------------------------------------------
# ChirpStack v4 events, with ChirpStack's own classes


def chirpstack_topic(dev_eui: str, event: str = "up", app: str = "app-1") -> str:
    return f"application/{app}/device/{dev_eui}/event/{event}"


def ts(ms: int) -> Timestamp:
    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def chirpstack_uplink(dev_eui: str, f_cnt: int, time_ms: int, data: bytes = b"",
                      f_port: int = 1, dr: int = 5, gateways: list[tuple[int, float]] = ((-60, 7.5),),
                      frequency: int = 923_200_000, sf: int = 7, obj: dict | None = None):
    """An `integration.UplinkEvent` as ChirpStack v4 publishes it."""
    from chirpstack_api import integration

    e = integration.UplinkEvent()
    e.deduplication_id = unique_id("dedup")
    e.time.CopyFrom(ts(time_ms))
    e.device_info.tenant_id = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"
    e.device_info.tenant_name = "City"
    e.device_info.application_id = "app-1"
    e.device_info.application_name = "water"
    e.device_info.device_name = f"dev-{dev_eui}"
    e.device_info.dev_eui = dev_eui
    e.dev_addr = "01a2b3c4"
    e.adr = True
    e.dr = dr
    e.f_cnt = f_cnt
    e.f_port = f_port
    e.data = data
    if obj is not None:
        e.object.update(obj)
    for i, (rssi, snr) in enumerate(gateways):
        rx = e.rx_info.add()
        rx.gateway_id = f"0016c001f1{i:06x}"
        rx.uplink_id = 1000 + i
        rx.rssi = rssi
        rx.snr = snr
        rx.channel = 2
        rx.ns_time.CopyFrom(ts(time_ms))
    e.tx_info.frequency = frequency
    e.tx_info.modulation.lora.bandwidth = 125000
    e.tx_info.modulation.lora.spreading_factor = sf
    return e


def as_json(msg) -> str:
    """protobuf's JSON mapping, as ChirpStack's JSON marshaler writes it (lowerCamelCase)."""
    return json_format.MessageToJson(msg)


def rfc3339(ms: int) -> str:
    t = dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}123456Z"


# --------------------------------------------------------------------------------------------
# The Things Stack v3, after the documented uplink example


def tts_topic(device_id: str, event: str = "up", app: str = "water-app", tenant: str = "ttn") -> str:
    return f"v3/{app}@{tenant}/devices/{device_id}/{event}"


def tts_uplink(device_id: str, dev_eui: str | None, f_cnt: int, time_ms: int,
               frm_payload: bytes = b"", decoded: dict | None = None,
               gateways: list[tuple[int, float]] = ((-35, 5.2),), sf: int = 7,
               frequency: int = 868_500_000) -> dict:
    import base64

    ids = {"device_id": device_id, "application_ids": {"application_id": "water-app"},
           "join_eui": "800000000000000C", "dev_addr": "00BCB929"}
    if dev_eui is not None:
        ids["dev_eui"] = dev_eui.upper()
    up = {
        "session_key_id": "AXBSH1Pk6Z0G166BTeIlPA==",
        "f_port": 1,
        "frm_payload": base64.b64encode(frm_payload).decode(),
        "rx_metadata": [{
            "gateway_ids": {"gateway_id": f"gtw{i}", "eui": f"9C5C8E00001A05C{i}"},
            "time": rfc3339(time_ms), "timestamp": 2463457000, "rssi": rssi,
            "channel_rssi": rssi, "snr": snr,
            "uplink_token": "ChIKEAoEZ3R3MRIInFyOAAAaBcQQ6NPr9QgaDAiUw5DyBRDq0JXwAiCo+NTy3Ug=",
            "channel_index": 2,
        } for i, (rssi, snr) in enumerate(gateways)],
        "settings": {"data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": sf}},
                     "coding_rate": "4/5", "frequency": str(frequency), "timestamp": 2463457000,
                     "time": rfc3339(time_ms)},
        "received_at": rfc3339(time_ms),
        "consumed_airtime": "0.056576s",
    }
    if f_cnt:
        # protobuf's JSON mapping leaves zero values out
        up["f_cnt"] = f_cnt
    if decoded is not None:
        up["decoded_payload"] = decoded
    return {"end_device_ids": ids, "correlation_ids": ["as:up:01E0ZQ9BPXC8DFMG9FXDF0PAB4"],
            "received_at": rfc3339(time_ms + 5), "uplink_message": up}


# --------------------------------------------------------------------------------------------
# gateway side


def wait_readings(gw: Gateway, device, at_least: int, timeout: float = 15.0) -> dict[str, list[dict]]:
    """The readings of `device` (a Device or an id) by quantity, once there are `at_least`."""
    from . import by_quantity, wait_until

    device_id = getattr(device, "id", device)

    def enough():
        rs = gw.readings(device_id)
        return rs if len(rs) >= at_least else None
    return by_quantity(wait_until(enough, timeout, desc=f"{at_least} readings of {device}"))

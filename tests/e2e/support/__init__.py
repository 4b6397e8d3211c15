"""Helpers for the end-to-end tests: start the real `citygw` binary, drive its CLI, read its
metrics, and talk MQTT to it with real clients (paho-mqtt, mosquitto_pub).

Everything binds to loopback only, on ports picked free at start time.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import paho.mqtt.client as mqtt
import requests
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[3]
CITYGW_BIN = Path(os.environ.get("CITYGW_BIN", ROOT / "target" / "debug" / "citygw"))

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# waiting without sleep-and-hope


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               desc: str | None = None) -> T:
    """Poll `pred` until it returns something truthy; return that. Fail after `timeout` seconds,
    saying what was awaited and the last value (or exception) seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            last = pred()
            last_exc = None
            if last:
                return last
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported below if it persists
            last_exc = exc
        if time.monotonic() >= deadline:
            what = desc or getattr(pred, "__name__", "condition")
            detail = f"last exception: {last_exc!r}" if last_exc else f"last value: {last!r}"
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; {detail}")
        time.sleep(interval)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def rfc3339_ms(ms: int, tz_hours: int = 0) -> str:
    """RFC 3339 with milliseconds, e.g. 2026-11-23T13:15:30.250+07:00 (or Z for UTC)."""
    tz = dt.timezone(dt.timedelta(hours=tz_hours))
    t = dt.datetime.fromtimestamp(ms / 1000, tz=tz)
    s = t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}"
    if tz_hours == 0:
        return s + "Z"
    sign = "+" if tz_hours > 0 else "-"
    return s + f"{sign}{abs(tz_hours):02d}:00"


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------------------------
# networking


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# Ports already handed out in this test process: the kernel may offer a just-closed port again,
# and two listeners of one gateway (or a gateway and its broker) must never get the same one.
_HANDED_OUT: set[tuple[int, int]] = set()


def _free(host: str, kind: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if (kind, port) not in _HANDED_OUT and (socket.SOCK_STREAM + socket.SOCK_DGRAM - kind,
                                                port) not in _HANDED_OUT:
            _HANDED_OUT.add((kind, port))
            return port


def free_port(host: str = "127.0.0.1") -> int:
    return _free(host, socket.SOCK_STREAM)


def free_udp_port(host: str = "127.0.0.1") -> int:
    return _free(host, socket.SOCK_DGRAM)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------------------------
# Prometheus text


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    def __init__(self, text: str):
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if not m:
                continue
            name, labels, value = m.group(1), m.group(2) or "", m.group(3)
            try:
                v = float(value)
            except ValueError:
                continue
            self.samples.append((name, dict(_LABEL.findall(labels)), v))

    def names(self) -> set[str]:
        return {n for n, _, _ in self.samples}

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and all(l.get(k) == v for k, v in labels.items())
                   for n, l, _ in self.samples)

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`; 0 when there are none."""
        return sum(v for n, l, v in self.samples
                   if n == name and all(l.get(k) == val for k, val in labels.items()))


# --------------------------------------------------------------------------------------------
# the gateway process


class CliError(Exception):
    def __init__(self, args: list[str], proc: subprocess.CompletedProcess):
        self.proc = proc
        super().__init__(f"citygw {' '.join(args)} exited {proc.returncode}\n"
                         f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}")


class GatewayExited(AssertionError):
    """The gateway process ended while a test waited for it (an AssertionError, so `wait_until`
    stops at once instead of polling a dead process until its timeout)."""


def _clean_env() -> dict[str, str]:
    """The test runner's environment without any CITYGW_* variable (ours, e.g. CITYGW_BIN, would
    otherwise be read as config overrides)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CITYGW_")}


class Device:
    """A provisioned device: id, secret and the registry record the CLI returned."""

    def __init__(self, record: dict, secret: str, psk: str | None = None):
        self.record = record
        self.id: str = record["id"]
        self.secret = secret
        self.psk = psk  # DTLS pre-shared key (CoAPS), when provisioned

    @property
    def topic(self) -> str:
        return f"devices/{self.id}/telemetry"

    def __repr__(self) -> str:
        return f"Device({self.id!r})"


class Agency:
    """An agency of the Telemetry API: its record as the CLI printed it and its bearer token."""

    def __init__(self, record: dict, token: str):
        self.record = record
        self.name: str = record["name"]
        self.token = token

    def __repr__(self) -> str:
        return f"Agency({self.name!r})"


def stop_process(proc: subprocess.Popen | None, name: str, timeout: float) -> int:
    """SIGTERM and wait; returns the exit code, fails the test if the server does not exit."""
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{name} did not exit within {timeout}s of SIGTERM") from None


def kill_process(proc: subprocess.Popen | None) -> None:
    """Kill a server we started, if it still runs (teardown, also after a failed test)."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass


def tail_file(path: Path, lines: int) -> str:
    """The last lines of a log file, for failure reports."""
    try:
        data = path.read_bytes().decode("utf-8", "replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(data[-lines:])


class Gateway:
    """One `citygw run` process with its own data dir and loopback ports.

    `restart()` keeps the data dir (and picks new ports, so a killed process's sockets in
    TIME_WAIT never matter)."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 name: str = "gateway", config: Path | None = None, open_files: int | None = None,
                 tls_ca: Path | None = None, http_tls: bool = False, grpc_tls: bool = False,
                 client_cert: tuple[Path, Path] | None = None):
        if not CITYGW_BIN.exists():
            raise FileNotFoundError(
                f"citygw binary not found at {CITYGW_BIN}: run tests/run (it builds it) "
                f"or set CITYGW_BIN")
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "gateway.log"
        self.host = host
        self.name = name
        self.token = "adm-" + uuid.uuid4().hex
        self.extra_env = dict(env or {})
        self.config = Path(config) if config is not None else None
        # RLIMIT_NOFILE (soft and hard) for the process, as systemd's LimitNOFILE would set it.
        self.open_files = open_files
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.mqtt_port = self.grpc_port = self.http_port = 0
        self.mqtt_tls_port = self.mqtt_mtls_port = 0
        self.coap_port = self.coaps_port = 0
        # TLS: the CA the gateway's certificates chain to, which listeners use it, and the
        # client certificate the CLI shows a gateway that requires one (gRPC mTLS).
        self.tls_ca = Path(tls_ca) if tls_ca is not None else None
        self.http_tls, self.grpc_tls = http_tls, grpc_tls
        self.client_cert = client_cert
        # The bearer token /metrics asks for, when the gateway is configured with one.
        self.metrics_token: str | None = (env or {}).get("CITYGW_HTTP__METRICS_TOKEN")

    # -- addresses
    @property
    def mqtt_listen(self) -> str:
        return hostport(self.host, self.mqtt_port)

    @property
    def coap_listen(self) -> str:
        return hostport(self.host, self.coap_port)

    @property
    def http_base(self) -> str:
        scheme = "https" if self.http_tls else "http"
        return f"{scheme}://{hostport(self.host, self.http_port)}"

    @property
    def grpc_url(self) -> str:
        scheme = "https" if self.grpc_tls else "http"
        return f"{scheme}://{hostport(self.host, self.grpc_port)}"

    @property
    def verify(self) -> str | bool:
        """What `requests` verifies the HTTP listener's certificate with."""
        return str(self.tls_ca) if self.tls_ca is not None else True

    def env(self) -> dict[str, str]:
        env = _clean_env()
        env.update({
            "CITYGW_DATA_DIR": str(self.data_dir),
            "CITYGW_MQTT__LISTEN": self.mqtt_listen,
            # Used only when the gateway has certificates (config file or env).
            "CITYGW_MQTT__TLS_LISTEN": hostport(self.host, self.mqtt_tls_port),
            "CITYGW_MQTT__MTLS_LISTEN": hostport(self.host, self.mqtt_mtls_port),
            "CITYGW_GRPC__LISTEN": hostport(self.host, self.grpc_port),
            "CITYGW_HTTP__LISTEN": hostport(self.host, self.http_port),
            # Plain CoAP stays off unless a test enables it (CITYGW_COAP__PLAIN_ENABLED=true).
            "CITYGW_COAP__LISTEN": self.coap_listen,
            "CITYGW_COAP__DTLS_LISTEN": hostport(self.host, self.coaps_port),
            "CITYGW_ADMIN__TOKEN": self.token,
            "CITYGW_LOG__FORMAT": "json",
            "RUST_BACKTRACE": "1",
        })
        env.update(self.extra_env)
        return env

    # -- lifecycle
    def start(self, timeout: float = 60.0) -> "Gateway":
        """Starts on fresh ports; on a shared host another process can bind a port between
        free_port() and the gateway's bind, so a start that fails only for that is tried again."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except AssertionError as e:
                if attempt == 2 or "Address already in use" not in str(e):
                    raise
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> "Gateway":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.mqtt_port = free_port(self.host)
        self.mqtt_tls_port = free_port(self.host)
        self.mqtt_mtls_port = free_port(self.host)
        self.grpc_port = free_port(self.host)
        self.http_port = free_port(self.host)
        self.coap_port = free_udp_port(self.host)
        self.coaps_port = free_udp_port(self.host)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n----- start #{self.starts}: mqtt {self.mqtt_listen} grpc {self.grpc_port} "
                      f"http {self.http_port} -----\n".encode())
            log.flush()
            argv = [str(CITYGW_BIN), "run"]
            if self.config is not None:
                argv += ["--config", str(self.config)]
            self.proc = subprocess.Popen(argv, env=self.env(),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.workdir, preexec_fn=self._limits)
        self.wait_ready(timeout)
        return self

    def _limits(self) -> None:
        if self.open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise GatewayExited(f"citygw exited with {self.proc.returncode} before it was ready\n"
                                + self.log_tail())
        try:
            return requests.get(self.http_base + "/readyz", timeout=2,
                                verify=self.verify).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            wait_until(self._ready, timeout, interval=0.05, desc=f"{self.http_base}/readyz -> 200")
        except GatewayExited as e:
            raise AssertionError(str(e)) from None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code (fails the test if it does not exit)."""
        return stop_process(self.proc, "citygw", timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def restart(self, timeout: float = 60.0) -> "Gateway":
        if self.running:
            self.terminate()
        return self.start(timeout)

    def close(self) -> None:
        kill_process(self.proc)

    def log_tail(self, lines: int = 60) -> str:
        return tail_file(self.log_path, lines)

    # -- HTTP
    def http_get(self, path: str, headers: dict[str, str] | None = None) -> requests.Response:
        headers = dict(headers or {})
        if path == "/metrics" and self.metrics_token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.metrics_token}"
        return requests.get(self.http_base + path, timeout=10, verify=self.verify,
                            headers=headers)

    def metrics(self) -> Metrics:
        r = self.http_get("/metrics")
        assert r.status_code == 200, f"/metrics -> {r.status_code}"
        return Metrics(r.text)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().value(name, **labels)

    def wait_metric(self, name: str, at_least: float, timeout: float = 10.0, **labels: str) -> float:
        seen: list[float] = []

        def reached() -> bool:
            seen.append(self.metric(name, **labels))
            return seen[-1] >= at_least

        try:
            wait_until(reached, timeout, interval=0.05, desc=f"{name}{labels} >= {at_least}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last value {seen[-1] if seen else None}") from None
        return seen[-1]

    # -- CLI
    def cli_raw(self, *args: str, token: str | None = None, use_flags: bool = True,
                env: dict[str, str] | None = None, output_json: bool = True,
                timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run `citygw [--server URL --token T] [--output json] ARGS...`."""
        argv: list[str] = [str(CITYGW_BIN)]
        e = _clean_env()
        tok = self.token if token is None else token
        if use_flags:
            argv += ["--server", self.grpc_url, "--token", tok]
        else:
            e["CITYGW_SERVER"] = self.grpc_url
            e["CITYGW_ADMIN_TOKEN"] = tok
        if self.grpc_tls and self.tls_ca is not None:
            argv += ["--ca-file", str(self.tls_ca)]
        if self.grpc_tls and self.client_cert is not None:
            argv += ["--client-cert", str(self.client_cert[0]),
                     "--client-key", str(self.client_cert[1])]
        if output_json:
            argv += ["--output", "json"]
        argv += list(args)
        if env:
            e.update(env)
        return subprocess.run(argv, env=e, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, cwd=self.workdir)

    def cli(self, *args: str, **kw: Any) -> Any:
        """Run a CLI command that must succeed; return its parsed JSON output."""
        proc = self.cli_raw(*args, **kw)
        if proc.returncode != 0:
            raise CliError(list(args), proc)
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError as e:
            raise AssertionError(f"citygw {' '.join(args)} printed no JSON ({e}):\n"
                                 f"{proc.stdout[:2000]}") from None

    def add_device(self, device_id: str | None = None, tenant: str = "hanoi",
                   kind: str = "air_quality", commune: str | None = None,
                   lat: float | None = None, lon: float | None = None, name: str | None = None,
                   secret: str | None = None, dev_eui: str | None = None,
                   codec: str | None = None, psk: str | bool | None = None) -> Device:
        """`citygw device add`; `psk=True` lets the gateway generate a DTLS PSK, a string
        chooses it."""
        device_id = device_id or unique_id("dev")
        args = ["device", "add", device_id, "--tenant", tenant, "--kind", kind]
        if dev_eui is not None:
            args += ["--dev-eui", dev_eui]
        if codec is not None:
            args += ["--codec", codec]
        if commune is not None:
            args += ["--commune", commune]
        if lat is not None:
            args += ["--lat", repr(lat)]
        if lon is not None:
            args += ["--lon", repr(lon)]
        if name is not None:
            args += ["--name", name]
        if secret is not None:
            args += ["--secret", secret]
        if psk is True:
            args.append("--generate-psk")
        elif psk:
            args += ["--psk", psk]
        out = self.cli(*args)
        assert isinstance(out, dict) and "device" in out and "secret" in out, out
        assert out["secret"], f"device add returned an empty secret: {out}"
        if secret is not None:
            assert out["secret"] == secret, out
        if psk:
            assert out.get("psk") and out["device"]["has_psk"] is True, out
        return Device(out["device"], out["secret"], out.get("psk"))

    def add_agency(self, name: str | None = None, tenants: Iterable[str] = ("*",),
                   kinds: Iterable[str] = ("*",), kpi: bool = False,
                   control: bool = False) -> "Agency":
        """`citygw agency add NAME --tenant T.. --kind K.. [--kpi] [--control]`: the agency and
        its token."""
        name = name or unique_id("agency")
        args = ["agency", "add", name]
        for t in tenants:
            args += ["--tenant", t]
        for k in kinds:
            args += ["--kind", k]
        if kpi:
            args.append("--kpi")
        if control:
            args.append("--control")
        out = self.cli(*args)
        assert isinstance(out, dict) and "agency" in out and out.get("token"), out
        return Agency(out["agency"], out["token"])

    def remove_agency(self, name: str) -> None:
        proc = self.cli_raw("agency", "remove", name, output_json=False)
        if proc.returncode != 0:
            raise CliError(["agency", "remove", name], proc)

    def readings(self, device_id: str, *extra: str, limit: int = 100000) -> list[dict]:
        out = self.cli("readings", device_id, "--limit", str(limit), *extra)
        assert isinstance(out, list), out
        return out

    def deadletters(self, device_id: str | None = None, limit: int = 1000) -> list[dict]:
        args = ["deadletter", "list", "--limit", str(limit)]
        if device_id:
            args += ["--device", device_id]
        out = self.cli(*args)
        assert isinstance(out, list), out
        return out

    # -- MQTT conveniences
    def mqtt_client(self, device: Device | None = None, version: int = 5, **kw: Any) -> "MqttClient":
        if device is not None:
            kw.setdefault("client_id", device.id)
            kw.setdefault("username", device.id)
            kw.setdefault("password", device.secret)
        return MqttClient(self.host, self.mqtt_port, version=version, **kw)

    def connected_client(self, device: Device, version: int = 5, **kw: Any) -> "MqttClient":
        c = self.mqtt_client(device, version=version, **kw)
        rc = c.connect()
        assert rc == 0, f"{device} could not connect (MQTT {version}): CONNACK {rc:#04x}"
        return c


class GatewayFactory:
    """Starts gateways in fresh temp dirs; `close()` kills them all and removes the dirs."""

    def __init__(self, name: str):
        self.name = name
        self.gateways: list[Gateway] = []
        self.dirs: list[Path] = []

    def __call__(self, host: str = "127.0.0.1", env: dict[str, str] | None = None,
                 start: bool = True, config_toml: str | None = None,
                 open_files: int | None = None, **tls: Any) -> Gateway:
        """A fresh gateway; `config_toml`, when given, is written to the gateway's dir and passed
        to `citygw run --config` (CITYGW_* overrides from `env` still apply on top)."""
        d = Path(tempfile.mkdtemp(prefix="citygw-e2e-"))
        self.dirs.append(d)
        config = None
        if config_toml is not None:
            config = d / "citygw.toml"
            config.write_text(config_toml)
        gw = Gateway(d, host=host, env=env, name=f"{self.name}#{len(self.gateways) + 1}",
                     config=config, open_files=open_files, **tls)
        self.gateways.append(gw)
        if start:
            gw.start()
        return gw

    def close(self) -> None:
        for gw in self.gateways:
            gw.close()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# MQTT with paho-mqtt 2.x

# paho reports MQTT 3.1.1 CONNACK return codes as MQTT 5 reason codes; map them back to the
# exact 3.1.1 byte (the names are paho's, the mapping is MQTT 3.1.1 table 3.1).
_V311_CONNACK = {
    "Success": 0,
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}


class MqttClient:
    """A paho-mqtt client with blocking helpers: connect() -> CONNACK code, publish() -> PUBACK
    reason code (0 for a 3.1.1 PUBACK), subscribe() -> SUBACK codes, the messages it received
    (`wait_message`), and events for server-side disconnects. `clean=False` keeps the session
    (MQTT 5 clean start off with a session expiry, 3.1.1 clean session off)."""

    def __init__(self, host: str, port: int, client_id: str, username: str | None = None,
                 password: str | None = None, version: int = 5, keepalive: int = 30,
                 max_inflight: int = 20, clean: bool = True):
        self.host, self.port, self.version = host, port, version
        self.client_id = client_id
        kwargs: dict[str, Any] = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                      client_id=client_id,
                                      protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311,
                                      reconnect_on_failure=False)
        if version != 5:
            kwargs["clean_session"] = clean
        self.clean = clean
        self.client = mqtt.Client(**kwargs)
        self.keepalive = keepalive
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.max_queued_messages_set(0)
        # paho's own window (it does not read the server's Receive Maximum)
        self.client.max_inflight_messages_set(max_inflight)
        self._cv = threading.Condition()
        self.connack: int | None = None
        self.connected = False
        self.disconnected = threading.Event()
        self.disconnect_reason: Any = None
        self.acks: dict[int, int] = {}
        self.ack_times: dict[int, float] = {}
        self.ack_order: list[int] = []    # message ids in the order their PUBACKs arrived
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._loop_started = False

    # callbacks run on paho's network thread
    def _on_connect(self, client, userdata, flags, reason, properties):
        if self.version == 5:
            code = reason.value
        else:
            code = _V311_CONNACK.get(reason.getName(), -1)
        with self._cv:
            self.connack = code
            self.connected = code == 0
            self._cv.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        with self._cv:
            self.connected = False
            self.disconnect_reason = reason
            self.disconnected.set()
            self._cv.notify_all()

    def _on_publish(self, client, userdata, mid, reason, properties):
        with self._cv:
            self.acks[mid] = reason.value if reason is not None else 0
            self.ack_order.append(mid)
            self.ack_times[mid] = time.monotonic()
            self._cv.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cv:
            self.subacks[mid] = [getattr(r, "value", r) for r in reason_codes]
            self._cv.notify_all()

    def _on_message(self, client, userdata, message):
        with self._cv:
            self.messages.append(message)
            self._cv.notify_all()

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 15.0) -> list[int]:
        """SUBACK reason codes (MQTT 5; 3.1.1 granted QoS or 0x80)."""
        rc, mid = self.client.subscribe(topic_filter, qos=qos)
        assert rc == 0, f"{self.client_id}: subscribe failed locally (rc {rc})"
        with self._cv:
            ok = self._cv.wait_for(lambda: mid in self.subacks or self.disconnected.is_set(),
                                   timeout)
        assert ok and mid in self.subacks, f"{self.client_id}: no SUBACK within {timeout}s"
        return self.subacks[mid]

    def wait_message(self, pred: Callable[[mqtt.MQTTMessage], bool] = lambda m: True,
                     timeout: float = 15.0) -> mqtt.MQTTMessage:
        """The first received message `pred` accepts, waiting for it."""
        with self._cv:
            ok = self._cv.wait_for(lambda: any(pred(m) for m in self.messages), timeout)
            assert ok, (f"{self.client_id}: no such message within {timeout}s; got "
                        f"{[m.topic for m in self.messages]}")
            return next(m for m in self.messages if pred(m))

    def connect(self, timeout: float = 15.0) -> int | None:
        """Connect and return the CONNACK code (3.1.1 return code or MQTT 5 reason code); None
        when the server closed the connection without a CONNACK."""
        kw: dict[str, Any] = {}
        if self.version == 5 and not self.clean:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            kw = dict(clean_start=False, properties=props)
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive, **kw)
        self.client.loop_start()
        self._loop_started = True
        with self._cv:
            ok = self._cv.wait_for(lambda: self.connack is not None or self.disconnected.is_set(),
                                   timeout)
        assert ok, f"no CONNACK from {self.host}:{self.port} within {timeout}s"
        return self.connack

    def publish_async(self, topic: str, payload: bytes | str, qos: int = 1,
                      content_type: str | None = None) -> mqtt.MQTTMessageInfo:
        props = None
        if content_type is not None:
            assert self.version == 5, "content type needs MQTT 5"
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
        return self.client.publish(topic, payload, qos=qos, properties=props)

    def wait_ack(self, mid: int, timeout: float = 30.0) -> int | None:
        """PUBACK reason code for `mid`, or None if the connection was closed first."""
        with self._cv:
            self._cv.wait_for(lambda: mid in self.acks or self.disconnected.is_set(), timeout)
            if mid in self.acks:
                return self.acks[mid]
            if self.disconnected.is_set():
                return None
        raise AssertionError(f"no PUBACK for mid {mid} within {timeout}s and still connected")

    def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                content_type: str | None = None, timeout: float = 30.0) -> int | None:
        info = self.publish_async(topic, payload, qos, content_type)
        if qos == 0:
            return 0
        return self.wait_ack(info.mid, timeout)

    def publish_many(self, topic: str, payloads: Iterable[bytes | str], qos: int = 1,
                     max_inflight: int = 20, timeout: float = 60.0) -> list[tuple[int | None, float]]:
        """Publish in order with at most `max_inflight` awaiting their PUBACK (a device's
        pipeline); return, per payload, its PUBACK reason code (None: connection closed first)
        and the seconds from handing it to paho to its PUBACK. Message ids must not wrap:
        at most 65535 messages per client."""
        deadline = time.monotonic() + timeout
        sent: list[tuple[int, float]] = []
        pending: set[int] = set()

        def room() -> bool:
            pending.difference_update([m for m in pending if m in self.acks])
            return len(pending) < max_inflight or self.disconnected.is_set()

        for payload in payloads:
            with self._cv:
                ok = self._cv.wait_for(room, max(0.0, deadline - time.monotonic()))
            assert ok, f"{self.client_id}: {len(pending)} PUBACKs outstanding after {timeout}s"
            if self.disconnected.is_set():
                break
            t0 = time.monotonic()
            info = self.publish_async(topic, payload, qos)
            assert info.rc == 0, f"{self.client_id}: publish failed locally (rc {info.rc})"
            sent.append((info.mid, t0))
            pending.add(info.mid)
        with self._cv:
            ok = self._cv.wait_for(lambda: (room() and not pending) or self.disconnected.is_set(),
                                   max(0.0, deadline - time.monotonic()))
            assert ok, f"{self.client_id}: {len(pending)} PUBACKs outstanding after {timeout}s"
            return [(self.acks.get(mid), self.ack_times[mid] - t0 if mid in self.ack_times else float("inf"))
                    for mid, t0 in sent]

    def wait_disconnected(self, timeout: float = 10.0) -> bool:
        return self.disconnected.wait(timeout)

    def close(self) -> None:
        try:
            if self.connected:
                self.client.disconnect()
        except Exception:  # noqa: BLE001
            pass
        if self._loop_started:
            self.client.loop_stop()
            self._loop_started = False

    def __enter__(self) -> "MqttClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connack_of(gw: Gateway, version: int, client_id: str, username: str | None,
               password: str | None) -> int | None:
    c = MqttClient(gw.host, gw.mqtt_port, client_id=client_id, username=username,
                   password=password, version=version)
    try:
        return c.connect()
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# mosquitto_pub


def mosquitto_pub(gw: Gateway, device: Device, topic: str, *, message: str | None = None,
                  file: Path | None = None, lines: Iterable[str] | None = None,
                  version: int = 311, qos: int = 1,
                  properties: Iterable[tuple[str, str, str]] = (), password: str | None = None,
                  timeout: float = 30.0) -> subprocess.CompletedProcess:
    exe = shutil.which("mosquitto_pub")
    assert exe, "mosquitto_pub not installed (Debian package mosquitto-clients; tests/run installs it)"
    argv = [exe, "-h", gw.host, "-p", str(gw.mqtt_port),
            "-V", "mqttv5" if version == 5 else "mqttv311", "-q", str(qos),
            "-i", device.id, "-u", device.id, "-P", device.secret if password is None else password,
            "-t", topic]
    for cmd, ident, value in properties:
        argv += ["-D", cmd, ident, value]
    stdin_text = None
    if message is not None:
        argv += ["-m", message]
    elif file is not None:
        argv += ["-f", str(file)]
    elif lines is not None:
        # -l: one message per stdin line, all over one connection, in order
        argv += ["-l"]
        stdin_text = "".join(line + "\n" for line in lines)
    if stdin_text is None:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=stdin_text)


def publish_json(gw: Gateway, device: Device, *payloads: Any, version: int = 311,
                 timeout: float = 30.0) -> None:
    """Publish each payload (JSON-encoded) as one QoS 1 message with mosquitto_pub, all over one
    connection and in order; returns once every one is PUBACKed (stored)."""
    lines = [p if isinstance(p, str) else json.dumps(p) for p in payloads]
    assert all("\n" not in line for line in lines)
    p = mosquitto_pub(gw, device, device.topic, lines=lines, version=version, timeout=timeout)
    assert p.returncode == 0, f"mosquitto_pub for {device} exited {p.returncode}: {p.stderr}"


def publish_json_parallel(gw: Gateway, per_device: dict[Device, list[Any]], version: int = 311,
                          timeout: float = 120.0) -> None:
    """`publish_json` for several devices at once: one mosquitto_pub process (one connection,
    in order, QoS 1) per device, all running concurrently; returns once every one exited 0, so
    every message is PUBACKed (stored)."""
    errors: list[str] = []

    def run(device: Device, payloads: list[Any]) -> None:
        try:
            publish_json(gw, device, *payloads, version=version, timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(f"{device}: {e}")

    threads = [threading.Thread(target=run, args=(d, p), daemon=True) for d, p in per_device.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    assert not any(t.is_alive() for t in threads), "a mosquitto_pub publisher did not finish"
    assert not errors, errors


# --------------------------------------------------------------------------------------------
# SenML (RFC 8428)

# Topic suffixes naming the SenML formats. The media-type spellings "senml+json"/"senml+cbor"
# cannot be used by a conforming client: '+' is a wildcard character and MQTT (3.1.1 and 5,
# section 4.7.1) forbids it anywhere in a PUBLISH topic name; paho-mqtt raises "Publish topic
# cannot contain wildcards" and mosquitto_pub says "Invalid publish topic". Real devices use the
# '-' spellings, which the gateway accepts.
SENML_JSON = "/senml-json"
SENML_CBOR = "/senml-cbor"

# CBOR labels, RFC 8428 section 6
SENML_CBOR_LABELS = {"bn": -2, "bt": -3, "bu": -4, "bv": -5, "bver": -1, "n": 0, "u": 1,
                     "v": 2, "vs": 3, "vb": 4, "s": 5, "t": 6, "ut": 7, "vd": 8}


def senml_cbor(records: list[dict]) -> bytes:
    import cbor2
    return cbor2.dumps([{SENML_CBOR_LABELS[k]: v for k, v in r.items()} for r in records])


def by_quantity(readings: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in readings:
        out.setdefault(r["quantity"], []).append(r)
    return out


def b64_head(r: dict) -> bytes:
    return base64.b64decode(r.get("payload_head_base64") or "")

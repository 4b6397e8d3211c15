"""Shared fixtures: real `citygw` gateways on loopback, each in its own temp data dir.

- `gw`: one gateway per test module (tests in a module provision their own devices, so they do
  not see each other's data; metric checks use before/after deltas).
- `gateway_factory`: start as many fresh gateways as a test needs (own data dir, own ports);
  used where a test kills, restarts or reconfigures the gateway.

- `brokers`: real Mosquitto brokers for the LoRaWAN bridge tests (see support/lorawan.py).

- `stores`: real time-series servers for the sink tests (`stores.victoria_metrics()`,
  `stores.influxdb1()`, see support/tsdb.py).

Gateways and stores are killed at teardown even when a test fails, and their temp dirs removed;
on failure the tail of each gateway's (and store's) log is attached to the test report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Gateway, GatewayFactory  # noqa: E402
from support.lorawan import Brokers  # noqa: E402
from support.nats import NatsCluster  # noqa: E402
from support.tsdb import Stores  # noqa: E402


@pytest.fixture
def gateway_factory(request):
    factory = GatewayFactory(request.node.name)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def stores(request):
    """Factory of real time-series stores (VictoriaMetrics, InfluxDB 1.x) on free loopback
    ports; every one is killed at teardown."""
    s = Stores(request.node.name)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def brokers(request):
    """Factory of real Mosquitto brokers (`brokers.mosquitto()`, persistence on) standing in for
    LoRaWAN network servers' brokers, and their publishers; all killed at teardown."""
    b = Brokers(request.node.name)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def module_gateways(request):
    factory = GatewayFactory(request.module.__name__)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways()


def _gateways_of(item) -> list[Gateway]:
    found: list[Gateway] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Gateway):
            found.append(value)
        elif isinstance(value, GatewayFactory):
            found.extend(value.gateways)
    unique: list[Gateway] = []
    for g in found:
        if all(g is not u for u in unique):
            unique.append(g)
    return unique


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for g in _gateways_of(item):
            state = "running" if g.running else f"exited {g.proc.returncode if g.proc else '-'}"
            rep.sections.append((f"citygw log tail: {g.name} ({state}, {g.log_path})",
                                 g.log_tail(80)))
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, (Stores, Brokers, NatsCluster)):
                for srv in value.servers:
                    state = "running" if srv.running else "stopped"
                    rep.sections.append((f"{srv.name} log tail ({state}, {srv.log_path})",
                                         srv.log_tail(30)))


@pytest.fixture(scope="session")
def citygw_api(tmp_path_factory):
    """Messages and gRPC stubs for proto/citygw/v1/*.proto, generated with grpcio-tools (the
    schema as shipped): `citygw_api.telemetry_pb2`, `.telemetry_pb2_grpc`, `.reading_pb2`, ..."""
    from support.telemetry import generate_api

    return generate_api(tmp_path_factory.mktemp("pb"))


@pytest.fixture(scope="session")
def citygw_pb(citygw_api):
    """The Reading/ReadingBatch classes (reading.proto), so a device-side encoder is built from
    the same file as the gateway."""
    return citygw_api.reading_pb2


@pytest.fixture
def control(citygw_api):
    """`control(gw, token)` -> a ControlClient (grpcio, generated stubs) calling
    `citygw.v1.Control` with that bearer token (the admin token when None is not given:
    `control(gw)`); channels are closed at teardown."""
    from support.control import ControlClient

    clients = []
    unset = object()

    def make(gw: Gateway, token=unset):
        c = ControlClient(gw, citygw_api, gw.token if token is unset else token)
        clients.append(c)
        return c

    try:
        yield make
    finally:
        for c in clients:
            c.close()


@pytest.fixture
def telemetry(citygw_api):
    """`telemetry(gw, token, options=())` -> a TelemetryClient (grpcio, generated stubs) calling
    `citygw.v1.Telemetry` with that bearer token; channels are closed at teardown."""
    from support.telemetry import TelemetryClient

    clients = []

    def make(gw: Gateway, token: str | None, options=()):
        c = TelemetryClient(gw, citygw_api, token, options)
        clients.append(c)
        return c

    try:
        yield make
    finally:
        for c in clients:
            c.close()

"""Shared fixtures: real `citygw` gateways on loopback, each in its own temp data dir.

- `gw`: one gateway per test module (tests in a module provision their own devices, so they do
  not see each other's data; metric checks use before/after deltas).
- `gateway_factory`: start as many fresh gateways as a test needs (own data dir, own ports);
  used where a test kills, restarts or reconfigures the gateway.

Gateways are killed at teardown even when a test fails, and their temp dirs removed; on failure
the tail of each gateway's log (stderr, JSON lines) is attached to the test report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Gateway, GatewayFactory  # noqa: E402


@pytest.fixture
def gateway_factory(request):
    factory = GatewayFactory(request.node.name)
    try:
        yield factory
    finally:
        factory.close()


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


@pytest.fixture(scope="session")
def citygw_pb(tmp_path_factory):
    """Python classes for proto/citygw/v1/*.proto, generated with grpcio-tools (the schema as
    shipped, so a device-side encoder is built from the same file as the gateway)."""
    import importlib

    from grpc_tools import protoc

    from support import ROOT

    out = tmp_path_factory.mktemp("pb")
    proto_dir = ROOT / "proto"
    files = sorted(str(p.relative_to(proto_dir)) for p in (proto_dir / "citygw" / "v1").glob("*.proto"))
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", *files])
    assert rc == 0, f"protoc failed on {files}"
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("citygw.v1.reading_pb2")
    finally:
        sys.path.remove(str(out))

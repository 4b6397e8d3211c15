"""What the gateway leaves behind and what its APIs give away (issue 17): the data directory's
permissions, `/metrics` behind a token, and guessing admin or agency tokens over gRPC and HTTP.
Regression tests of defects found before the fix.
"""

from __future__ import annotations

import os
import stat

import grpc
import requests

from support import wait_until

TOKEN = "metrics-token-for-the-test"


def modes(root) -> dict[str, int]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def test_the_data_dir_is_private_to_the_gateway(gateway_factory):
    gw = gateway_factory(start=False)
    gw.data_dir.chmod(0o755)  # as an operator's mkdir leaves it
    gw.start()
    gw.add_device()  # something in the store
    assert stat.S_IMODE(gw.data_dir.stat().st_mode) == 0o700
    leaky = {p: oct(m) for p, m in modes(gw.data_dir).items() if m & 0o077}
    assert not leaky, f"readable by other users: {leaky}"
    found = set(modes(gw.data_dir))
    assert "psk.key" in found and any(p.startswith("store/") for p in found), found


def test_metrics_can_require_a_token(gateway_factory):
    gw = gateway_factory(env={"CITYGW_HTTP__METRICS_TOKEN": TOKEN})
    r = requests.get(gw.http_base + "/metrics", timeout=10)
    assert r.status_code == 401 and r.headers.get("WWW-Authenticate") == "Bearer"
    assert "citygw_kpi" not in r.text
    r = requests.get(gw.http_base + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert r.status_code == 401
    r = requests.get(gw.http_base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"},
                     timeout=10)
    assert r.status_code == 200 and "citygw_kpi_city_devices" in r.text
    # health endpoints stay open for orchestrators
    assert requests.get(gw.http_base + "/readyz", timeout=10).status_code == 200
    assert "<redacted>" in gw.cli_raw("config", "print", output_json=False,
                                      env={"CITYGW_HTTP__METRICS_TOKEN": TOKEN}).stdout


def test_guessing_api_tokens_backs_off(gateway_factory, citygw_api):
    gw = gateway_factory(env={"CITYGW_AUTH__SOURCE_MAX_FAILURES": "5",
                              "CITYGW_AUTH__BACKOFF_INITIAL_MS": "2000"})
    agency = gw.add_agency(kpi=True)
    stub = citygw_api.telemetry_pb2_grpc.TelemetryStub(
        grpc.insecure_channel(f"{gw.host}:{gw.grpc_port}"))

    def call(token: str) -> grpc.StatusCode:
        try:
            stub.ListDevices(citygw_api.telemetry_pb2.AgencyListDevicesRequest(),
                             metadata=[("authorization", f"Bearer {token}")], timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    codes = [call("guess-%d" % i) for i in range(7)]
    assert codes[:5] == [grpc.StatusCode.UNAUTHENTICATED] * 5, codes
    assert set(codes[5:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    # the address backs off for every token, the right one too...
    assert call(agency.token) == grpc.StatusCode.RESOURCE_EXHAUSTED
    r = requests.get(gw.http_base + "/api/v1/kpi", timeout=10,
                     headers={"Authorization": f"Bearer {agency.token}"})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert gw.metric("citygw_api_auth_failures_total", api="telemetry", reason="throttled") >= 2
    # ...until the wait is over.
    wait_until(lambda: call(agency.token) == grpc.StatusCode.OK, timeout=10,
               desc="the agency token to work again after the back-off")

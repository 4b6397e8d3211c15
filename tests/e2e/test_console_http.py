"""The operator console over plain HTTP (requests): nothing answers without a session, cookie
flags, CSRF and origin checks on writes, the read-only operator role, sign-in throttling, the
embedded assets and their security headers, and the data behind the pages against the admin
API and /metrics. The browser tests (test_console_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import csv
import io
import json
import threading

import pytest
import requests

from support import Gateway, wait_until

API_PATHS = [
    "/console/api/overview", "/console/api/devices", "/console/api/devices/x",
    "/console/api/devices/x/readings", "/console/api/deadletters", "/console/api/kpi",
    "/console/api/kpi.csv", "/console/api/kpi/map", "/console/api/live/overview",
    "/console/api/live/devices/x", "/console/api/session", "/console/api/commands",
    "/console/api/commands/x", "/console/api/live/commands", "/console/api/alerts",
    "/console/api/alerts/x", "/console/api/rules", "/console/api/live/alerts",
]

# One rule for the alerts tests, scoped to one device so nothing else here raises it.
CONFIG = """
[[rules]]
name = "console-flood"
device = "con-flood"
quantity = "water_level"
above = 2.5
clear = 2.3
severity = "major"
"""


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways(config_toml=CONFIG)


def sign_in(gw: Gateway, token: str, **kw) -> requests.Response:
    return requests.post(gw.http_base + "/console/api/session", json={"token": token},
                         timeout=10, **kw)


def session_for(gw: Gateway, token: str) -> tuple[requests.Session, str]:
    """A requests session holding the console cookie, and the CSRF token."""
    s = requests.Session()
    r = s.post(gw.http_base + "/console/api/session", json={"token": token}, timeout=10)
    assert r.status_code == 200, r.text
    return s, r.json()["csrf"]


def add_operator(gw: Gateway, name: str) -> str:
    out = gw.cli("operator", "add", name)
    assert out["operator"]["name"] == name and out["token"], out
    return out["token"]


def test_nothing_answers_without_a_session(gw: Gateway):
    for path in API_PATHS:
        r = requests.get(gw.http_base + path, timeout=10)
        assert r.status_code == 401, (path, r.status_code, r.text[:200])
        assert r.json() == {"error": "sign in first"}, path
    # a forged or stale cookie is no better
    for cookie in ("forged", "", "x" * 4000):
        r = requests.get(gw.http_base + "/console/api/overview",
                         headers={"Cookie": f"citygw_session={cookie}"}, timeout=10)
        assert r.status_code == 401, cookie[:10]
    r = requests.post(gw.http_base + "/console/api/devices/x/enabled", json={"enabled": False},
                      timeout=10)
    assert r.status_code == 401
    r = requests.post(gw.http_base + "/console/api/commands",
                      json={"device_id": "x", "name": "reboot"}, timeout=10)
    assert r.status_code == 401
    for what in ("ack", "clear"):
        assert requests.post(f"{gw.http_base}/console/api/alerts/x/{what}",
                             timeout=10).status_code == 401
    assert gw.metric("citygw_console_requests_refused_total", reason="no_session") >= len(API_PATHS)
    # The page shell holds no data and is public; its API calls are not.
    page = requests.get(gw.http_base + "/console/", timeout=10)
    assert page.status_code == 200 and "citygw" in page.text
    assert requests.get(gw.http_base + "/console", timeout=10, allow_redirects=False) \
        .headers["location"] == "/console/"


def test_sign_in_cookie_flags_and_sign_out(gw: Gateway):
    r = sign_in(gw, gw.token)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["role"] == "admin" and body["time_zone"] == "Asia/Ho_Chi_Minh" and body["csrf"]
    cookie = r.headers["set-cookie"]
    parts = [p.strip() for p in cookie.split(";")]
    assert parts[0].startswith("citygw_session=") and len(parts[0]) > 40, cookie
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/console"):
        assert flag in parts, (flag, cookie)
    assert "Secure" not in parts, "plain HTTP listener: Secure would drop the cookie"
    assert gw.token not in cookie and gw.token not in r.text
    assert r.headers["cache-control"] == "no-store"

    s, csrf = session_for(gw, gw.token)
    assert s.get(gw.http_base + "/console/api/session", timeout=10).json()["role"] == "admin"
    # sign-out needs the CSRF token too (a cross-site page must not log people out)
    assert s.delete(gw.http_base + "/console/api/session", timeout=10).status_code == 403
    r = s.delete(gw.http_base + "/console/api/session", headers={"X-CSRF-Token": csrf}, timeout=10)
    assert r.status_code == 204
    assert "Max-Age=0" in r.headers["set-cookie"]
    old = r.request.headers["Cookie"]
    r = requests.get(gw.http_base + "/console/api/overview", headers={"Cookie": old}, timeout=10)
    assert r.status_code == 401, "the signed-out session must be gone server-side"


def test_wrong_tokens_are_refused_counted_and_throttled(gateway_factory):
    gw: Gateway = gateway_factory()
    before = gw.metric("citygw_api_auth_failures_total", api="console") \
        if gw.metrics().has("citygw_api_auth_failures_total", api="console") else 0
    # an agency token is not a console token, nor is the admin token with junk around it
    agency = gw.add_agency()
    for token in (agency.token, "", gw.token + "x", gw.token[:-1], "' OR 1=1 --", "ü" * 500):
        r = sign_in(gw, token)
        assert r.status_code == 401, (token[:20], r.status_code)
        assert "set-cookie" not in r.headers
    # not JSON at all
    r = requests.post(gw.http_base + "/console/api/session", data="token=" + gw.token,
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert r.status_code == 400 and "set-cookie" not in r.headers
    # an oversized body is refused before it is read whole
    r = requests.post(gw.http_base + "/console/api/session",
                      data=json.dumps({"token": "a" * 100_000}),
                      headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code in (400, 413), r.status_code
    after = gw.metric("citygw_api_auth_failures_total", api="console")
    assert after - before == 6, (before, after)
    # a guessing flood from one address: throttled with Retry-After, even for the right token
    for _ in range(10):
        sign_in(gw, "guess")
    r = sign_in(gw, gw.token)
    assert r.status_code == 429, r.status_code
    assert int(r.headers["retry-after"]) > 0
    # ...but only that address: the operator on another loopback address still signs in
    other = requests.Session()
    other.mount("http://", SourceAddressAdapter("127.0.0.2"))
    r = other.post(gw.http_base + "/console/api/session", json={"token": gw.token}, timeout=10)
    assert r.status_code == 200, r.text
    # the log names no token and stays small
    log = gw.log_path.read_text()
    assert gw.token not in log and "guess" not in log and "ü" * 50 not in log
    assert log.count("console sign-in refused") <= 3


class SourceAddressAdapter(requests.adapters.HTTPAdapter):
    """Binds outgoing connections to a loopback source address."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def test_writes_need_csrf_same_origin_and_the_admin_role(gw: Gateway):
    device = gw.add_device()
    url = f"{gw.http_base}/console/api/devices/{device.id}/enabled"
    s, csrf = session_for(gw, gw.token)
    host = gw.http_base.removeprefix("http://")

    refused = [
        ({}, 403),                                                  # no CSRF token
        ({"X-CSRF-Token": "wrong"}, 403),                           # wrong one
        ({"X-CSRF-Token": csrf, "Origin": "http://evil.example"}, 403),
        ({"X-CSRF-Token": csrf, "Origin": "null"}, 403),
        ({"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"}, 403),
    ]
    for headers, status in refused:
        r = s.post(url, json={"enabled": False}, headers=headers, timeout=10)
        assert r.status_code == status, (headers, r.status_code, r.text)
    assert gw.cli("device", "show", device.id)["enabled"] is True, "nothing may have changed"
    assert gw.metric("citygw_console_requests_refused_total", reason="csrf") >= 2
    assert gw.metric("citygw_console_requests_refused_total", reason="cross_origin") >= 3

    r = s.post(url, json={"enabled": False}, timeout=10,
               headers={"X-CSRF-Token": csrf, "Origin": f"http://{host}"})
    assert r.status_code == 200, r.text
    assert r.json()["enabled"] is False and r.json()["state"] == "disabled"
    assert gw.cli("device", "show", device.id)["enabled"] is False
    with gw.mqtt_client(device) as c:
        assert c.connect() == 0x87, "a device disabled in the console is refused"
    r = s.post(url, json={"enabled": True}, headers={"X-CSRF-Token": csrf}, timeout=10)
    assert r.status_code == 200 and gw.cli("device", "show", device.id)["enabled"] is True

    # a cross-site sign-in attempt (login CSRF) is refused too
    r = sign_in(gw, gw.token, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    # malformed bodies
    for body in ("", "{", '{"enabled": "no"}', "[]"):
        r = s.post(url, data=body, headers={"X-CSRF-Token": csrf, "Content-Type": "application/json"},
                   timeout=10)
        assert r.status_code == 400, (body, r.status_code)
    r = s.post(f"{gw.http_base}/console/api/devices/nope/enabled", json={"enabled": False},
               headers={"X-CSRF-Token": csrf}, timeout=10)
    assert r.status_code == 404


def test_read_only_operator_sees_everything_and_changes_nothing(gw: Gateway):
    device = gw.add_device()
    token = add_operator(gw, "night-shift")
    listed = gw.cli("operator", "list")
    assert [o["name"] for o in listed if o["name"] == "night-shift"] == ["night-shift"]
    s, csrf = session_for(gw, token)
    me = s.get(gw.http_base + "/console/api/session", timeout=10).json()
    assert (me["role"], me["name"]) == ("operator", "night-shift")
    for path in ("/console/api/overview", "/console/api/devices", f"/console/api/devices/{device.id}",
                 "/console/api/deadletters", "/console/api/kpi", "/console/api/kpi.csv"):
        assert s.get(gw.http_base + path, timeout=10).status_code == 200, path
    r = s.post(f"{gw.http_base}/console/api/devices/{device.id}/enabled", json={"enabled": False},
               headers={"X-CSRF-Token": csrf}, timeout=10)
    assert r.status_code == 403 and "read-only" in r.json()["error"], r.text
    assert gw.cli("device", "show", device.id)["enabled"] is True
    # the operator token is no admin token on the gRPC admin API either
    proc = gw.cli_raw("device", "disable", device.id, token=token)
    assert proc.returncode != 0 and gw.cli("device", "show", device.id)["enabled"] is True

    # revoking the operator ends the session at once, live streams included
    got: list[str] = []
    stream = s.get(gw.http_base + "/console/api/live/overview", stream=True, timeout=30)
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    reader = threading.Thread(target=lambda: [got.append(line) for line in
                                              stream.iter_lines(decode_unicode=True)], daemon=True)
    reader.start()
    wait_until(lambda: any(l == "event: overview" for l in got), 10, desc="first overview event")
    gw.cli_raw("operator", "remove", "night-shift", output_json=False).check_returncode()
    assert s.get(gw.http_base + "/console/api/overview", timeout=10).status_code == 401
    wait_until(lambda: "event: signed_out" in got, 10, desc="stream told signed_out")
    reader.join(20)
    assert not reader.is_alive(), "the stream must end with the session"


def test_commands_the_admin_sends_and_everyone_reads(gw: Gateway):
    """Commands through the console are the Control API's commands: the admin sends one (CSRF
    like every write), the CLI sees it; bad requests are refused; an operator reads only."""
    device = gw.add_device(kind="street_light")
    off = gw.add_device(kind="street_light")
    gw.cli("device", "disable", off.id)
    s, csrf = session_for(gw, gw.token)
    url = gw.http_base + "/console/api/commands"
    body = {"device_id": device.id, "name": "reboot", "params": {"delay_s": 5}, "ttl_s": 600}
    assert s.post(url, json=body, timeout=10).status_code == 403, "no CSRF token"
    r = s.post(url, json=body, headers={"X-CSRF-Token": csrf}, timeout=10)
    assert r.status_code == 200, r.text
    sent = r.json()
    assert (sent["state"], sent["created_by"], sent["transport"]) == ("QUEUED", "admin", "mqtt")
    assert sent["payload"] == {"params": {"delay_s": 5}}
    assert sent["expires_time_ms"] - sent["created_time_ms"] == 600_000
    shown = gw.cli("command", "show", sent["id"])
    assert (shown["name"], shown["state"]) == ("reboot", "QUEUED"), shown
    for bad, status in (({**body, "params": [1]}, 400), ({**body, "extra": 1}, 400),
                        ({"name": "reboot"}, 400), ({**body, "name": "no spaces!"}, 400),
                        ({**body, "device_id": "nope"}, 404), ({**body, "device_id": off.id}, 409)):
        r = s.post(url, json=bad, headers={"X-CSRF-Token": csrf}, timeout=10)
        assert r.status_code == status, (bad, r.status_code, r.text)
    # newest first, by device and by state, as the CLI lists them
    assert [c["id"] for c in s.get(url, params={"device": device.id}, timeout=10)
            .json()["commands"]] == [sent["id"]]
    assert s.get(url, params={"device": device.id, "state": "succeeded"}, timeout=10) \
        .json()["commands"] == []
    assert s.get(url, params={"state": "bogus"}, timeout=10).status_code == 400
    one = s.get(f"{url}/{sent['id']}", timeout=10).json()
    assert [(e["state"], e["by"]) for e in one["history"]] == [("QUEUED", "admin")]
    assert s.get(f"{url}/nope", timeout=10).status_code == 404
    # an operator reads them and sends nothing
    op, op_csrf = session_for(gw, add_operator(gw, "cmd-reader"))
    assert [c["id"] for c in op.get(url, params={"device": device.id}, timeout=10)
            .json()["commands"]] == [sent["id"]]
    r = op.post(url, json=body, headers={"X-CSRF-Token": op_csrf}, timeout=10)
    assert r.status_code == 403 and "read-only" in r.json()["error"], r.text
    assert [c["id"] for c in gw.cli("command", "list", "--device", device.id)] == [sent["id"]]


def test_alerts_everyone_reads_and_only_the_admin_acknowledges_and_clears(gw: Gateway):
    """A reading over the rule's threshold raises an alert; the console lists it (filters by
    state, severity, rule) with the commune's name and the Overview counts it as the metric
    does; a read-only operator reads it but cannot acknowledge or clear it; the admin can (CSRF
    like every write) and the history says who and when, as the CLI shows it."""
    d = gw.add_device("con-flood", kind="water_level", commune="00004")
    with gw.connected_client(d) as dev:
        assert dev.publish(d.topic, json.dumps({"water_level": 2.8})) == 0
    s, csrf = session_for(gw, gw.token)
    url = gw.http_base + "/console/api/alerts"
    listed = wait_until(lambda: s.get(url, params={"device": d.id}, timeout=10).json()["alerts"],
                        10, desc="the alert listed")
    assert len(listed) == 1, listed
    a = listed[0]
    assert (a["rule"], a["severity"], a["state"], a["value"]) == \
        ("console-flood", "major", "ACTIVE_UNACK", 2.8), a
    assert (a["commune_code"], a["commune_name"]) == ("00004", "Phường Ba Đình"), a
    assert a["message"] == "water_level 2.8 > 2.5", a
    ids = lambda **q: [x["id"] for x in s.get(url, params=q, timeout=10).json()["alerts"]]
    assert ids(state="active") == [a["id"]]
    assert ids(state="ACTIVE_UNACK", severity="major", rule="console-flood") == [a["id"]]
    assert ids(state="cleared_ack") == [] and ids(severity="critical") == [] \
        and ids(rule="other") == []
    for bad in ({"state": "bogus"}, {"severity": "bogus"}):
        assert s.get(url, params=bad, timeout=10).status_code == 400, bad
    assert s.get(f"{url}/nope", timeout=10).status_code == 404
    # the gauge is set once the alert is durable, a moment before anyone hears of it
    wait_until(lambda: s.get(gw.http_base + "/console/api/overview", timeout=10)
               .json()["alerts_active"]["major"] == 1, 5, desc="the overview counts the alert")
    assert gw.metric("citygw_alerts_active", severity="major") == 1
    rules = s.get(gw.http_base + "/console/api/rules", timeout=10).json()["rules"]
    assert [(r["name"], r["active"]) for r in rules] == [("console-flood", 1)], rules

    # the read-only operator reads and changes nothing
    op, op_csrf = session_for(gw, add_operator(gw, "alert-reader"))
    assert [x["id"] for x in op.get(url, params={"device": d.id}, timeout=10).json()["alerts"]] \
        == [a["id"]]
    for what in ("ack", "clear"):
        r = op.post(f"{url}/{a['id']}/{what}", headers={"X-CSRF-Token": op_csrf}, timeout=10)
        assert r.status_code == 403 and "read-only" in r.json()["error"], r.text
    # the admin needs the CSRF token and a same-origin request
    assert s.post(f"{url}/{a['id']}/ack", timeout=10).status_code == 403
    assert s.post(f"{url}/{a['id']}/ack", timeout=10,
                  headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"}).status_code == 403
    assert gw.cli("alert", "show", a["id"])["state"] == "ACTIVE_UNACK", "refused writes changed it"

    acked = s.post(f"{url}/{a['id']}/ack", headers={"X-CSRF-Token": csrf}, timeout=10)
    assert acked.status_code == 200, acked.text
    assert (acked.json()["state"], acked.json()["acked_by"]) == ("ACTIVE_ACK", "admin")
    cleared = s.post(f"{url}/{a['id']}/clear", headers={"X-CSRF-Token": csrf}, timeout=10).json()
    assert (cleared["state"], cleared["cleared_by"]) == ("CLEARED_ACK", "admin"), cleared
    assert [(e["state"], e["by"]) for e in cleared["history"]] == [
        ("ACTIVE_UNACK", "rule:console-flood"), ("ACTIVE_ACK", "admin"), ("CLEARED_ACK", "admin")]
    shown = gw.cli("alert", "show", a["id"])
    assert (shown["state"], shown["acked_by"], shown["cleared_by"]) == \
        ("CLEARED_ACK", "admin", "admin"), shown
    assert s.get(gw.http_base + "/console/api/overview", timeout=10) \
        .json()["alerts_active"]["major"] == 0
    assert s.post(f"{url}/nope/ack", headers={"X-CSRF-Token": csrf}, timeout=10).status_code == 404


def test_the_admin_adds_and_removes_rules_in_the_console(gw: Gateway):
    """Rules at run time from the console: TOML as in the config file, the same checks (a typo is
    named), admin only with CSRF; the CLI lists what the console added; a config rule cannot be
    removed here."""
    s, csrf = session_for(gw, gw.token)
    url = gw.http_base + "/console/api/rules"
    ok = {"X-CSRF-Token": csrf}
    body = {"definition": 'name = "console-high"\nquantity = "water_level"\nabove = 9\n'
                          'severity = "minor"\ndevice = "con-high"'}
    assert s.post(url, json=body, timeout=10).status_code == 403, "no CSRF token"
    op, op_csrf = session_for(gw, add_operator(gw, "rule-reader"))
    r = op.post(url, json=body, headers={"X-CSRF-Token": op_csrf}, timeout=10)
    assert r.status_code == 403 and "read-only" in r.json()["error"], r.text
    r = s.post(url, json=body, headers=ok, timeout=10)
    assert r.status_code == 200, r.text
    assert (r.json()["name"], r.json()["origin"], r.json()["added_by"]) == \
        ("console-high", "api", "admin"), r.json()
    r = s.post(url, json=body, headers=ok, timeout=10)
    assert r.status_code == 409 and "already exists" in r.json()["error"], r.text
    typo = {"definition": 'name = "y"\nquantity = "water_level"\nabove = 1\nabvoe = 2'}
    r = s.post(url, json=typo, headers=ok, timeout=10)
    assert r.status_code == 400 and "abvoe" in r.json()["error"], r.text
    r = s.post(url, json={"definition": 'name = "y"\nquantity = "q"\nbelow = 1\nclear = 0'},
               headers=ok, timeout=10)
    assert r.status_code == 400 and 'rule "y": clear' in r.json()["error"], r.text
    listed = {x["name"]: x["origin"] for x in gw.cli("rule", "list")}
    assert listed == {"console-flood": "config", "console-high": "api"}, listed
    assert [x["name"] for x in op.get(url, timeout=10).json()["rules"]] == \
        ["console-flood", "console-high"]
    r = s.post(f"{url}/console-flood/remove", headers=ok, timeout=10)
    assert r.status_code == 409 and "config file" in r.json()["error"], r.text
    r = op.post(f"{url}/console-high/remove", headers={"X-CSRF-Token": op_csrf}, timeout=10)
    assert r.status_code == 403
    r = s.post(f"{url}/console-high/remove", headers=ok, timeout=10)
    assert r.json() == {"removed": "console-high", "alerts_cleared": 0}, r.text
    assert s.post(f"{url}/console-high/remove", headers=ok, timeout=10).status_code == 404
    assert [x["name"] for x in gw.cli("rule", "list")] == ["console-flood"]


def test_assets_are_embedded_with_security_headers_and_no_outside_reference(gw: Gateway):
    page = requests.get(gw.http_base + "/console/", timeout=10)
    csp = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'",
                      "frame-ancestors 'none'"):
        assert directive in csp, csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assets = ["/console/console.css", "/console/js/app.js", "/console/js/ui.js",
              "/console/js/i18n.js", "/console/js/pages/overview.js", "/console/js/pages/kpi.js",
              "/console/js/pages/devices.js", "/console/js/pages/device.js",
              "/console/js/pages/deadletters.js", "/console/js/pages/commands.js",
              "/console/js/pages/alerts.js", "/console/vendor/uplot/uPlot.iife.min.js",
              "/console/vendor/uplot/uPlot.min.css", "/console/vendor/uplot/LICENSE",
              "/console/favicon.svg"]
    for path in assets:
        r = requests.get(gw.http_base + path, timeout=10)
        assert r.status_code == 200, path
        text = r.text
        # no CDN, no font service, no tile server: nothing outside citygw is referenced
        for outside in ("https://", "http://", "//cdn", "googleapis", "unpkg", "jsdelivr"):
            hits = [line for line in text.splitlines() if outside in line
                    and "www.w3.org/2000/svg" not in line and "github.com/leeoniya" not in line
                    and "opensource.org" not in line]
            assert not hits, (path, outside, hits[:2])
        etag = r.headers["etag"]
        again = requests.get(gw.http_base + path, headers={"If-None-Match": etag}, timeout=10)
        assert again.status_code == 304, path
    assert requests.get(gw.http_base + "/console/../Cargo.toml", timeout=10).status_code == 404
    assert requests.get(gw.http_base + "/console/nope.js", timeout=10).status_code == 404


def test_overview_devices_and_kpi_agree_with_the_admin_api_and_metrics(gateway_factory):
    gw: Gateway = gateway_factory()
    active = [gw.add_device(kind="air_quality", commune="00004") for _ in range(3)]
    silent = gw.add_device(kind="noise", commune="00008")
    disabled = gw.add_device(kind="water_level")
    gw.cli("device", "disable", disabled.id)
    for d in active:
        with gw.connected_client(d) as c:
            assert c.publish(d.topic, json.dumps({"pm2_5": 12.5})) == 0
    with gw.connected_client(active[0]) as c:
        assert c.publish(active[0].topic, b"{broken") == 0x99  # MQTT 5: payload format invalid
    s, _ = session_for(gw, gw.token)

    def overview():
        return s.get(gw.http_base + "/console/api/overview", timeout=10).json()

    o = overview()
    devices = gw.cli("device", "list")
    assert o["devices"]["registered"] == sum(d["enabled"] for d in devices) == 4
    assert o["devices"]["disabled"] == sum(not d["enabled"] for d in devices) == 1
    assert (o["devices"]["active"], o["devices"]["silent"]) == (3, 1)
    by_protocol = {g["name"]: g for g in o["devices"]["by_protocol"]}
    assert by_protocol["mqtt"]["active"] == sum(d["protocol"] == "mqtt" for d in devices) == 3
    assert by_protocol["none"]["registered"] + by_protocol["none"]["disabled"] == 2
    by_kind = {g["name"]: g for g in o["devices"]["by_kind"]}
    assert (by_kind["air_quality"]["active"], by_kind["noise"]["silent"],
            by_kind["water_level"]["disabled"]) == (3, 1, 1)
    kpi = gw.cli("kpi", "report")
    assert kpi["city"]["active"] == o["devices"]["active"]
    m = gw.metrics()
    assert o["ingest"]["readings_total"] == m.value("citygw_readings_stored_total") == 3
    refused = {(r["protocol"], r["reason"]): r["count"] for r in o["refused"]}
    assert refused == {("mqtt", "malformed_json"): 1}
    assert o["store"]["commits_total"] == m.value("citygw_store_commit_seconds_count")
    assert o["cluster"] == {"backend": "embedded"}, "no cluster section on a single node"
    # the sampler turns counters into a rate history for the chart
    wait_until(lambda: len(overview()["ingest"]["history"]["time_ms"]) >= 2, 15,
               desc="two rate samples")

    # device search and filters
    def find(**q):
        return [d["id"] for d in s.get(gw.http_base + "/console/api/devices", params=q,
                                       timeout=10).json()["devices"]]
    assert find(state="active") == sorted(d.id for d in active)
    assert find(state="disabled") == [disabled.id]
    assert find(protocol="none", state="silent") == [silent.id]
    assert find(q=silent.id[-6:].upper()) == [silent.id]
    assert find(kind="noise") == [silent.id]
    page = s.get(gw.http_base + "/console/api/devices", params={"limit": 2}, timeout=10).json()
    rest = s.get(gw.http_base + "/console/api/devices",
                 params={"after": page["next_after"]}, timeout=10).json()
    assert [d["id"] for d in page["devices"] + rest["devices"]] == sorted(d["id"] for d in devices)

    # latest readings and dead letters, newest first
    readings = s.get(f"{gw.http_base}/console/api/devices/{active[0].id}/readings",
                     timeout=10).json()["readings"]
    assert [(r["quantity"], r["value"]) for r in readings] == [("pm2_5", 12.5)]
    dls = s.get(gw.http_base + "/console/api/deadletters", timeout=10).json()["dead_letters"]
    assert dls[0]["reason"] == "malformed_json" and dls[0]["payload"] == "{broken"

    # the KPI page's data and its CSV
    k = s.get(gw.http_base + "/console/api/kpi", timeout=10).json()
    assert k["city"] == kpi["city"] and len(k["communes"]) == 126
    csv_resp = s.get(gw.http_base + "/console/api/kpi.csv", timeout=10)
    assert csv_resp.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv_resp.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(csv_resp.text)))
    assert len(rows) == 126
    ba_dinh = next(r for r in rows if r["commune_code"] == "00004")
    assert (ba_dinh["commune_name"], ba_dinh["active"]) == ("Phường Ba Đình", "3")
    geo = s.get(gw.http_base + "/console/api/kpi/map", timeout=10).json()
    assert geo["attribution"] == "centroids" and len(geo["communes"]) == 126
    assert all(20.5 < c["lat"] < 21.5 and 105.2 < c["lon"] < 106.1 for c in geo["communes"])


@pytest.mark.parametrize("path", ["/console/api/devices/%00", "/console/api/devices/" + "a" * 5000])
def test_odd_device_paths_are_answered_cleanly(gw: Gateway, path: str):
    s, _ = session_for(gw, gw.token)
    r = s.get(gw.http_base + path, timeout=10)
    assert r.status_code in (404, 414, 431), r.status_code
    assert gw.http_get("/healthz").status_code == 200


def test_kpi_map_draws_configured_boundaries(gateway_factory, tmp_path):
    """With kpi.boundaries_file the map carries each commune's rings (lon, lat) as configured;
    communes without a boundary keep their centroid."""
    square = [[105.83, 21.03], [105.85, 21.03], [105.85, 21.05], [105.83, 21.05], [105.83, 21.03]]
    geojson = tmp_path / "boundaries.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"commune_code": "00004"},
         "geometry": {"type": "Polygon", "coordinates": [square]}}]}))
    gw: Gateway = gateway_factory(config_toml=f'[kpi]\nboundaries_file = "{geojson}"\n')
    s, _ = session_for(gw, gw.token)
    geo = s.get(gw.http_base + "/console/api/kpi/map", timeout=10).json()
    assert geo["attribution"] == "boundaries"
    by_code = {c["code"]: c for c in geo["communes"]}
    assert by_code["00004"]["rings"] == [square]
    assert by_code["00008"]["rings"] == [] and by_code["00008"]["lat"] > 20

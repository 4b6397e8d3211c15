"""The operator console in a real browser: Debian's headless Chromium driven by Selenium through
Debian's chromedriver (never Selenium Manager: SE_AVOID_STATS and an explicit driver path keep it
from downloading or reporting anything). One gateway and one browser for the module.

Live pages (overview, device) replace their elements on every server-sent update, and the gateway
here updates the overview five times a second so that the tests meet that as a slow host would:
an element found once can be gone a moment later. So values that change live are read and compared
inside `wait_until` (which finds the elements again on each try), and one-time facts are read
with `fresh`, which finds them again when an update replaced them.

Screenshots of every page are written to the artifacts directory printed at the start
(CITYGW_ARTIFACTS_DIR, default /tmp/citygw-artifacts/console-<time>)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar
from urllib.parse import urlparse

import pytest

from support import Gateway, wait_until

os.environ["SE_AVOID_STATS"] = "true"
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="chromium and chromium-driver (Debian) are installed by tests/run")


# The alerts page's rule, scoped to the one device that test publishes from.
RULES = """
[[rules]]
name = "ba-dinh-flood"
device = "con-flood-b"
quantity = "water_level"
above = 2.5
clear = 2.3
severity = "critical"
"""


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways(env={"CITYGW_CONSOLE__LIVE_INTERVAL_MS": "200"}, config_toml=RULES)


@pytest.fixture(scope="module")
def artifacts() -> Path:
    base = os.environ.get("CITYGW_ARTIFACTS_DIR") or "/tmp/citygw-artifacts"
    d = Path(base) / time.strftime("console-%Y%m%d-%H%M%S")
    d.mkdir(parents=True, exist_ok=True)
    print(f"\nconsole screenshots: {d}")
    return d


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="citygw-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-default-apps",
                "--disable-extensions", "--window-size=1400,1000", "--lang=vi",
                f"--user-data-dir={profile}",
                # Anything not on loopback would go to a dead proxy instead of the internet.
                "--proxy-server=http://127.0.0.1:9"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    driver.get_log("performance")  # the browser's own start page is not the console's traffic
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def text(driver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


def wait_css(driver, selector: str, timeout: float = 10, desc: str | None = None) -> None:
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, selector), timeout,
               desc=desc or f"{selector} on the page")


def fresh(read: Callable[[], T], timeout: float = 10) -> T:
    """`read()`, which finds its elements itself, again whenever a live update replaced them
    between the find and the use (any other failure is the test's)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read()
        except StaleElementReferenceException:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def css(driver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def sign_in(driver, gw: Gateway, token: str) -> None:
    driver.get(gw.http_base + "/console/")
    wait_css(driver, "#token")
    wait_until(lambda: css(driver, "#token").is_displayed(), 10, desc="sign-in form shown")
    field = css(driver, "#token")
    field.clear()
    field.send_keys(token)
    css(driver, "#signin-form button[type=submit]").click()


def shot(driver, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, f"{path} looks empty"


@pytest.fixture(scope="module")
def fleet(gw: Gateway):
    """Devices in Hà Nội communes: three reporting over MQTT, one silent, one disabled, one
    that sends a malformed payload."""
    active = [gw.add_device(kind="air_quality", commune="00004", name=f"Trạm không khí {i}")
              for i in range(3)]
    silent = gw.add_device(kind="noise", commune="00008")
    disabled = gw.add_device(kind="water_level", commune="00004")
    gw.cli("device", "disable", disabled.id)
    for i, d in enumerate(active):
        with gw.connected_client(d) as c:
            assert c.publish(d.topic, json.dumps({"temperature": 20 + i, "pm2_5": 10.5 + i})) == 0
    with gw.connected_client(active[0]) as c:
        assert c.publish(active[0].topic, b'{"temperature": oops}') == 0x99
    return {"active": active, "silent": silent, "disabled": disabled}


def test_a_wrong_token_cannot_sign_in(gw: Gateway, browser, artifacts: Path):
    sign_in(browser, gw, "not-the-token")
    wait_until(lambda: text(browser, "#signin-error"), 10, desc="sign-in error shown")
    assert text(browser, "#signin-error") == "Mã không đúng."
    assert not browser.find_element(By.CSS_SELECTOR, "#top").is_displayed()
    assert browser.get_cookie("citygw_session") is None
    shot(browser, artifacts, "0-signin-refused")


def test_overview_equals_the_admin_api(gw: Gateway, browser, artifacts: Path, fleet):
    sign_in(browser, gw, gw.token)
    wait_css(browser, '[data-metric="devices.registered"]', 15, desc="overview rendered")
    cookie = browser.get_cookie("citygw_session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == "", "scripts cannot read the session"

    devices = gw.cli("device", "list")
    enabled = [d for d in devices if d["enabled"]]
    reported = [d for d in enabled if d["last_seen_time_ms"] > 0]
    expected = {
        "devices.registered": len(enabled),
        "devices.active": len(reported),
        "devices.silent": len(enabled) - len(reported),
        "devices.disabled": len(devices) - len(enabled),
        "devices.online": sum(d["online"] for d in devices),
        "ingest.readings_total": int(gw.metric("citygw_readings_stored_total")),
    }
    kpi = gw.cli("kpi", "report")
    assert kpi["city"]["active"] == expected["devices.active"]

    def shown() -> dict:
        return {k: int(text(browser, f'[data-metric="{k}"]').replace(".", "").replace(",", ""))
                for k in expected}
    wait_until(lambda: shown() == expected, 10, desc=f"overview shows {expected}")

    def active_by_protocol() -> dict:
        cells = [[c.text for c in r.find_elements(By.TAG_NAME, "td")]
                 for r in browser.find_elements(By.CSS_SELECTOR, "#by-protocol tbody tr")]
        return {c[0]: c[2] for c in cells}
    mqtt_active = str(sum(d["protocol"] == "mqtt" for d in reported))
    wait_until(lambda: active_by_protocol().get("mqtt") == mqtt_active, 10,
               desc=f"{mqtt_active} active MQTT devices in the by-protocol table")
    wait_until(lambda: "malformed_json" in text(browser, "#refused"), 10,
               desc="malformed_json among the refusals")
    assert int(gw.metric("citygw_messages_rejected_total", protocol="mqtt",
                         reason="malformed_json")) == 1
    wait_css(browser, ".chart .uplot", 10, desc="ingest chart drawn")
    shot(browser, artifacts, "1-overview-vi")

    # English, switched in the page; then back to Vietnamese (the default)
    css(browser, "#lang").click()
    wait_until(lambda: text(browser, '#nav a[data-page="devices"]') == "Devices", 5,
               desc="English navigation")
    assert browser.execute_script("return document.documentElement.lang") == "en"
    wait_css(browser, '[data-metric="devices.registered"]')
    shot(browser, artifacts, "1-overview-en")
    css(browser, "#lang").click()
    wait_until(lambda: text(browser, '#nav a[data-page="devices"]') == "Thiết bị", 5,
               desc="Vietnamese navigation")


def test_a_reading_published_by_mqtt_appears_on_the_device_page_live(gw: Gateway, browser,
                                                                     artifacts: Path, fleet):
    device = fleet["active"][0]
    browser.get(f"{gw.http_base}/console/#/devices/{device.id}")
    wait_css(browser, '#latest [data-quantity="temperature"]', 15, desc="latest readings")
    wait_css(browser, "#device-chart .uplot", 10, desc="device chart")
    fresh(lambda: next(b for b in browser.find_elements(By.CSS_SELECTOR, "#quantity-picker button")
                        if b.text == "temperature").click())
    wait_until(lambda: "temperature" in text(browser, "#device-chart"), 5, desc="temperature charted")
    browser.execute_script("window.__noReload = 'still here'")
    points_before = int(css(browser, "#device-chart").get_attribute("data-points"))
    with gw.connected_client(device) as c:
        published = time.monotonic()
        assert c.publish(device.topic, json.dumps({"temperature": 37.25})) == 0
        wait_until(lambda: text(browser, '#latest [data-quantity="temperature"]') in ("37,25", "37.25"),
                   2.0, interval=0.02, desc="the new reading on the page within 2 s")
        shown_after = time.monotonic() - published
    assert browser.execute_script("return window.__noReload") == "still here", "page was reloaded"
    assert int(css(browser, "#device-chart").get_attribute("data-points")) == points_before + 1
    print(f"publish -> shown on the device page: {shown_after * 1000:.0f} ms")
    shot(browser, artifacts, "3-device")


def test_devices_page_searches(gw: Gateway, browser, artifacts: Path, fleet):
    browser.get(f"{gw.http_base}/console/#/devices")
    wait_css(browser, "#devices tbody tr", 10)
    state = Select(css(browser, '#device-filters select[name="state"]'))
    state.select_by_value("disabled")
    wait_until(lambda: [r.find_element(By.TAG_NAME, "a").text for r in
                        browser.find_elements(By.CSS_SELECTOR, "#devices tbody tr")]
               == [fleet["disabled"].id], 10, desc="only the disabled device listed")
    shot(browser, artifacts, "2-devices")
    state.select_by_value("")


def test_kpi_page_lists_hanois_126_communes(gw: Gateway, browser, artifacts: Path, fleet):
    browser.get(f"{gw.http_base}/console/#/kpi")
    wait_css(browser, "#kpi-table tbody tr", 20, desc="KPI table")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#kpi-table tbody tr")) == 126
    assert text(browser, "#commune-count") == "126"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#kpi-map .commune")) == 126
    assert "Phường Ba Đình" in text(browser, '#kpi-table tr[data-code="00004"]')
    assert text(browser, '[data-metric="kpi.active"]') == "3"
    # sort by active devices, most first: Ba Đình (3 active) leads
    css(browser, '#kpi-table th[data-key="active"]').click()
    wait_until(lambda: css(browser, "#kpi-table tbody tr").get_attribute("data-code") == "00004",
               5, desc="sorted by active")
    assert css(browser, '#kpi-table th[data-key="active"]').get_attribute("data-sort") == "desc"
    href = css(browser, "#kpi-csv").get_attribute("href")
    assert urlparse(href).path == "/console/api/kpi.csv"
    shot(browser, artifacts, "4-kpi")


def test_dead_letters_page(gw: Gateway, browser, artifacts: Path, fleet):
    browser.get(f"{gw.http_base}/console/#/deadletters")
    wait_css(browser, "#dead-letters tbody tr", 10)
    first = fresh(lambda: text(browser, "#dead-letters tbody tr"))
    assert "malformed_json" in first and fleet["active"][0].id in first
    assert '{"temperature": oops}' in first, "payload shown as text"
    shot(browser, artifacts, "5-deadletters")


def test_commands_page_sends_a_command_and_follows_it_live(gw: Gateway, browser, artifacts: Path):
    """The admin sends a command from the page; a real MQTT device receives it and answers; the
    row goes QUEUED -> ... -> SUCCEEDED on the page without a reload, and its history opens."""
    d = gw.add_device(kind="street_light", commune="00004")
    browser.get(f"{gw.http_base}/console/#/commands/{d.id}")
    wait_css(browser, "#send-command", 15, desc="send form (admin)")
    browser.execute_script("window.__noReload = 'commands'")
    with gw.connected_client(d) as dev:
        assert dev.subscribe(f"devices/{d.id}/commands/+") == [1]
        form = css(browser, "#send-command")
        form.find_element(By.NAME, "name").send_keys("light")
        form.find_element(By.NAME, "params").send_keys('{"on": true, "level": 80}')
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        msg = dev.wait_message(lambda m: m.topic.startswith(f"devices/{d.id}/commands/"))
        body = json.loads(msg.payload)
        assert (body["name"], body["params"]) == ("light", {"on": True, "level": 80})
        row = f'#commands tr[data-id="{body["id"]}"]'
        wait_css(browser, row, 10, desc="the sent command listed")
        assert dev.publish(f"devices/{d.id}/commands/{body['id']}/result",
                           json.dumps({"status": "ok", "result": {"level": 80}})) == 0
        wait_until(lambda: css(browser, row).get_attribute("data-state") == "SUCCEEDED", 10,
                   desc="the command SUCCEEDED on the page, live")
    assert browser.execute_script("return window.__noReload") == "commands", "page was reloaded"
    shown = gw.cli("command", "show", body["id"])
    assert shown["state"] == "SUCCEEDED" and shown["created_by"] == "admin", shown
    fresh(lambda: css(browser, row + " td:nth-child(3)").click())
    wait_until(lambda: [r.find_elements(By.TAG_NAME, "td")[0].text for r in
                        browser.find_elements(By.CSS_SELECTOR, "#command-history tbody tr")]
               == ["Đang chờ", "Đã gửi", "Đã nhận", "Thành công"], 10,
               desc="the command's history, oldest first")
    shot(browser, artifacts, "7-commands")


def test_alerts_page_shows_a_rule_crossing_live_and_the_admin_acknowledges(gw: Gateway, browser,
                                                                          artifacts: Path):
    """A reading published by MQTT crosses the rule's threshold: the alert appears on the open
    Alerts page within 2 s without a reload, with its severity and commune; the admin
    acknowledges it from the page (history: who, when); the Overview counts it, and the count
    falls back live when a lower reading clears it."""
    d = gw.add_device("con-flood-b", kind="water_level", commune="00004")
    browser.get(f"{gw.http_base}/console/#/alerts")
    wait_css(browser, '#rules tr[data-name="ba-dinh-flood"]', 15, desc="the rule listed")
    wait_until(lambda: text(browser, '[data-metric="alerts.active.critical"]') == "0", 10,
               desc="no active critical alert yet")
    browser.execute_script("window.__noReload = 'alerts'")
    row = '#alerts tr[data-rule="ba-dinh-flood"]'
    with gw.connected_client(d) as dev:
        published = time.monotonic()
        assert dev.publish(d.topic, json.dumps({"water_level": 2.8})) == 0
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, row), 2.0, interval=0.02,
                   desc="the alert on the page within 2 s")
        shown_after = time.monotonic() - published
    print(f"publish -> alert shown on the alerts page: {shown_after * 1000:.0f} ms")
    alert_id = fresh(lambda: css(browser, row).get_attribute("data-id"))
    cells = fresh(lambda: [c.text for c in css(browser, row).find_elements(By.TAG_NAME, "td")])
    assert cells[1] == "Khẩn cấp" and cells[3] == d.id and "Phường Ba Đình" in cells[4], cells
    assert cells[5] == "water_level 2.8 > 2.5" and cells[6] == "Đang xảy ra · chưa xác nhận", cells
    wait_until(lambda: text(browser, '[data-metric="alerts.active.critical"]') == "1", 5,
               desc="one active critical alert counted")

    fresh(lambda: css(browser, row + ' button[data-action="ack"]').click())
    wait_until(lambda: css(browser, row).get_attribute("data-state") == "ACTIVE_ACK", 10,
               desc="acknowledged on the page")
    assert browser.find_elements(By.CSS_SELECTOR, row + ' button[data-action="ack"]') == []
    fresh(lambda: css(browser, row + " td:nth-child(3)").click())
    wait_until(lambda: [[c.text for c in r.find_elements(By.TAG_NAME, "td")][1:3] for r in
                        browser.find_elements(By.CSS_SELECTOR, "#alert-history tbody tr")]
               == [["Đang xảy ra · chưa xác nhận", "rule:ba-dinh-flood"],
                   ["Đang xảy ra · đã xác nhận", "admin"]], 10,
               desc="the alert's history: raised by the rule, acknowledged by the admin")
    assert browser.execute_script("return window.__noReload") == "alerts", "page was reloaded"
    shown = gw.cli("alert", "show", alert_id)
    assert (shown["state"], shown["acked_by"]) == ("ACTIVE_ACK", "admin"), shown
    shot(browser, artifacts, "8-alerts")

    browser.get(f"{gw.http_base}/console/#/overview")
    wait_until(lambda: text(browser, '#overview-alerts [data-metric="alerts.active.critical"]')
               == "1", 10, desc="the overview counts the active alert")
    with gw.connected_client(d) as dev:
        assert dev.publish(d.topic, json.dumps({"water_level": 2.0})) == 0
    wait_until(lambda: text(browser, '#overview-alerts [data-metric="alerts.active.critical"]')
               == "0", 10, desc="the count falls back live once the rule cleared it")
    assert gw.cli("alert", "show", alert_id)["state"] == "CLEARED_ACK"


def test_the_admin_adds_and_removes_a_rule_on_the_alerts_page(gw: Gateway, browser,
                                                             artifacts: Path):
    """A rule typed as TOML in the page is in force (the CLI lists it as added at run time by the
    admin); a typo is refused naming the key; the rule's Remove button takes it away again."""
    browser.get(f"{gw.http_base}/console/#/alerts")
    wait_css(browser, "#add-rule", 15, desc="the add-rule form (admin)")
    field = css(browser, "#rule-definition")
    field.send_keys('name = "noise-night"\nquantity = "noise"\nabove = 70\nseverity = "minor"\n'
                    'kind = "noise"\nfoo = 1')
    css(browser, "#add-rule button[type=submit]").click()
    wait_until(lambda: "foo" in text(browser, "#rule-status"), 10, desc="the typo named")
    field.clear()
    field.send_keys('name = "noise-night"\nquantity = "noise"\nabove = 70\nseverity = "minor"\n'
                    'kind = "noise"')
    css(browser, "#add-rule button[type=submit]").click()
    row = '#rules tr[data-name="noise-night"]'
    wait_css(browser, row, 10, desc="the new rule listed")
    assert "thêm khi chạy · admin" in fresh(lambda: text(browser, row))
    listed = {r["name"]: r for r in gw.cli("rule", "list")}
    assert (listed["noise-night"]["origin"], listed["noise-night"]["added_by"]) == ("api", "admin")
    assert browser.find_elements(By.CSS_SELECTOR,
                                 '#rules tr[data-name="ba-dinh-flood"] button') == [], \
        "a config rule has no remove button"
    shot(browser, artifacts, "9-rules")
    fresh(lambda: css(browser, row + ' button[data-action="remove"]').click())
    browser.switch_to.alert.accept()
    wait_until(lambda: not browser.find_elements(By.CSS_SELECTOR, row), 10,
               desc="the rule removed from the page")
    assert "noise-night" not in {r["name"] for r in gw.cli("rule", "list")}


def test_operator_is_read_only_in_the_page(gw: Gateway, browser, artifacts: Path, fleet):
    token = gw.cli("operator", "add", "wall-screen")["token"]
    browser.get(gw.http_base + "/console/")
    wait_css(browser, "#signout")
    css(browser, "#signout").click()
    sign_in(browser, gw, token)
    wait_css(browser, '[data-metric="devices.registered"]', 15)
    assert "wall-screen" in text(browser, "#who")
    browser.get(f"{gw.http_base}/console/#/devices/{fleet['silent'].id}")
    wait_css(browser, "#toggle-enabled", 10)
    assert not fresh(lambda: css(browser, "#toggle-enabled").is_enabled()), \
        "operators cannot disable devices"
    browser.get(f"{gw.http_base}/console/#/commands")
    wait_css(browser, "#commands-readonly", 10, desc="commands page, read-only")
    assert browser.find_elements(By.CSS_SELECTOR, "#send-command") == [], "no send form"
    browser.get(f"{gw.http_base}/console/#/alerts")
    wait_css(browser, "#alerts-readonly", 10, desc="alerts page, read-only")
    wait_css(browser, '#alerts tr[data-rule="ba-dinh-flood"]', 10, desc="the alert listed")
    assert browser.find_elements(By.CSS_SELECTOR, "#alerts button") == [], "no ack/clear buttons"
    assert browser.find_elements(By.CSS_SELECTOR, "#add-rule") == [], "no add-rule form"
    shot(browser, artifacts, "6-device-operator")


def test_the_browser_made_no_request_outside_citygw(gw: Gateway, browser):
    """Last in the module: the performance log holds every request of the tests above."""
    urls = requested_urls(browser)
    assert any(u.startswith(gw.http_base + "/console/api/") for u in urls), urls[:10]
    # Every network request (http, https, ws...) went to the gateway; data: and blob: URLs and
    # the browser's own chrome:// pages are not network requests.
    outside = [u for u in urls if not u.startswith(gw.http_base + "/")
               and not u.startswith(("data:", "blob:", "chrome:", "about:"))]
    assert outside == [], outside
    # Refusals the tests provoke on purpose: the wrong token (401), the rule with a typo (400).
    expected = ("Mã không đúng", "401", "/console/api/rules - Failed to load resource: the server "
                "responded with a status of 400")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
              and not any(x in e["message"] for x in expected)]
    assert errors == [], errors

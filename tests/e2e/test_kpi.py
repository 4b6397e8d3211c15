"""IoT connections per resident (the city plan's KPI), through the real gateway.

The test provisions devices across several communes (active, silent, disabled, coordinates only,
unassigned, in another city, outside their kind's activity window), makes some of them publish
over MQTT, and compares `citygw kpi report` (CLI, admin API), `GetConnectionKpi` (agency API),
`/api/v1/kpi` (HTTP) and the Prometheus gauges with what it computes itself from the same inputs:
the shipped commune table (gateway/data/geo) and the documented rules. Snapshot history with
chosen dates is backfilled through the CLI and the projection compared with the documented
method (least squares over the window, dates from the latest snapshot).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import time

import grpc
import pytest
import requests

from support import ROOT, CliError, Gateway, publish_json, unique_id, wait_until
from support.telemetry import rpc_error

GEO = ROOT / "gateway" / "data" / "geo"
HANOI = "01"
KINDS = ["air_quality", "noise", "water_level", "flood", "rain", "weather", "traffic", "parking",
         "street_light", "energy_meter", "water_meter", "fire_alarm", "waste_bin", "soil_moisture",
         "generic"]
DAY = 86_400
NOISE_WINDOW = 3  # seconds, configured below
WINDOWS = {k: DAY for k in KINDS} | {"energy_meter": 2 * DAY, "water_meter": 2 * DAY,
                                     "noise": NOISE_WINDOW}
TARGETS = {HANOI: [(2026, 1.0), (2030, 4.0)], "79": [(2030, 2.0)]}

CONFIG = f"""
[kpi]
refresh = "1s"
[kpi.kind_windows]
noise = "{NOISE_WINDOW}s"
[kpi.targets."79"]
"2030" = 2.0
"""


def load_communes() -> list[dict]:
    with open(GEO / "vn-communes-2025.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["lat"], r["lon"] = float(r["centroid_lat"]), float(r["centroid_lon"])
        r["area"] = float(r["area_km2"]) if r["area_km2"] else 0.0
    return rows


COMMUNES = load_communes()
BY_CODE = {c["commune_code"]: c for c in COMMUNES}
with open(GEO / "city-population-2025.csv", newline="", encoding="utf-8") as f:
    CITIES = {r["province_code"]: r for r in csv.DictReader(f)}


def haversine_km(lat1, lon1, lat2, lon2) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (math.sin((p2 - p1) / 2) ** 2
         + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2)
    return 2 * 6371 * math.asin(math.sqrt(a))


def nearest_commune(lat: float, lon: float) -> str | None:
    d, code = min((haversine_km(lat, lon, c["lat"], c["lon"]), c["commune_code"]) for c in COMMUNES)
    return code if d <= 25 else None


def local_today() -> dt.date:
    return dt.datetime.now(dt.timezone(dt.timedelta(hours=7))).date()


def target_in_force(city: str) -> tuple[int, float | None]:
    year = local_today().year
    schedule = TARGETS.get(city, [])
    for y, t in schedule:
        if y >= year:
            return y, t
    return (schedule[-1][0], schedule[-1][1]) if schedule else (0, None)


class Scene:
    """The devices and what the test knows about them (kind, place, last publish, enabled)."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.devices: dict[str, dict] = {}

    def add(self, kind: str, commune: str | None = None, lat: float | None = None,
            lon: float | None = None):
        d = self.gw.add_device(unique_id(kind.replace("_", "")), kind=kind, commune=commune,
                               lat=lat, lon=lon)
        self.devices[d.id] = dict(dev=d, kind=kind, commune=commune, lat=lat, lon=lon,
                                  seen=None, enabled=True)
        return d

    def publish(self, *devs) -> None:
        for d in devs:
            publish_json(self.gw, d, {"v": 1})
            # Receive time is after the PUBACK-free start of the call; the gateway's clock is ours.
            self.devices[d.id]["seen"] = time.time()

    def disable(self, d) -> None:
        self.gw.cli("device", "disable", d.id)
        self.devices[d.id]["enabled"] = False

    def place(self, info: dict) -> tuple[str | None, bool]:
        """(commune code, placed by nearest centroid) by the documented rules."""
        if info["commune"] in BY_CODE:
            return info["commune"], False
        if info["lat"] is not None:
            code = nearest_commune(info["lat"], info["lon"])
            return code, code is not None
        return None, False

    def expected(self, city: str, now: float, margin: float = 0.5) -> dict | None:
        """City, commune and kind figures; None while a device sits within `margin` seconds of
        its window's edge (the answer would depend on which side of it the gateway computed)."""
        year, target = target_in_force(city)
        pop = int(CITIES[city]["population"]) if city in CITIES else None
        zero = lambda: dict(registered=0, active=0, disabled=0, approx=0)  # noqa: E731
        city_t, communes, kinds, unassigned, outside = zero(), {}, {}, zero(), 0
        for info in self.devices.values():
            code, approx = self.place(info)
            active = False
            if info["seen"] is not None:
                age = now - info["seen"]
                window = WINDOWS[info["kind"]]
                if abs(age - window) < margin:
                    return None
                active = age < window
            buckets = []
            if code is None:
                buckets = [unassigned]
            elif BY_CODE[code]["province_code"] != city:
                if info["enabled"]:
                    outside += 1
                continue
            else:
                buckets = [city_t, communes.setdefault(code, zero()),
                           kinds.setdefault(info["kind"], zero())]
            for b in buckets:
                if not info["enabled"]:
                    b["disabled"] += 1
                    continue
                b["registered"] += 1
                b["active"] += active
                b["approx"] += approx
        return dict(year=year, target=target, pop=pop, city=city_t, communes=communes, kinds=kinds,
                    unassigned=unassigned, outside=outside)


def figures_match(got: dict, want: dict, pop: int | None, area: float, target: float | None) -> list[str]:
    """Differences between a KpiFigures JSON object and the expected tally."""
    problems = []
    exp = dict(registered=want["registered"], active=want["active"],
               silent=want["registered"] - want["active"], disabled=want["disabled"])
    for k, v in exp.items():
        if got.get(k) != v:
            problems.append(f"{k}: {got.get(k)} != {v}")
    if got.get("population") != pop:
        problems.append(f"population {got.get('population')} != {pop}")
    if got.get("target_per_resident") != target:
        problems.append(f"target {got.get('target_per_resident')} != {target}")
    if pop:
        per = want["active"] / pop
        if not math.isclose(got["connections_per_resident"], per, rel_tol=1e-9, abs_tol=1e-15):
            problems.append(f"per resident {got['connections_per_resident']} != {per}")
        if target:
            if not math.isclose(got["attainment_percent"], per / target * 100, rel_tol=1e-9,
                                abs_tol=1e-12):
                problems.append(f"attainment {got['attainment_percent']}")
            needed = max(0, math.ceil(target * pop) - want["active"])
            if got["devices_needed"] != needed:
                problems.append(f"devices_needed {got['devices_needed']} != {needed}")
    else:
        for k in ("connections_per_resident", "attainment_percent", "devices_needed"):
            if got.get(k) is not None:
                problems.append(f"{k} should be absent without a population: {got.get(k)}")
    density = want["active"] / area if area > 0 else 0.0
    if not math.isclose(got["area_km2"], area, rel_tol=1e-9) or not math.isclose(
            got["active_per_km2"], density, rel_tol=1e-9, abs_tol=1e-12):
        problems.append(f"area/density {got['area_km2']}/{got['active_per_km2']} != {area}/{density}")
    return problems


def compare(report: dict, exp: dict) -> list[str]:
    """Every difference between a report (JSON) and the expected figures."""
    city = report["city_code"]
    problems = []
    if report["target_year"] != exp["year"]:
        problems.append(f"target_year {report['target_year']} != {exp['year']}")
    problems += ["city " + p for p in figures_match(
        report["city"], exp["city"], exp["pop"], float(CITIES[city]["area_km2"]), exp["target"])]
    if report["approximated_devices"] != exp["city"]["approx"]:
        problems.append(f"approximated {report['approximated_devices']} != {exp['city']['approx']}")
    city_communes = [c for c in COMMUNES if c["province_code"] == city]
    got_communes = {c["code"]: c for c in report["communes"]}
    if sorted(got_communes) != sorted(c["commune_code"] for c in city_communes):
        problems.append("the report does not list exactly the city's communes")
    for c in city_communes:
        code = c["commune_code"]
        want = exp["communes"].get(code, dict(registered=0, active=0, disabled=0, approx=0))
        got = got_communes.get(code)
        if got is None:
            continue
        problems += [f"{code} {p}" for p in figures_match(got["figures"], want, None, c["area"],
                                                          exp["target"])]
        if got["approximated_devices"] != want["approx"]:
            problems.append(f"{code} approximated {got['approximated_devices']} != {want['approx']}")
        if got["name"] != c["commune_name"]:
            problems.append(f"{code} name {got['name']!r}")
    got_kinds = {k["kind"]: k for k in report["kinds"]}
    want_kinds = {k: v for k, v in exp["kinds"].items() if v["registered"] + v["disabled"] > 0}
    if sorted(got_kinds) != sorted(want_kinds):
        problems.append(f"kinds {sorted(got_kinds)} != {sorted(want_kinds)}")
    for kind, want in want_kinds.items():
        got = got_kinds.get(kind, {})
        triple = (got.get("registered"), got.get("active"), got.get("silent"), got.get("window_secs"))
        w = (want["registered"], want["active"], want["registered"] - want["active"], WINDOWS[kind])
        if triple != w:
            problems.append(f"kind {kind}: {triple} != {w}")
    u = report["unassigned"]
    if (u["registered"], u["active"]) != (exp["unassigned"]["registered"], exp["unassigned"]["active"]):
        problems.append(f"unassigned {u} != {exp['unassigned']}")
    if report["outside_city"] != exp["outside"]:
        problems.append(f"outside_city {report['outside_city']} != {exp['outside']}")
    if report["attribution"] != "centroids":
        problems.append(f"attribution {report['attribution']}")
    return problems


def kpi_report(gw: Gateway, city: str = "") -> dict:
    args = ["kpi", "report", "--format", "json"]
    if city:
        args += ["--city", city]
    return gw.cli(*args)


def near(code: str, dlat: float = 0.0015, dlon: float = -0.001) -> tuple[float, float]:
    c = BY_CODE[code]
    return round(c["lat"] + dlat, 6), round(c["lon"] + dlon, 6)


@pytest.fixture
def kpi_gw(gateway_factory) -> Gateway:
    return gateway_factory(config_toml=CONFIG)


def wait_report_matches(gw: Gateway, scene: Scene, city: str, fetch=None, timeout: float = 20.0):
    fetch = fetch or (lambda: kpi_report(gw, city))
    last: list = []

    def matches():
        before = time.time()
        report = fetch()
        after = time.time()
        exp_before, exp_after = scene.expected(city, before), scene.expected(city, after)
        if exp_before is None or exp_after is None or exp_before != exp_after:
            return False  # a window edge passed during the call; ask again
        last[:] = [report, compare(report, exp_after)]
        return not last[1]

    try:
        wait_until(matches, timeout, interval=0.3, desc=f"KPI of {city} as computed by the test")
    except AssertionError as e:
        raise AssertionError(f"{e}\ndifferences: {last[1] if last else None}") from None
    return last[0]


def test_kpi_of_city_and_communes_equals_an_independent_count(kpi_gw: Gateway, telemetry):
    gw, scene = kpi_gw, Scene(kpi_gw)
    # Coordinates chosen near known centroids: the test's own nearest-centroid search (haversine
    # over every commune) must agree with the expected commune before the gateway is asked.
    coordinate_only = {"00070": near("00070"), "00025": near("00025", -0.002, 0.0015),
                       "00008": near("00008", 0.001, 0.002)}
    for code, (lat, lon) in coordinate_only.items():
        assert nearest_commune(lat, lon) == code, (code, lat, lon)
    hcmc_commune = next(c["commune_code"] for c in COMMUNES if c["province_code"] == "79")

    # The noise devices publish first: their 3 s window runs out while the rest is set up.
    stale = [scene.add("noise", commune="00004"), scene.add("noise", commune="00070")]
    scene.publish(*stale)
    active = [scene.add("air_quality", commune="00004"),
              scene.add("air_quality", commune="00004", lat=21.2, lon=105.5),  # code wins
              scene.add("water_meter", commune="00008"),
              scene.add("traffic", commune="00025")]
    silent = [scene.add("air_quality", commune="00004"), scene.add("parking", commune="00070"),
              scene.add("street_light", commune="00025")]
    approx_active = [scene.add("waste_bin", lat=lat, lon=lon)
                     for lat, lon in coordinate_only.values()]
    approx_silent = [scene.add("waste_bin", lat=coordinate_only["00070"][0],
                               lon=coordinate_only["00070"][1])]
    # An unknown commune code falls back to the coordinates.
    unknown_code = scene.add("flood", commune="99999", lat=near("00004")[0], lon=near("00004")[1])
    unassigned = [scene.add("generic"), scene.add("generic", lat=0.5, lon=0.5)]
    other_city = [scene.add("air_quality", commune=hcmc_commune)]
    disabled = [scene.add("fire_alarm", commune="00004")]
    scene.publish(*active, *approx_active, unknown_code, unassigned[0], other_city[0],
                  disabled[0])
    scene.disable(disabled[0])
    del silent, approx_silent  # provisioned, never publish

    report = wait_report_matches(gw, scene, HANOI)
    # ... and the stale noise devices really were counted active before their window ran out
    # (checked by test_per_kind_activity_window); here they are silent:
    assert {k["kind"]: k["active"] for k in report["kinds"]}["noise"] == 0

    # The same figures through the agency API (gRPC) and HTTP.
    agency = gw.add_agency(unique_id("kpi"), kpi=True)
    api = telemetry(gw, agency.token)

    def http_report():
        r = requests.get(gw.http_base + "/api/v1/kpi", params={"city": HANOI},
                         headers={"Authorization": f"Bearer {agency.token}"}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    wait_report_matches(gw, scene, HANOI, fetch=http_report)
    g = api.connection_kpi(HANOI)
    assert (g.city.registered, g.city.active, g.city.disabled, g.approximated_devices) == (
        report["city"]["registered"], report["city"]["active"], report["city"]["disabled"],
        report["approximated_devices"])
    assert {c.code: c.figures.active for c in g.communes} == \
        {c["code"]: c["figures"]["active"] for c in report["communes"]}

    # Another city: only its own devices count; Hà Nội's are outside it.
    exp79 = scene.expected("79", time.time())
    r79 = kpi_report(gw, "79")
    assert (r79["city"]["registered"], r79["city"]["active"]) == (1, 1)
    assert r79["outside_city"] == exp79["outside"]

    # Gauges: the city, and only the communes that have devices.
    exp = scene.expected(HANOI, time.time())

    def gauges_match():
        m = gw.metrics()
        communes = {l["commune"] for n, l, _ in m.samples if n == "citygw_kpi_commune_devices"}
        return (m.value("citygw_kpi_city_devices", city=HANOI, state="active") == exp["city"]["active"]
                and m.value("citygw_kpi_city_devices", city=HANOI, state="silent")
                == exp["city"]["registered"] - exp["city"]["active"]
                and communes == set(exp["communes"])
                and all(m.value("citygw_kpi_commune_devices", commune=c, state="active") == v["active"]
                        for c, v in exp["communes"].items()))

    wait_until(gauges_match, 15, interval=0.3, desc="KPI gauges equal the expected figures")


def test_per_kind_activity_window(kpi_gw: Gateway):
    """noise has a 3 s window in this gateway's config; air_quality keeps the 24 h default."""
    gw, scene = kpi_gw, Scene(kpi_gw)
    noise = scene.add("noise", commune="00004")
    aq = scene.add("air_quality", commune="00004")
    scene.publish(noise, aq)

    def kinds():
        return {k["kind"]: k for k in kpi_report(gw)["kinds"]}

    k = kinds()
    published_at = scene.devices[noise.id]["seen"]
    if time.time() - published_at < NOISE_WINDOW - 0.5:  # still inside the window
        assert (k["noise"]["active"], k["air_quality"]["active"]) == (1, 1), k
    assert k["noise"]["window_secs"] == NOISE_WINDOW and k["air_quality"]["window_secs"] == DAY

    k = wait_until(lambda: (k := kinds())["noise"]["active"] == 0 and k, 15, interval=0.2,
                   desc="the noise device to leave its 3 s window")
    assert time.time() - published_at >= NOISE_WINDOW - 0.5
    assert (k["noise"]["silent"], k["air_quality"]["active"]) == (1, 1), k
    # A new reading makes it active again.
    scene.publish(noise)
    assert kinds()["noise"]["active"] == 1


def least_squares(points: list[tuple[int, int]]) -> float:
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    return (sum((x - mx) * (y - my) for x, y in points)
            / sum((x - mx) ** 2 for x, _ in points))


def test_projection_from_backfilled_history(gateway_factory, tmp_path):
    # No automatic snapshots: the history is exactly what the test stores.
    gw = gateway_factory(config_toml=CONFIG.replace('refresh = "1s"', 'refresh = "0s"'))
    today = local_today()
    day = lambda offset: (today + dt.timedelta(days=offset)).isoformat()  # noqa: E731
    hanoi = [(-28, 1_000_000), (-21, 1_900_000), (-14, 2_200_000), (-7, 2_600_000), (0, 3_000_000)]
    rows = [("01", day(o), a, a + 5000) for o, a in hanoi]
    rows.append(("01", day(-200), 9_000_000, 9_000_000))  # outside the 90-day window
    rows += [("79", day(-10), 5000, 6000), ("79", day(-1), 4000, 6000)]  # falling
    f = tmp_path / "history.csv"
    with open(f, "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["city_code", "date", "active", "registered"])
        w.writerows(rows)
    assert gw.cli("kpi", "backfill", str(f)) == {"stored": len(rows)}

    report = kpi_report(gw, HANOI)
    assert [(s["date"], s["active"]) for s in report["history"]] == [(day(o), a) for o, a in hanoi]
    slope = least_squares(hanoi)
    assert math.isclose(report["growth_per_day"], slope, rel_tol=1e-9)
    pop = int(CITIES[HANOI]["population"])
    projections = {p["year"]: p for p in report["projections"]}
    assert sorted(projections) == [2026, 2030]
    for year, per_resident in TARGETS[HANOI]:
        required = math.ceil(per_resident * pop)
        days = math.ceil((required - 3_000_000) / slope)
        date = max(today, today + dt.timedelta(days=days))
        p = projections[year]
        assert (p["status"], p["projected_date"], p["devices_required"],
                p["devices_still_needed"]) == ("projected", date.isoformat(), required, required), p
        assert p["on_time"] == (date <= dt.date(year, 12, 31)), p

    # Falling history: no date.
    r79 = kpi_report(gw, "79")
    assert r79["growth_per_day"] < 0
    assert [(p["year"], p["status"], p["projected_date"]) for p in r79["projections"]] == \
        [(2030, "not_at_current_pace", "")]

    # The table says so in words.
    table = gw.cli_raw("kpi", "report", "--city", "79", "--format", "table", output_json=False)
    assert table.returncode == 0 and "not at the current pace" in table.stdout, table.stdout
    table = gw.cli_raw("kpi", "report", output_json=False)
    assert "Thành phố Hà Nội" in table.stdout and "projection" in table.stdout, table.stdout

    # Bad rows are refused as a whole, with the reason.
    for bad, reason in [(("01", "2026-02-30", 1, 1), "date"), (("01", day(-3), 9, 1), "above registered"),
                        (("zz", day(-3), 1, 1), "city_code")]:
        f.write_text("city_code,date,active,registered\n" + ",".join(map(str, bad)) + "\n")
        with pytest.raises(CliError) as e:
            gw.cli("kpi", "backfill", str(f))
        assert reason in e.value.proc.stderr, e.value.proc.stderr
    assert len(kpi_report(gw, HANOI)["history"]) == len(hanoi)


def test_kpi_needs_the_kpi_scope(kpi_gw: Gateway, telemetry):
    gw = kpi_gw
    without = gw.add_agency(unique_id("transport"), kpi=False)
    with_kpi = gw.add_agency(unique_id("science"), tenants=["hanoi"], kinds=["air_quality"], kpi=True)
    url = gw.http_base + "/api/v1/kpi"
    failures0 = gw.metric("citygw_api_auth_failures_total", api="http")

    # gRPC
    err = rpc_error(lambda: telemetry(gw, without.token).connection_kpi())
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "KPI" in err.details(), err
    for token in (None, "not-a-token", gw.token):  # the admin token is no agency token
        assert rpc_error(lambda: telemetry(gw, token).connection_kpi()).code() == \
            grpc.StatusCode.UNAUTHENTICATED
    assert telemetry(gw, with_kpi.token).connection_kpi().city_code == HANOI
    err = rpc_error(lambda: telemetry(gw, with_kpi.token).connection_kpi("zz"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "zz" in err.details()

    # HTTP
    r = requests.get(url, headers={"Authorization": f"Bearer {without.token}"}, timeout=10)
    assert r.status_code == 403 and "KPI" in r.json()["error"], r.text
    assert "city" not in r.json()
    for headers in ({}, {"Authorization": "Bearer not-a-token"},
                    {"Authorization": f"Basic {with_kpi.token}"}):
        r = requests.get(url, headers=headers, timeout=10)
        assert r.status_code == 401 and r.headers.get("WWW-Authenticate") == "Bearer", (headers, r.text)
    r = requests.get(url, headers={"Authorization": f"Bearer {with_kpi.token}"}, timeout=10)
    assert r.status_code == 200 and r.json()["city_code"] == HANOI
    r = requests.get(url, params={"city": "zz"},
                     headers={"Authorization": f"Bearer {with_kpi.token}"}, timeout=10)
    assert r.status_code == 404 and "zz" in r.json()["error"]
    # The operator's admin token reads it too.
    r = requests.get(url, headers={"Authorization": f"Bearer {gw.token}"}, timeout=10)
    assert r.status_code == 200
    gw.wait_metric("citygw_api_auth_failures_total", failures0 + 3, api="http")
    # Revoking the agency revokes its KPI access.
    gw.remove_agency(with_kpi.name)
    r = requests.get(url, headers={"Authorization": f"Bearer {with_kpi.token}"}, timeout=10)
    assert r.status_code == 401
    assert gw.http_get("/healthz").status_code == 200

"""Real time-series stores for the sink tests: VictoriaMetrics and InfluxDB 1.x from Debian, each
one process on a free loopback port with its own temp dirs, plus the `[[sinks]]` config and the
gateway-side status helpers.

- `VictoriaMetrics` (`/usr/bin/victoria-metrics`): accepts InfluxDB line protocol at
  `/api/v2/write` and `/write`; names a series `{measurement}_{field}` with the tags as labels;
  keeps numeric (and boolean, as 0/1) fields only; buffers ingested rows for about a second
  (`/internal/force_flush` makes them searchable); keeps duplicate samples (no dedup unless
  `-dedup.minScrapeInterval` is set), so an at-least-once repeat shows up as a second identical
  sample. Started with `-retentionPeriod=100y`: it silently drops points older than its retention.
  `stop()` (SIGTERM, wait) and `start()` again reuse the same data dir and port.
- `InfluxDB1` (`influxd` from the Debian package `influxdb`, 1.6.x): a generated config with
  every listener (HTTP and the RPC bind-address) on 127.0.0.1 free ports, meta/data/wal dirs
  in the temp dir, reporting disabled, monitoring off; `/write` + `/query`.

Every process is killed in `close()` (the fixtures call it at teardown, failed test or not).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import requests

from . import Gateway, free_port, kill_process, stop_process, tail_file, wait_until

VM_BIN = "/usr/bin/victoria-metrics"


class ServerProcess:
    """A third-party server under test control: start, SIGTERM-and-wait, kill, log tail."""

    name = "server"

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def argv(self) -> list[str]:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0):
        assert not self.running, f"{self.name} already running"
        exe = self.argv()[0]
        assert shutil.which(exe), (f"{exe} not installed (tests/run installs the Debian packages "
                                   f"victoria-metrics and influxdb)")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n----- start #{self.starts}: {' '.join(self.argv())} -----\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, cwd=self.workdir)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} while "
                                     f"starting:\n{self.log_tail()}")
            try:
                return self.healthy()
            except requests.RequestException:
                return False

        wait_until(up, timeout, interval=0.05, desc=f"{self.name} healthy")
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit (the port and the data dir are free afterwards)."""
        return stop_process(self.proc, self.name, timeout)

    def close(self) -> None:
        kill_process(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        return tail_file(self.log_path, lines)


class VictoriaMetrics(ServerProcess):
    name = "victoria-metrics"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.data_dir = self.workdir / "vm-data"
        self.port = free_port("127.0.0.1")       # kept across stop()/start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [VM_BIN, "-retentionPeriod=100y", f"-httpListenAddr=127.0.0.1:{self.port}",
                f"-storageDataPath={self.data_dir}", "-loggerLevel=WARN"]

    def healthy(self) -> bool:
        return requests.get(self.url + "/health", timeout=2).status_code == 200

    def flush(self) -> None:
        r = requests.get(self.url + "/internal/force_flush", timeout=10)
        assert r.status_code == 200, f"force_flush -> {r.status_code} {r.text[:200]}"

    def export(self, match: str) -> list[dict]:
        """Series matching a selector, as `/api/v1/export` prints them (one JSON object per
        series: "metric" labels incl. __name__, "values", "timestamps" in ms). Flushes first."""
        self.flush()
        r = requests.get(self.url + "/api/v1/export", params={"match[]": match}, timeout=30)
        assert r.status_code == 200, f"export {match} -> {r.status_code} {r.text[:300]}"
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]

    def samples(self, match: str) -> list[tuple[dict, int, float]]:
        """Every sample (labels, timestamp ms, value) of the matching series, duplicates kept."""
        out = []
        for s in self.export(match):
            for ts, v in zip(s["timestamps"], s["values"]):
                out.append((s["metric"], ts, v))
        return out

    def wait_samples(self, match: str, at_least: int, timeout: float = 20.0) -> list[tuple[dict, int, float]]:
        """Samples once at least `at_least` distinct (labels, timestamp) points are there."""
        seen: list[int] = [0]

        def enough():
            s = self.samples(match)
            seen[0] = len({(frozenset(m.items()), ts) for m, ts, _ in s})
            return s if seen[0] >= at_least else None

        try:
            return wait_until(enough, timeout, interval=0.2,
                              desc=f"{at_least} points matching {match} in VictoriaMetrics")
        except AssertionError as e:
            raise AssertionError(f"{e}; distinct points seen: {seen[0]}") from None


def vm_name(measurement: str, field: str = "value") -> str:
    """The series name VictoriaMetrics gives a line-protocol field."""
    return f"{measurement}_{field}"


def vm_selector(name: str, **labels: str) -> str:
    """`{__name__="...",k="v"}` with PromQL string escaping (names may hold spaces, commas...)."""
    parts = [f"__name__={json.dumps(name, ensure_ascii=False)}"]
    parts += [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in labels.items()]
    return "{" + ",".join(parts) + "}"


class InfluxDB1(ServerProcess):
    name = "influxd"

    def __init__(self, workdir: Path, auth: tuple[str, str] | None = None):
        super().__init__(workdir)
        self.port = free_port("127.0.0.1")
        self.rpc_port = free_port("127.0.0.1")
        self.auth = auth                   # (admin user, password): auth-enabled = true
        self.config_path = self.workdir / "influxdb.conf"
        d = self.workdir
        self.config_path.write_text(f"""\
reporting-disabled = true
bind-address = "127.0.0.1:{self.rpc_port}"

[meta]
  dir = "{d / 'meta'}"

[data]
  dir = "{d / 'data'}"
  wal-dir = "{d / 'wal'}"
  query-log-enabled = false

[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  auth-enabled = {"true" if auth else "false"}

[monitor]
  store-enabled = false

[subscriber]
  enabled = false

[continuous_queries]
  enabled = false
""")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return ["influxd", "-config", str(self.config_path)]

    def healthy(self) -> bool:
        return requests.get(self.url + "/ping", timeout=2).status_code == 204

    def create_admin(self) -> None:
        """With auth enabled: the first admin user (InfluxDB 1.x allows it without credentials)."""
        user, password = self.auth
        r = requests.post(self.url + "/query", timeout=10, data={
            "q": f"CREATE USER \"{user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES"})
        assert r.status_code == 200 and "error" not in r.text, f"CREATE USER -> {r.text}"

    def execute(self, q: str) -> None:
        """A statement that changes something (POST /query), as the admin when auth is on."""
        r = requests.post(self.url + "/query", data={"q": q}, timeout=10, auth=self.auth)
        assert r.status_code == 200 and "error" not in r.text, f"{q} -> {r.status_code} {r.text}"

    def create_database(self, db: str) -> None:
        self.execute(f'CREATE DATABASE "{db}"')

    def query(self, q: str, db: str = "citygw") -> list[dict]:
        """Series of the first statement's result: [{"name", "tags", "columns", "values"}];
        times as epoch ms."""
        r = requests.get(self.url + "/query", params={"db": db, "q": q, "epoch": "ms"}, timeout=30,
                         auth=self.auth)
        assert r.status_code == 200, f"{q} -> {r.status_code} {r.text[:300]}"
        body = r.json()
        assert "error" not in body, f"{q} -> {body}"
        res = body["results"][0]
        assert "error" not in res, f"{q} -> {res}"
        return res.get("series", [])

    def rows(self, q: str, db: str = "citygw") -> list[dict]:
        """Rows of every series as dicts (tags of GROUP BY merged in, "_measurement" added)."""
        out = []
        for s in self.query(q, db):
            for v in s["values"]:
                row = dict(zip(s["columns"], v))
                row.update(s.get("tags") or {})
                row["_measurement"] = s["name"]
                out.append(row)
        return out


class Stores:
    """Starts VictoriaMetrics / InfluxDB 1.x servers in temp dirs; `close()` kills them all."""

    def __init__(self, name: str):
        self.name = name
        self.servers: list[ServerProcess] = []
        self.dirs: list[Path] = []

    def _dir(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix="citygw-tsdb-"))
        self.dirs.append(d)
        return d

    def victoria_metrics(self, start: bool = True) -> VictoriaMetrics:
        vm = VictoriaMetrics(self._dir())
        self.servers.append(vm)
        if start:
            vm.start()
        return vm

    def influxdb1(self, db: str | None = "citygw", auth: tuple[str, str] | None = None) -> InfluxDB1:
        """A running influxd; `db` created unless None; `auth`: (admin, password) with
        auth-enabled."""
        ifx = InfluxDB1(self._dir(), auth=auth)
        self.servers.append(ifx)
        ifx.start()
        if auth:
            ifx.create_admin()
        if db:
            ifx.create_database(db)
        return ifx

    def close(self) -> None:
        for s in self.servers:
            s.close()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# the gateway side


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)        # a JSON string is a valid TOML basic string
    raise TypeError(f"no TOML for {v!r}")


# Short linger and backoff so outages and recoveries take little test time.
FAST = dict(linger_ms=50, backoff_min_ms=50, backoff_max_ms=500, timeout_secs=5)


def sink_toml(name: str, kind: str, url: str, **keys: Any) -> str:
    """One `[[sinks]]` table of the gateway config (the contract of issue 6)."""
    body = {"name": name, "kind": kind, "url": url, **FAST, **keys}
    return "[[sinks]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in body.items())


def vm_sink(vm: VictoriaMetrics, name: str = "vm", **keys: Any) -> str:
    keys = {"org": "city", "bucket": "telemetry", "token": "t0ken", "gzip": True,
            "measurement": "quantity", **keys}
    return sink_toml(name, "influx2", vm.url, **keys)


def influx1_sink(ifx: InfluxDB1, name: str = "influx", db: str = "citygw", **keys: Any) -> str:
    return sink_toml(name, "influx1", ifx.url, db=db, **{"measurement": "quantity", **keys})


def sink_status(gw: Gateway) -> dict[str, dict]:
    """`citygw sink status --output json`, by sink name."""
    out = gw.cli("sink", "status")
    assert isinstance(out, list), out
    return {s["name"]: s for s in out}


def sink_lag(gw: Gateway, sink: str) -> float:
    return gw.metric("citygw_sink_lag_readings", sink=sink)


def wait_drained(gw: Gateway, sink: str, timeout: float = 30.0) -> None:
    """The sink's lag is 0 in both the metric and `citygw sink status` (the metric is refreshed
    by the gateway's housekeeping every few seconds)."""
    def drained():
        m = gw.metrics()
        if not m.has("citygw_sink_lag_readings", sink=sink):
            return False
        st = sink_status(gw)[sink]
        return m.value("citygw_sink_lag_readings", sink=sink) == 0 and st["lag_readings"] == 0

    wait_until(drained, timeout, interval=0.2,
               desc=f"citygw_sink_lag_readings{{sink={sink!r}}} == 0 and sink status lag 0")


# --------------------------------------------------------------------------------------------
# what a published reading should look like in the store (the documented mapping)

# name sent by the device -> (canonical quantity, default unit): the rows of the gateway's
# quantity table the sink tests use; anything else passes through as sent, with no unit.
QUANTITIES = {
    "temp": ("temperature", "Cel"),
    "temperature": ("temperature", "Cel"),
    "hum": ("humidity", "%RH"),
    "pm25": ("pm2_5", "ug/m3"),
    "vehicles": ("vehicle_count", "count"),
    "vehicle_count": ("vehicle_count", "count"),
    "level": ("water_level", "m"),
    "lamp_state": ("lamp_state", ""),
}
RESERVED = {"ts", "seq", "lat", "lon", "alt"}


def expected_points(device, records: list[dict]) -> list[dict]:
    """One expected point per published value: measurement (canonical quantity), the tag set
    (device, tenant, kind, protocol, commune and unit only when set), device time in ms, value
    and seq. `device` is a support.Device (its registry record gives tenant, kind, commune)."""
    rec = device.record
    base = {"device": device.id, "tenant": rec["tenant"], "kind": rec["kind"], "protocol": "mqtt"}
    commune = rec.get("commune_code") or rec.get("commune") or ""
    if commune:
        base["commune"] = commune
    out = []
    for r in records:
        for k, v in r.items():
            if k in RESERVED:
                continue
            unit = ""
            if isinstance(v, dict):
                v, unit = v["value"], v.get("unit", "")
            name, default_unit = QUANTITIES.get(k, (k.strip(), ""))
            unit = unit.strip() or default_unit
            labels = dict(base)
            if unit:
                labels["unit"] = unit
            out.append({"device": device.id, "measurement": name, "labels": labels,
                        "ts": r["ts"], "value": v, "seq": r.get("seq")})
    return out


def vm_index(samples: list[tuple[dict, int, float]], field: str) -> dict[tuple, list[tuple[dict, float]]]:
    """(measurement, device, ts ms) -> [(labels without __name__, value)] for one field."""
    idx: dict[tuple, list[tuple[dict, float]]] = {}
    suffix = "_" + field
    for m, ts, v in samples:
        name = m.get("__name__", "")
        if not name.endswith(suffix):
            continue
        labels = {k: x for k, x in m.items() if k != "__name__"}
        idx.setdefault((name[: -len(suffix)], labels.get("device"), ts), []).append((labels, v))
    return idx


def _same(got: float, want: Any) -> bool:
    if isinstance(want, bool):
        return got == (1 if want else 0)
    if isinstance(want, int):
        return got == want
    return abs(got - want) <= 1e-9 * max(1.0, abs(want))


def compare_vm(samples: list[tuple[dict, int, float]], expected: list[dict],
               allow_duplicates: bool = False) -> int:
    """Compare VictoriaMetrics samples with expected points one by one: each expected point is
    there as `{measurement}_value` (and `{measurement}_seq` when it had a seq) with exactly the
    expected labels, timestamp and value; the expected devices have no other points. Identical
    repeats (at-least-once) are allowed only with `allow_duplicates`; a repeat with another value
    never is. Returns the number of duplicate samples. Fails listing the first differences."""
    values, seqs = vm_index(samples, "value"), vm_index(samples, "seq")
    devices = {p["device"] for p in expected}
    problems: list[str] = []
    dups = 0
    want_keys = set()
    for p in expected:
        key = (p["measurement"], p["device"], p["ts"])
        want_keys.add(key)
        got = values.get(key)
        if not got:
            problems.append(f"missing {vm_name(p['measurement'])} {p['device']} @{p['ts']} "
                            f"(value {p['value']!r})")
            continue
        dups += len(got) - 1
        if len(got) > 1 and not allow_duplicates:
            problems.append(f"{key}: {len(got)} samples {got}")
        for labels, v in got:
            if labels != p["labels"]:
                problems.append(f"{key}: labels {labels}, want {p['labels']}")
            if not _same(v, p["value"]):
                problems.append(f"{key}: value {v!r}, want {p['value']!r}")
        sg = seqs.get(key)
        if p["seq"] is None:
            if sg:
                problems.append(f"{key}: a seq {sg} although the payload had none")
        elif not sg:
            problems.append(f"{key}: no {vm_name(p['measurement'], 'seq')} sample (seq {p['seq']})")
        else:
            for labels, v in sg:
                if v != p["seq"] or labels != p["labels"]:
                    problems.append(f"{key}: seq sample {labels} {v}, want seq {p['seq']}")
    extra = [k for k in values if k[1] in devices and k not in want_keys]
    if extra:
        problems.append(f"{len(extra)} unexpected points, e.g. {sorted(extra, key=str)[:5]}")
    assert not problems, (f"{len(problems)} differences between VictoriaMetrics and what was "
                          f"published ({len(expected)} points):\n  " + "\n  ".join(problems[:25]))
    return dups


def influx_ident(name: str) -> str:
    """An InfluxQL double-quoted identifier."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def influx_points(ifx: InfluxDB1, measurements: set[str], db: str = "citygw") -> dict[tuple, list[dict]]:
    """(measurement, device, time ms) -> rows (fields and tags) of those measurements."""
    idx: dict[tuple, list[dict]] = {}
    for m in sorted(measurements):
        for row in ifx.rows(f"SELECT * FROM {influx_ident(m)} GROUP BY *", db):
            idx.setdefault((m, row.get("device"), row["time"]), []).append(row)
    return idx


TAGS = ("commune", "device", "kind", "protocol", "tenant", "unit")


def compare_influx(ifx: InfluxDB1, expected: list[dict], db: str = "citygw") -> None:
    """Every expected point is in InfluxDB 1.x once, with exactly the expected tags, its device
    time (ms), value (type included: an int stays an int, a bool a bool, text text) and seq; the
    expected devices have no other points in those measurements."""
    got = influx_points(ifx, {p["measurement"] for p in expected}, db)
    devices = {p["device"] for p in expected}
    problems: list[str] = []
    keys = set()
    for p in expected:
        key = (p["measurement"], p["device"], p["ts"])
        keys.add(key)
        rows = got.get(key)
        if not rows:
            problems.append(f"missing {key} (value {p['value']!r})")
            continue
        if len(rows) > 1:
            problems.append(f"{key}: {len(rows)} rows {rows}")
        row = rows[0]
        tags = {k: row[k] for k in TAGS if row.get(k) not in (None, "")}
        if tags != p["labels"]:
            problems.append(f"{key}: tags {tags}, want {p['labels']}")
        v, want = row.get("value"), p["value"]
        same_type = (type(v) is type(want)) or (isinstance(want, float) and isinstance(v, (int, float))
                                               and not isinstance(v, bool))
        if not same_type or (v != want if not isinstance(want, float) else abs(v - want) > 1e-9 * max(1, abs(want))):
            problems.append(f"{key}: value {v!r}, want {want!r}")
        if row.get("seq") != p["seq"]:
            problems.append(f"{key}: seq {row.get('seq')!r}, want {p['seq']!r}")
        extra_fields = set(row) - set(TAGS) - {"time", "value", "seq", "_measurement"}
        if extra_fields:
            problems.append(f"{key}: unexpected columns {sorted(extra_fields)} in {row}")
    extra = [k for k in got if k[1] in devices and k not in keys]
    if extra:
        problems.append(f"{len(extra)} unexpected points, e.g. {sorted(extra, key=str)[:5]}")
    assert not problems, (f"{len(problems)} differences between InfluxDB and what was published "
                          f"({len(expected)} points):\n  " + "\n  ".join(problems[:25]))


def influx_field_types(ifx: InfluxDB1, db: str = "citygw") -> dict[str, dict[str, str]]:
    """measurement -> {field: type} from SHOW FIELD KEYS."""
    return {s["name"]: {k: t for k, t in s["values"]} for s in ifx.query("SHOW FIELD KEYS", db)}

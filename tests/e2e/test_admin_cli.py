"""The operator's CLI against the running gateway's admin API: provisioning, bulk import,
disable/enable (which cuts a live MQTT session), readings and dead-letter queries, the admin
token, and `config print`.
"""

from __future__ import annotations

import csv
import json
import subprocess
import tomllib

import pytest

from support import (CITYGW_BIN, Device, Gateway, connack_of, now_ms, rfc3339_ms, unique_id,
                     wait_until)


def test_add_show_list(gw: Gateway):
    tenant = unique_id("tenant")
    t0 = now_ms()
    a = gw.add_device(tenant=tenant, kind="air_quality", commune="00004", lat=21.0285,
                      lon=105.8542, name="Hoan Kiem AQ 1")
    b = gw.add_device(tenant=tenant, kind="water_level")
    t1 = now_ms()
    assert len(a.secret) >= 16, "a generated secret should be long enough to be a secret"
    assert a.secret != b.secret
    ra = a.record
    assert (ra["id"], ra["tenant"], ra["kind"], ra["commune_code"], ra["name"]) == (
        a.id, tenant, "air_quality", "00004", "Hoan Kiem AQ 1")
    assert ra["lat"] == pytest.approx(21.0285) and ra["lon"] == pytest.approx(105.8542)
    assert ra["enabled"] is True and ra["online"] is False
    assert t0 - 1000 <= ra["created_time_ms"] <= t1 + 1000
    assert not ra["last_seen_time_ms"]
    assert "secret" not in ra and not any("hash" in k for k in ra), "no credentials in Device"
    rb = b.record
    assert rb["lat"] is None and rb["lon"] is None, rb
    assert rb["commune_code"] in ("", None)

    shown = gw.cli("device", "show", a.id)
    assert {k: shown[k] for k in ("id", "tenant", "kind", "commune_code", "lat", "lon", "enabled",
                                  "created_time_ms", "name")} == \
        {k: ra[k] for k in ("id", "tenant", "kind", "commune_code", "lat", "lon", "enabled",
                            "created_time_ms", "name")}

    listed = gw.cli("device", "list", "--tenant", tenant)
    assert sorted(d["id"] for d in listed) == sorted([a.id, b.id])
    assert [d["id"] for d in gw.cli("device", "list", "--tenant", tenant,
                                     "--kind", "water_level")] == [b.id]
    everything = {d["id"] for d in gw.cli("device", "list")}
    assert {a.id, b.id} <= everything


def test_show_unknown_device_fails(gw: Gateway):
    p = gw.cli_raw("device", "show", unique_id("nope"))
    assert p.returncode != 0
    msg = (p.stdout + p.stderr).lower()
    assert "not found" in msg or "notfound" in msg, p.stderr


def test_human_table_is_default_output(gw: Gateway):
    d = gw.add_device(tenant=unique_id("tbl"))
    p = gw.cli_raw("device", "list", "--tenant", d.record["tenant"], output_json=False)
    assert p.returncode == 0, p.stderr
    assert d.id in p.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(p.stdout)


def test_given_secret_is_the_credential(gw: Gateway):
    d = gw.add_device(secret="s3cret-Street-Light-42")
    assert d.secret == "s3cret-Street-Light-42"
    assert connack_of(gw, 5, d.id, d.id, "s3cret-Street-Light-42") == 0
    assert connack_of(gw, 5, d.id, d.id, "s3cret-Street-Light-43") == 0x86


def test_online_and_last_seen(gw: Gateway):
    d = gw.add_device()
    t0 = now_ms()
    with gw.connected_client(d, version=311) as c:
        wait_until(lambda: gw.cli("device", "show", d.id)["online"] is True, 10,
                   desc="device shown online while connected")
        assert c.publish(d.topic, json.dumps({"temperature": 20.0})) == 0
        wait_until(lambda: (gw.cli("device", "show", d.id)["last_seen_time_ms"] or 0) >= t0, 10,
                   desc="last_seen_time_ms updated by the accepted reading")
    wait_until(lambda: gw.cli("device", "show", d.id)["online"] is False, 10,
               desc="device shown offline after disconnect")


def test_disable_disconnects_live_session_and_refuses_reconnect(gw: Gateway):
    d = gw.add_device(kind="street_light")
    with gw.connected_client(d, version=311) as c:
        assert c.publish(d.topic, json.dumps({"lamp_on": True})) == 0
        out = gw.cli("device", "disable", d.id)
        assert out["id"] == d.id and out["enabled"] is False
        assert c.wait_disconnected(10), "disabling must disconnect the live MQTT session"
    assert gw.cli("device", "show", d.id)["enabled"] is False
    assert connack_of(gw, 311, d.id, d.id, d.secret) == 0x05
    assert connack_of(gw, 5, d.id, d.id, d.secret) == 0x87

    out = gw.cli("device", "enable", d.id)
    assert out["enabled"] is True
    with gw.connected_client(d, version=5) as c:
        assert c.publish(d.topic, json.dumps({"lamp_on": False})) == 0
    assert [r["value"] for r in gw.readings(d.id)] == [True, False]


def test_disable_disconnects_mqtt5_session(gw: Gateway):
    d = gw.add_device()
    with gw.connected_client(d, version=5) as c:
        gw.cli("device", "disable", d.id)
        assert c.wait_disconnected(10), "disabling must disconnect the live MQTT 5 session"


def test_import_csv(gw: Gateway, tmp_path):
    tenant = unique_id("imp")
    ids = [unique_id("imp") for _ in range(4)]
    f = tmp_path / "devices.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "tenant", "kind", "commune_code", "lat", "lon", "name", "secret"])
        w.writerow([ids[0], tenant, "air_quality", "00004", "21.03", "105.85", "AQ one", ""])
        w.writerow([ids[1], tenant, "flood", "", "", "", "", "given-secret-123456"])
        w.writerow([ids[2], tenant, "energy_meter", "26734", "10.77", "106.70", "Meter", ""])
        w.writerow([ids[0], tenant, "air_quality", "", "", "", "", ""])   # duplicate id
        w.writerow(["", tenant, "noise", "", "", "", "", ""])                # missing id
    secrets_out = tmp_path / "secrets.csv"
    # rows fail on their own; the CLI may exit non-zero to flag the partial failure, but its JSON
    # still reports every row
    p = gw.cli_raw("device", "import", str(f), "--secrets-out", str(secrets_out))
    res = json.loads(p.stdout)
    assert [r["ok"] for r in res] == [True, True, True, False, False], res
    for r in res[:3]:
        assert r["secret"], r
        assert not r["error"], r
    assert res[1]["secret"] == "given-secret-123456"
    assert res[3]["device_id"] == ids[0] and res[3]["error"], res[3]
    assert res[4]["error"], res[4]

    with secrets_out.open(newline="") as fh:
        rows = list(csv.reader(fh))
    if rows and rows[0] == ["id", "secret"]:
        rows = rows[1:]
    secrets = dict(rows)
    assert secrets == {r["device_id"]: r["secret"] for r in res[:3]}

    listed = {d["id"]: d for d in gw.cli("device", "list", "--tenant", tenant)}
    assert sorted(listed) == sorted(ids[:3])
    assert listed[ids[0]]["lat"] == pytest.approx(21.03) and listed[ids[1]]["lat"] is None
    assert listed[ids[2]]["commune_code"] == "26734" and listed[ids[2]]["kind"] == "energy_meter"

    # an imported device connects with the secret from --secrets-out
    dev = Device(listed[ids[2]], secrets[ids[2]])
    with gw.connected_client(dev, version=311) as c:
        assert c.publish(dev.topic, json.dumps({"energy": 12.5})) == 0
    (r,) = gw.readings(dev.id)
    assert (r["quantity"], r["value"], r["commune_code"]) == ("energy", 12.5, "26734")


def test_bad_token_is_refused(gw: Gateway):
    new_id = unique_id("refused")
    for args in (("device", "list"), ("device", "add", new_id, "--tenant", "t",
                                      "--kind", "generic"), ("readings", "whatever")):
        p = gw.cli_raw(*args, token="not-the-admin-token")
        assert p.returncode != 0, args
        assert "unauthenticated" in (p.stdout + p.stderr).lower(), (args, p.stderr)
    p = gw.cli_raw("device", "list", token="")
    assert p.returncode != 0
    # nothing was added by the refused call
    assert new_id not in {d["id"] for d in gw.cli("device", "list")}


def test_server_and_token_from_environment(gw: Gateway):
    d = gw.add_device()
    p = gw.cli_raw("device", "show", d.id, use_flags=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["id"] == d.id
    p = gw.cli_raw("device", "show", d.id, use_flags=False, token="wrong")
    assert p.returncode != 0 and "unauthenticated" in (p.stdout + p.stderr).lower()


def test_readings_time_range_and_limit(gw: Gateway):
    d = gw.add_device()
    base = now_ms() - 600_000
    with gw.connected_client(d, version=5) as c:
        for i in range(5):
            assert c.publish(d.topic, json.dumps({"ts": base + i * 1000, "temperature": 20 + i})) == 0
    allr = gw.readings(d.id)
    assert [r["device_time_ms"] for r in allr] == [base + i * 1000 for i in range(5)]
    mid = gw.cli("readings", d.id, "--from", str(base + 1000), "--to", str(base + 3000))
    assert [r["value"] for r in mid] == [21, 22, 23]
    rfc = gw.cli("readings", d.id, "--from", rfc3339_ms(base + 3000),
                 "--to", rfc3339_ms(base + 10_000, 7))
    assert [r["value"] for r in rfc] == [23, 24]
    lim = gw.cli("readings", d.id, "--limit", "2")
    assert [r["value"] for r in lim] == [20, 21]
    assert gw.cli("readings", d.id, "--from", str(base + 5000)) == []


def test_deadletter_list_filters(gw: Gateway):
    a, b = gw.add_device(), gw.add_device()
    with gw.connected_client(a, version=311) as c:
        assert c.publish(a.topic, b"{oops") == 0
        assert c.publish(a.topic + "/xml", b"<x/>") == 0
    with gw.connected_client(b, version=311) as c:
        assert c.publish(b.topic, b'{"temperature": NaN}') == 0
    la = gw.deadletters(a.id)
    assert sorted(x["reason"] for x in la) == ["malformed_json", "unknown_format"]
    assert all(x["device_id"] == a.id for x in la)
    lb = gw.deadletters(b.id)
    assert [(x["reason"], x["address"]) for x in lb] == [("non_finite_value", b.topic)]
    assert len(gw.cli("deadletter", "list", "--device", a.id, "--limit", "1")) == 1
    everyone = {x["device_id"] for x in gw.cli("deadletter", "list", "--limit", "10000")}
    assert {a.id, b.id} <= everyone
    ids = [x["id"] for x in la]
    assert len(set(ids)) == len(ids)


def test_config_print_reflects_env_override(gw: Gateway):
    env = gw.env()
    env["CITYGW_MQTT__MAX_PAYLOAD_BYTES"] = "123456"
    p = subprocess.run([str(CITYGW_BIN), "config", "print"], env=env, capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    cfg = tomllib.loads(p.stdout)
    assert cfg["mqtt"]["max_payload_bytes"] == 123456
    assert cfg["mqtt"]["listen"] == gw.mqtt_listen
    assert cfg["http"]["listen"] == env["CITYGW_HTTP__LISTEN"]

    env.pop("CITYGW_MQTT__MAX_PAYLOAD_BYTES")
    p = subprocess.run([str(CITYGW_BIN), "config", "print"], env=env, capture_output=True,
                       text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    assert tomllib.loads(p.stdout)["mqtt"]["max_payload_bytes"] == 262144, "the default"

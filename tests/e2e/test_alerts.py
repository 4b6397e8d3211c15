"""Alert rules over real readings: paho-mqtt devices publish, the gateway's rules (configured in
`[[rules]]`) raise and clear alerts with ThingsBoard's lifecycle, kept durably (kill -9), listed
by the Control API (grpcio) and the CLI, streamed by WatchAlerts within an agency's scope; a
rule's action sends exactly one command (cool-down) to the street lights of the commune, which a
paho device receives.
"""

from __future__ import annotations

import json

import grpc
import pytest

from support import Gateway, wait_until
from support.control import Watch
from support.telemetry import rpc_error

CONFIG = """
[[rules]]
name = "flood"
device = "al-hyst"
quantity = "water_level"
above = 2.5
clear = 2.3
severity = "critical"

[[rules]]
name = "flood-held"
device = "al-hold"
quantity = "water_level"
above = 2.5
for = "2s"

[[rules]]
name = "silent"
device = "al-silent"
silent_for = "2s"
severity = "minor"

[[rules]]
name = "dark"
commune = "00008"
kind = "weather"
quantity = "illuminance"
below = 30
clear = 50
severity = "warning"
action = { command = "light", params = { on = true }, target_kind = "street_light", cooldown = "1h" }
"""


@pytest.fixture(scope="module")
def gw(module_gateways) -> Gateway:
    return module_gateways(config_toml=CONFIG)


def publish(client, device, body: dict) -> None:
    assert client.publish(device.topic, json.dumps(body)) == 0


def alerts(admin, **kw):
    pb = admin.pb
    req = pb.ListAlertsRequest(**kw)
    return list(admin.stub.ListAlerts(req, metadata=admin.metadata, timeout=10).alerts)


def alert_state(admin, a) -> str:
    return admin.pb.AlertState.Name(a.state).removeprefix("ALERT_STATE_")


def test_threshold_with_hysteresis_fires_once_and_clears_once(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device("al-hyst", kind="water_level")
    seen = Watch(admin.stub.WatchAlerts(admin.pb.WatchAlertsRequest(device_ids=[d.id]),
                                        metadata=admin.metadata))
    with gw.connected_client(d) as dev:
        # crosses 2.5 back and forth; only 2.2 (below the clear level 2.3) clears
        for v in (2.0, 2.6, 2.4, 2.6, 2.45, 2.7, 2.2, 2.4):
            publish(dev, d, {"water_level": v})
        items = seen.wait_for(lambda xs: any(alert_state(admin, x) == "CLEARED_UNACK" for x in xs))
    seen.cancel()
    got = alerts(admin, device_id=d.id)
    assert len(got) == 1, got
    a = got[0]
    assert a.rule == "flood" and alert_state(admin, a) == "CLEARED_UNACK", a
    assert a.severity == admin.pb.SEVERITY_CRITICAL and a.value == 2.6, a
    assert a.message == "water_level 2.6 > 2.5", a
    assert [alert_state(admin, e) for e in a.history] == ["ACTIVE_UNACK", "CLEARED_UNACK"]
    assert [e.by for e in a.history] == ["rule:flood", "rule:flood"]
    assert [alert_state(admin, x) for x in items] == ["ACTIVE_UNACK", "CLEARED_UNACK"]
    assert gw.metric("citygw_alerts_raised_total", rule="flood", severity="critical") == 1
    assert gw.metric("citygw_alerts_cleared_total", rule="flood", severity="critical",
                     by="rule") == 1

    # acknowledged afterwards: CLEARED_ACK, with who and when; the CLI reads the same record
    acked = gw.cli("alert", "ack", a.id)
    assert acked["state"] == "CLEARED_ACK" and acked["acked_by"] == "admin", acked
    listed = gw.cli("alert", "list", "--device", d.id)
    assert [(x["id"], x["state"]) for x in listed] == [(a.id, "CLEARED_ACK")]
    rules = {r["name"]: r for r in gw.cli("rule", "list")}
    assert rules["flood"]["description"] == "water_level > 2.5, clear below 2.3", rules
    assert rules["dark"]["action_command"] == "light", rules


def test_duration_and_active_alert_survive_kill9(gw: Gateway, control):
    """A threshold that must hold 2 s: the reading is acknowledged, the gateway is killed
    before the 2 s pass; after the restart the duration completes without a new reading. The
    active alert stays active across a second kill -9 (not raised twice), and ack and clear are
    independent."""
    # No gRPC channel is open while the test process spawns the gateway: grpcio's fork handlers
    # can abort the child between fork and exec.
    d = gw.add_device("al-hold", kind="water_level")
    with gw.connected_client(d) as dev:
        publish(dev, d, {"water_level": 2.9})
    gw.kill9()
    gw.restart()
    admin = control(gw)
    raised = wait_until(lambda: alerts(admin, device_id=d.id), timeout=20,
                        desc="the held threshold raised after the restart")
    assert len(raised) == 1 and raised[0].message == "water_level 2.9 > 2.5 for 2s", raised
    a = raised[0]

    admin.close()
    gw.kill9()
    gw.restart()
    admin = control(gw)
    after = alerts(admin, device_id=d.id, active_only=True)
    assert [x.id for x in after] == [a.id], after
    acked = admin.stub.AckAlert(admin.pb.AckAlertRequest(id=a.id), metadata=admin.metadata)
    assert alert_state(admin, acked) == "ACTIVE_ACK"
    with gw.connected_client(d) as dev:
        publish(dev, d, {"water_level": 2.0})
    cleared = wait_until(lambda: (x := alerts(admin, device_id=d.id)[0]) and
                         alert_state(admin, x) == "CLEARED_ACK" and x, timeout=15,
                         desc="the alert cleared by the rule")
    assert cleared.id == a.id and cleared.cleared_by == "rule:flood-held", cleared
    assert len(alerts(admin, device_id=d.id)) == 1


def test_absence_fires_for_a_silent_device_and_clears_when_it_reports(gw: Gateway, control):
    admin = control(gw)
    d = gw.add_device("al-silent", kind="water_level")
    with gw.connected_client(d) as dev:
        publish(dev, d, {"water_level": 1.0})
        silent = wait_until(lambda: alerts(admin, device_id=d.id, active_only=True), timeout=20,
                            desc="absence alert")
        assert silent[0].rule == "silent" and silent[0].message.startswith("device silent for")
        publish(dev, d, {"water_level": 1.1})
        get = admin.stub.GetAlert
        a = wait_until(lambda: (x := get(admin.pb.GetAlertRequest(id=silent[0].id),
                                          metadata=admin.metadata, timeout=10))
                       and alert_state(admin, x) == "CLEARED_UNACK" and x, timeout=15,
                       desc="absence alert cleared by the next reading")
    assert a.cleared_by == "rule:silent" and a.severity == admin.pb.SEVERITY_MINOR, a


def test_action_sends_exactly_one_command_to_the_communes_street_lights(gw: Gateway, control):
    admin = control(gw)
    sensor = gw.add_device("al-lux", kind="weather", commune="00008")
    lamp = gw.add_device("al-lamp", kind="street_light", commune="00008")
    elsewhere = gw.add_device("al-lamp-far", kind="street_light", commune="00004")
    with gw.connected_client(lamp) as light, gw.connected_client(sensor) as s:
        assert light.subscribe(f"devices/{lamp.id}/commands/+") == [1]
        publish(s, sensor, {"illuminance": 12})
        msg = light.wait_message(lambda m: m.topic.startswith(f"devices/{lamp.id}/commands/"))
        body = json.loads(msg.payload)
        assert body["name"] == "light" and body["params"] == {"on": True}, body
        # dark again after clearing: a new alert, but the cool-down (1 h) holds the command back
        publish(s, sensor, {"illuminance": 80})
        wait_until(lambda: not alerts(admin, device_id=sensor.id, active_only=True), timeout=15,
                   desc="dark alert cleared")
        publish(s, sensor, {"illuminance": 10})
        wait_until(lambda: len(alerts(admin, device_id=sensor.id)) == 2, timeout=15,
                   desc="second dark alert")
        gw.wait_metric("citygw_rule_actions_total", 1, rule="dark", outcome="cooldown")
    sent = admin.list(device_id=lamp.id)
    assert len(sent) == 1 and sent[0].created_by == "rule:dark", sent
    assert admin.list(device_id=elsewhere.id) == []
    first = alerts(admin, device_id=sensor.id)[-1]
    assert list(first.command_ids) == [sent[0].id], first


def test_agency_scope_and_control_permission(gw: Gateway, control):
    """Every alert so far is tenant hanoi's: an agency of another tenant sees none of them (and
    gets PERMISSION_DENIED for one by id); a hanoi agency sees them but needs `control` to
    acknowledge or clear."""
    admin = control(gw)
    any_alert = next(a for a in alerts(admin) if a.acked_time_ms == 0)
    assert any_alert.tenant == "hanoi", any_alert
    hue = control(gw, gw.add_agency(tenants=["hue"], kinds=["*"]).token)
    assert alerts(hue) == []
    e = rpc_error(lambda: hue.stub.GetAlert(hue.pb.GetAlertRequest(id=any_alert.id),
                                            metadata=hue.metadata, timeout=10))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e
    hanoi = control(gw, gw.add_agency(tenants=["hanoi"], kinds=["*"]).token)
    assert any_alert.id in [a.id for a in alerts(hanoi)]
    e = rpc_error(lambda: hanoi.stub.AckAlert(hanoi.pb.AckAlertRequest(id=any_alert.id),
                                              metadata=hanoi.metadata, timeout=10))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "control" in e.details(), e
    actor = control(gw, gw.add_agency(tenants=["hanoi"], kinds=["*"], control=True).token)
    acked = actor.stub.AckAlert(actor.pb.AckAlertRequest(id=any_alert.id),
                                metadata=actor.metadata, timeout=10)
    assert alert_state(actor, acked).endswith("_ACK") and acked.acked_by.startswith("agency:")


def refused(gw: Gateway, *args: str) -> str:
    """A CLI command that must fail; its error output."""
    proc = gw.cli_raw(*args)
    assert proc.returncode != 0, (args, proc.stdout)
    return proc.stderr


def test_rules_added_at_run_time_raise_survive_kill9_and_stop_when_removed(gw: Gateway, control,
                                                                           tmp_path):
    """`citygw rule add` puts a rule in force at once, checked like a config rule (errors name
    the key); a reading crossing it raises the alert; it survives kill -9 and is still
    evaluated; `rule list` shows both origins; `rule remove` clears its active alert and no
    reading raises one after. Config rules can be neither shadowed nor removed this way, and
    agencies (even with `control`) change no rule."""
    d = gw.add_device("al-runtime", kind="water_level", commune="00004")
    rule = ["rule", "add", "water-high", "--quantity", "water_level", "--above", "2.5"]
    err = refused(gw, *rule, "--clear-below", "2.7")
    assert 'rule "water-high": clear: must be on the safe side' in err, err
    err = refused(gw, *rule, "--for", "5 parsecs")
    assert 'rule "water-high": for' in err, err
    err = refused(gw, "rule", "add", "flood", "--quantity", "water_level", "--above", "3")
    assert 'a rule named "flood" already exists (in the config file)' in err, err
    typo = tmp_path / "typo.toml"
    typo.write_text('[[rules]]\nname = "typo"\nquantity = "water_level"\nabove = 1\nfor_ever = "1m"\n')
    assert "for_ever" in refused(gw, "rule", "add", "--file", str(typo))

    added = gw.cli(*rule, "--clear-below", "2.3", "--severity", "major",
                   "--device", d.id)
    assert [(r["name"], r["origin"], r["added_by"], r["description"]) for r in added] == \
        [("water-high", "api", "admin", "water_level > 2.5, clear below 2.3")], added
    assert "already exists (added at run time)" in refused(gw, *rule)
    more = tmp_path / "rules.toml"
    more.write_text('[[rules]]\nname = "runtime-quiet"\ndevice = "al-runtime"\n'
                    'silent_for = "1h"\nseverity = "warning"\n')
    assert [r["name"] for r in gw.cli("rule", "add", "--file", str(more))] == ["runtime-quiet"]

    admin = control(gw)
    with gw.connected_client(d) as dev:
        publish(dev, d, {"water_level": 2.9})
    raised = wait_until(lambda: alerts(admin, device_id=d.id, active_only=True), timeout=15,
                        desc="the rule added at run time raised an alert")
    assert [(a.rule, a.severity) for a in raised] == [("water-high", admin.pb.SEVERITY_MAJOR)]
    agency = control(gw, gw.add_agency(tenants=["hanoi"], kinds=["*"], control=True).token)
    for call in (lambda: agency.stub.AddRule(agency.pb.AddRuleRequest(
                     definition='name = "x"\nquantity = "water_level"\nabove = 1'),
                     metadata=agency.metadata, timeout=10),
                 lambda: agency.stub.RemoveRule(agency.pb.RemoveRuleRequest(name="water-high"),
                                                metadata=agency.metadata, timeout=10)):
        e = rpc_error(call)
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in e.details(), e
    # No gRPC channel is open while the test process spawns the gateway (grpcio's fork handlers).
    admin.close()
    agency.close()

    gw.kill9()
    gw.restart()
    listed = {r["name"]: r for r in gw.cli("rule", "list")}
    assert listed["flood"]["origin"] == "config" and listed["flood"]["added_by"] == ""
    assert (listed["water-high"]["origin"], listed["water-high"]["active"]) == ("api", 1), listed
    assert "above = 2.5" in listed["water-high"]["definition"], listed["water-high"]
    assert listed["runtime-quiet"]["origin"] == "api"
    assert gw.metric("citygw_rules", origin="api") == 2
    admin = control(gw)
    with gw.connected_client(d) as dev:
        publish(dev, d, {"water_level": 2.0})
    wait_until(lambda: not alerts(admin, device_id=d.id, active_only=True), timeout=15,
               desc="still evaluated after the restart: the lower reading cleared the alert")
    assert alerts(admin, device_id=d.id)[0].cleared_by == "rule:water-high"

    assert "config file" in refused(gw, "rule", "remove", "flood")
    assert "not found" in refused(gw, "rule", "remove", "no-such-rule")
    with gw.connected_client(d) as dev:
        publish(dev, d, {"water_level": 2.8})
    active = wait_until(lambda: alerts(admin, device_id=d.id, active_only=True), timeout=15,
                        desc="raised again")
    assert gw.cli("rule", "remove", "water-high") == {"removed": "water-high",
                                                      "alerts_cleared": 1}
    cleared = admin.stub.GetAlert(admin.pb.GetAlertRequest(id=active[0].id),
                                  metadata=admin.metadata, timeout=10)
    assert (alert_state(admin, cleared), cleared.cleared_by) == ("CLEARED_UNACK", "admin")
    assert cleared.history[-1].detail == 'rule "water-high" removed', cleared.history
    evaluated = gw.metric("citygw_rules_readings_evaluated_total")
    with gw.connected_client(d) as dev:
        publish(dev, d, {"water_level": 3.5})
    gw.wait_metric("citygw_rules_readings_evaluated_total", evaluated + 1)
    assert len(alerts(admin, device_id=d.id)) == 2, "no alert after the rule was removed"
    assert "water-high" not in {r["name"] for r in gw.cli("rule", "list")}
    gw.cli("rule", "remove", "runtime-quiet")

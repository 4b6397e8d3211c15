use super::config::{compile_all, ActionConfig, Condition, Rule, RuleConfig};
use super::eval::{on_reading, on_tick, Event, Track};

fn threshold(above: f64, clear: Option<f64>, hold: &str) -> Rule {
    RuleConfig {
        name: "flood".into(),
        quantity: "water_level".into(),
        above: Some(above),
        clear,
        for_: hold.into(),
        severity: "critical".into(),
        ..Default::default()
    }
    .compile()
    .unwrap()
}

/// Feeds values one second apart; returns "R" for a raise, "C" for a clear, "." otherwise.
fn run(rule: &Rule, values: &[f64]) -> String {
    let mut track = Track::default();
    let mut out = String::new();
    for (n, v) in values.iter().enumerate() {
        let t = 1_000_000 + n as i64 * 1000;
        let step = on_reading(rule, &mut track, *v, t);
        out.push(match step.event {
            Some(Event::Raise { .. }) => {
                track.active = Some(("a".into(), t));
                'R'
            }
            Some(Event::Clear { .. }) => {
                track.active = None;
                'C'
            }
            None => '.',
        });
    }
    out
}

#[test]
fn hysteresis_fires_once_and_clears_once_for_a_flapping_value() {
    let rule = threshold(2.5, Some(2.3), "");
    // Crosses 2.5 back and forth; only going below 2.3 clears.
    assert_eq!(
        run(&rule, &[2.0, 2.6, 2.4, 2.6, 2.45, 2.7, 2.2, 2.4]),
        ".R....C."
    );
    // Without hysteresis every crossing counts.
    let plain = threshold(2.5, None, "");
    assert_eq!(run(&plain, &[2.0, 2.6, 2.4, 2.6]), ".RCR");
    // The threshold itself does not raise (strictly above).
    assert_eq!(run(&plain, &[2.5, 2.5]), "..");
}

#[test]
fn duration_needs_the_condition_to_hold_throughout() {
    let rule = threshold(2.5, Some(2.3), "3s");
    // Above for 2 s, then back: nothing. Above from t=4 s: raised at t=7 s (3 s held).
    assert_eq!(
        run(&rule, &[2.6, 2.7, 2.8, 2.4, 2.6, 2.6, 2.6, 2.6, 2.6]),
        ".......R."
    );
}

#[test]
fn duration_completes_on_the_timer_without_a_new_reading() {
    let rule = threshold(2.5, None, "5m");
    let mut track = Track::default();
    let step = on_reading(&rule, &mut track, 2.9, 0);
    assert!(step.pending_changed && step.event.is_none());
    assert_eq!(track.pending, Some((0, 2.9)));
    assert_eq!(on_tick(&rule, &mut track, 299_999, 0).event, None);
    let step = on_tick(&rule, &mut track, 300_000, 0);
    match step.event {
        Some(Event::Raise { value, message }) => {
            assert_eq!(value, 2.9);
            assert_eq!(message, "water_level 2.9 > 2.5 for 5m");
        }
        other => panic!("expected a raise, got {other:?}"),
    }
    assert!(step.pending_changed && track.pending.is_none());
}

#[test]
fn below_rules_mirror_above_rules() {
    let rule = RuleConfig {
        name: "dark".into(),
        quantity: "illuminance".into(),
        below: Some(30.0),
        clear: Some(50.0),
        ..Default::default()
    }
    .compile()
    .unwrap();
    assert_eq!(run(&rule, &[100.0, 20.0, 40.0, 25.0, 60.0]), ".R..C");
}

#[test]
fn a_replayed_reading_older_than_the_alert_cannot_clear_it() {
    let rule = threshold(2.5, None, "");
    let mut track = Track {
        active: Some(("a".into(), 5000)),
        ..Default::default()
    };
    assert_eq!(on_reading(&rule, &mut track, 1.0, 4000).event, None);
    assert!(matches!(
        on_reading(&rule, &mut track, 1.0, 6000).event,
        Some(Event::Clear { .. })
    ));
}

#[test]
fn absence_fires_for_a_silent_device_and_clears_when_it_reports() {
    let rule = RuleConfig {
        name: "silent".into(),
        silent_for: Some("30m".into()),
        ..Default::default()
    }
    .compile()
    .unwrap();
    let mut track = Track::default();
    let seen = 1_000_000;
    assert_eq!(
        on_tick(&rule, &mut track, seen + 1_799_999, seen).event,
        None
    );
    assert!(matches!(
        on_tick(&rule, &mut track, seen + 1_800_000, seen).event,
        Some(Event::Raise { .. })
    ));
    // A device that never reported is not "silent".
    assert_eq!(
        on_tick(&rule, &mut Track::default(), i64::MAX / 2, 0).event,
        None
    );
    track.active = Some(("a".into(), seen + 1_800_000));
    assert_eq!(
        on_tick(&rule, &mut track, seen + 9_000_000, seen).event,
        None
    );
    assert!(matches!(
        on_reading(&rule, &mut track, 0.0, seen + 1_900_000).event,
        Some(Event::Clear { .. })
    ));
}

#[test]
fn rate_of_change_within_the_window() {
    let rule = RuleConfig {
        name: "rising".into(),
        quantity: "water_level".into(),
        rises: Some(0.5),
        within: Some("3s".into()),
        ..Default::default()
    }
    .compile()
    .unwrap();
    // One second apart: 0.6 within 2 s raises; once the 1.0 has left the 3 s window the rise
    // within it is 0.3, and the alert clears.
    assert_eq!(run(&rule, &[1.0, 1.3, 1.6, 1.6, 1.6, 1.6]), "..R.C.");
    // A slow rise (0.3 in 3 s) never raises.
    assert_eq!(run(&rule, &[1.0, 1.1, 1.2, 1.3, 1.4, 1.5]), "......");
}

#[test]
fn config_errors_name_the_rule_and_the_key() {
    let err = |r: RuleConfig| compile_all(&[r]).unwrap_err().to_string();
    let base = RuleConfig {
        name: "r1".into(),
        quantity: "q".into(),
        above: Some(1.0),
        ..Default::default()
    };
    assert!(err(RuleConfig {
        clear: Some(2.0),
        ..base.clone()
    })
    .contains("clear"));
    assert!(err(RuleConfig {
        severity: "urgent".into(),
        ..base.clone()
    })
    .contains("severity"));
    assert!(err(RuleConfig {
        silent_for: Some("1m".into()),
        ..base.clone()
    })
    .contains("exactly one"));
    assert!(err(RuleConfig {
        for_: "5 minutes".into(),
        ..base.clone()
    })
    .contains("for"));
    assert!(err(RuleConfig {
        name: "Has Space".into(),
        ..base.clone()
    })
    .contains("rule name"));
    assert!(err(RuleConfig {
        action: Some(ActionConfig {
            command: "light".into(),
            params: Some(serde_json::json!([1])),
            ..Default::default()
        }),
        ..base.clone()
    })
    .contains("params"));
    let twice = compile_all(&[base.clone(), base.clone()]).unwrap_err();
    assert!(twice.to_string().contains("defined twice"));
    let ok = compile_all(&[base]).unwrap();
    assert_eq!(
        ok[0].condition,
        Condition::Threshold {
            above: true,
            threshold: 1.0,
            clear: 1.0,
            hold_ms: 0
        }
    );
    assert_eq!(ok[0].describe(), "q > 1, clear below 1");
}

/// Retention on a real store, with the clock given as the cutoff: an alert cleared before it
/// goes, an active one stays whatever its age, one cleared recently stays until its turn.
#[tokio::test]
async fn retention_deletes_old_cleared_alerts_and_keeps_active_ones() {
    use super::log::{AlertLog, Batch};
    use crate::proto::{Alert, AlertState};

    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path(), Default::default()).unwrap();
    let log = AlertLog::new(store);
    let day = 86_400_000i64;
    let now = 1000 * day;
    // Ids in raise order, as UUIDv7 ids are.
    let alerts = [
        (
            "01-cleared-long-ago",
            now - 40 * day,
            now - 39 * day,
            AlertState::ClearedAck,
        ),
        ("02-active-long", now - 40 * day, 0, AlertState::ActiveUnack),
        (
            "03-cleared-yesterday",
            now - 35 * day,
            now - day,
            AlertState::ClearedUnack,
        ),
        (
            "04-recent",
            now - 2 * day,
            now - day,
            AlertState::ClearedAck,
        ),
    ];
    let mut batch = Batch::default();
    for (id, raised, cleared, state) in alerts {
        let a = Alert {
            id: id.into(),
            rule: "flood".into(),
            device_id: "wl-1".into(),
            state: state as i32,
            raised_time_ms: raised,
            cleared_time_ms: cleared,
            ..Default::default()
        };
        batch.alert(&a, super::is_active(&a));
    }
    log.save(batch).await.unwrap();

    // 30 days of retention, today.
    assert_eq!(log.expire(now - 30 * day).await.unwrap(), 1);
    assert!(log.get("01-cleared-long-ago").unwrap().is_none());
    for id in ["02-active-long", "03-cleared-yesterday", "04-recent"] {
        assert!(log.get(id).unwrap().is_some(), "{id} kept");
    }
    // A second pass the same day deletes nothing more.
    assert_eq!(log.expire(now - 30 * day).await.unwrap(), 0);
    // Thirty days later the other cleared ones have aged out; the active one still stays.
    assert_eq!(log.expire(now).await.unwrap(), 2);
    let active: Vec<String> = log
        .load_active()
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(active, ["02-active-long"]);
    assert!(log.get("02-active-long").unwrap().is_some());
    assert!(log.get("04-recent").unwrap().is_none());
}

#[test]
fn a_definition_round_trips_through_toml_and_a_typo_is_named() {
    let text = "name = \"dark\"\nquantity = \"illuminance\"\nbelow = 30.0\nfor = \"5m\"\n\
                clear = 50.0\naction = { command = \"light\", params = { on = true }, \
                target_kind = \"street_light\" }\n";
    let cfg = super::parse_definition(text).unwrap();
    // What ListRules shows as the definition is what AddRule takes back.
    let shown = super::definition_text(&cfg);
    let again = super::parse_definition(&shown).unwrap();
    assert_eq!(cfg, again);
    assert_eq!(cfg.compile().unwrap(), again.compile().unwrap());
    assert!(
        !shown.contains("severity"),
        "empty keys are left out: {shown}"
    );
    let e = super::parse_definition("name = \"x\"\nabvoe = 1").unwrap_err();
    assert!(e.to_string().contains("abvoe"), "{e}");
    let e = super::parse_definition(&"#".repeat(super::MAX_DEFINITION + 1)).unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
}

#[test]
fn removing_a_rule_keeps_the_other_rules_indices() {
    use super::{Entry, Origin, RuleSet};
    let mut set = RuleSet::default();
    for (name, quantity) in [("a", "water_level"), ("b", "water_level"), ("c", "noise")] {
        let definition = RuleConfig {
            name: name.into(),
            quantity: quantity.into(),
            above: Some(1.0),
            ..Default::default()
        };
        set.push(Entry {
            rule: definition.compile().unwrap(),
            definition,
            origin: Origin::Config,
        });
    }
    set.remove(1);
    assert_eq!(
        (set.index("a"), set.index("b"), set.index("c")),
        (Some(0), None, Some(2))
    );
    assert!(set.rule(1).is_none());
    assert_eq!(set.by_quantity["water_level"], vec![0]);
    assert_eq!(set.by_quantity["noise"], vec![2]);
    set.remove(0);
    assert!(!set.by_quantity.contains_key("water_level"));
    assert!(!set.is_empty());
    set.remove(2);
    assert!(set.is_empty());
}

//! A simulated street light that takes commands (profile `commands = "lamp"`, scenario
//! `commands = true`): what it understands, how a command changes its next readings, and its
//! answer to the gateway.
//!
//! Commands arrive as citygw sends them over MQTT (`{"id", "name", "params"}`, see the book's
//! "Commands and alerts"):
//!
//! | name    | params                          | effect                                  |
//! |---------|---------------------------------|-----------------------------------------|
//! | `on`    |                                 | lamp on (at its dimmer level)           |
//! | `off`   |                                 | lamp off                                |
//! | `dim`   | `{"level": 0-100}`              | dimmer level; on when above 0           |
//! | `light` | `{"on": bool, "level": 0-100}`  | either or both                          |
//!
//! The answer is `{"status": "ok", "result": {"lamp_state": bool, "dimmer": level}}`, or
//! `{"status": "error", "error": "..."}` for an unknown command or bad params. From the first
//! command on, the lamp no longer follows its daily schedule: its readings report the commanded
//! `lamp_state`, and `power` as the rated power times the dimmer level (0 when off).
//!
//! Over LwM2M the lamp exposes IPSO Light Control `/3311/0` and takes Writes of 5850 (on/off) and
//! 5851 (dimmer), answered 2.04 Changed (4.00 Bad Request with the reason otherwise).
//!
//! Only devices that take commands carry a `Lamp` (boxed, so every other simulated device stays
//! as small as decision 0016 keeps it).

use serde_json::{json, Value as Json};

use crate::scenario::profiles::{Profile, Value};

/// IPSO Light Control (3311) resources a lamp takes Writes of.
pub const LIGHT_CONTROL: u16 = 3311;
const ON_OFF: u16 = 5850;
const DIMMER: u16 = 5851;

pub struct Lamp {
    /// Set by the first command: the schedule no longer applies.
    commanded: Option<State>,
    rated_w: f64,
    /// Packet ids of answers whose PUBACK has not arrived.
    pub answers: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct State {
    on: bool,
    /// Percent, 0-100.
    dimmer: f64,
}

/// What the lamp made of one command: the answer to publish, and whether it was carried out.
pub struct Answer {
    pub payload: Vec<u8>,
    pub ok: bool,
}

impl Lamp {
    /// A lamp of this profile; its rated power is the top of the profile's `power` cycle.
    pub fn new(profile: &Profile) -> Self {
        let rated_w = profile
            .quantities
            .iter()
            .find(|q| q.name == "power")
            .map_or(100.0, |q| (q.mean + q.amplitude.abs()).min(q.max));
        Self {
            commanded: None,
            rated_w,
            answers: Vec::new(),
        }
    }

    /// Carries out one command message (the MQTT payload) and returns the answer.
    pub fn handle(&mut self, message: &[u8]) -> Answer {
        let before = self.commanded.unwrap_or(State {
            on: false,
            dimmer: 100.0,
        });
        match serde_json::from_slice::<Json>(message)
            .map_err(|e| format!("command is not JSON: {e}"))
            .and_then(|m| apply(before, &m))
        {
            Ok(state) => {
                self.commanded = Some(state);
                Answer {
                    payload: json!({"status": "ok", "result": {"lamp_state": state.on, "dimmer": state.dimmer}})
                        .to_string()
                        .into_bytes(),
                    ok: true,
                }
            }
            Err(error) => Answer {
                payload: json!({"status": "error", "error": error})
                    .to_string()
                    .into_bytes(),
                ok: false,
            },
        }
    }

    /// An LwM2M Write of the IPSO Light Control object (/3311/0): resource 5850 on/off (`1`/`0`,
    /// as the plain-text format writes a boolean, or `true`/`false`), 5851 dimmer (0-100). The
    /// dimmer does not switch the lamp (IPSO keeps them apart).
    pub fn write(&mut self, resource: u16, text: &str) -> Result<(), String> {
        let mut state = self.commanded.unwrap_or(State {
            on: false,
            dimmer: 100.0,
        });
        let text = text.trim();
        match resource {
            ON_OFF => {
                state.on = match text {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err(format!("5850 (on/off) takes 1 or 0, not {text:?}")),
                }
            }
            DIMMER => match text.parse::<f64>() {
                Ok(l) if (0.0..=100.0).contains(&l) => state.dimmer = l,
                _ => return Err(format!("5851 (dimmer) takes 0-100, not {text:?}")),
            },
            other => return Err(format!("/3311/0/{other} is not writable")),
        }
        self.commanded = Some(state);
        Ok(())
    }

    /// Overrides the sampled `lamp_state` and `power` with the commanded state, once there is one.
    pub fn apply(&self, values: &mut [(String, Value)]) {
        let Some(state) = self.commanded else {
            return;
        };
        for (name, v) in values.iter_mut() {
            match name.as_str() {
                "lamp_state" => *v = Value::Boolean(state.on),
                "power" if state.on => {
                    *v = Value::Number((self.rated_w * state.dimmer / 10.0).round() / 10.0)
                }
                "power" => *v = Value::Number(0.0),
                _ => {}
            }
        }
    }
}

/// The state after command `m`, or why it was refused.
fn apply(mut state: State, m: &Json) -> Result<State, String> {
    let name = m.get("name").and_then(Json::as_str).unwrap_or_default();
    let params = m.get("params").unwrap_or(&Json::Null);
    let level = |required: bool| -> Result<Option<f64>, String> {
        match params.get("level") {
            Some(l) => match l.as_f64() {
                Some(l) if (0.0..=100.0).contains(&l) => Ok(Some(l)),
                _ => Err(format!("{name}: level must be a number 0-100, not {l}")),
            },
            None if required => Err(format!("{name}: params.level (0-100) is missing")),
            None => Ok(None),
        }
    };
    match name {
        "on" => {
            state.on = true;
            if state.dimmer == 0.0 {
                state.dimmer = 100.0;
            }
        }
        "off" => state.on = false,
        "dim" => {
            let l = level(true)?.expect("required");
            state.dimmer = l;
            state.on = l > 0.0;
        }
        "light" => {
            if let Some(l) = level(false)? {
                state.dimmer = l;
            }
            match params.get("on") {
                Some(Json::Bool(on)) => state.on = *on,
                Some(other) => return Err(format!("light: on must be true or false, not {other}")),
                None => {}
            }
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            return Err(format!(
                "unknown command {shown:?} (a street light knows on, off, dim, light)"
            ));
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::profiles::default_profiles;

    fn lamp() -> Lamp {
        Lamp::new(&default_profiles()["street_light"])
    }

    fn answer(l: &mut Lamp, m: Json) -> (bool, Json) {
        let a = l.handle(m.to_string().as_bytes());
        (a.ok, serde_json::from_slice(&a.payload).unwrap())
    }

    fn readings(l: &Lamp) -> Vec<(String, Value)> {
        let mut v = vec![
            ("lamp_state".into(), Value::Boolean(true)),
            ("power".into(), Value::Number(104.2)),
            ("voltage".into(), Value::Number(228.0)),
        ];
        l.apply(&mut v);
        v
    }

    #[test]
    fn commands_change_the_next_readings_and_are_answered() {
        let mut l = lamp();
        // No command yet: the schedule's values stand.
        assert_eq!(readings(&l)[1].1, Value::Number(104.2));

        let (ok, a) = answer(
            &mut l,
            json!({"id": "c1", "name": "dim", "params": {"level": 40}}),
        );
        assert!(ok);
        assert_eq!(
            a,
            json!({"status": "ok", "result": {"lamp_state": true, "dimmer": 40.0}})
        );
        // Rated 110 W (mean 55 + amplitude 55) at 40 %.
        assert_eq!(readings(&l)[1].1, Value::Number(44.0));

        let (ok, _) = answer(&mut l, json!({"id": "c2", "name": "off"}));
        assert!(ok);
        let r = readings(&l);
        assert_eq!(r[0].1, Value::Boolean(false));
        assert_eq!(r[1].1, Value::Number(0.0));
        assert_eq!(r[2].1, Value::Number(228.0), "other quantities untouched");

        // On again at the level it had.
        answer(&mut l, json!({"id": "c3", "name": "on", "params": {}}));
        assert_eq!(readings(&l)[1].1, Value::Number(44.0));
        answer(
            &mut l,
            json!({"id": "c4", "name": "light", "params": {"on": true, "level": 80}}),
        );
        assert_eq!(readings(&l)[1].1, Value::Number(88.0));
    }

    #[test]
    fn lwm2m_writes_switch_and_dim() {
        let mut l = lamp();
        l.write(DIMMER, "25").unwrap();
        // Dimmed, not switched: off until 5850 says on.
        assert_eq!(readings(&l)[0].1, Value::Boolean(false));
        l.write(ON_OFF, "1").unwrap();
        assert_eq!(readings(&l)[1].1, Value::Number(27.5));
        assert!(l.write(ON_OFF, "maybe").is_err());
        assert!(l.write(DIMMER, "101").is_err());
        assert!(l.write(5852, "1").is_err());
        assert_eq!(readings(&l)[0].1, Value::Boolean(true));
    }

    #[test]
    fn unknown_commands_and_bad_params_are_answered_with_an_error() {
        let mut l = lamp();
        let (ok, a) = answer(&mut l, json!({"id": "c1", "name": "reboot"}));
        assert!(!ok);
        assert_eq!(a["status"], "error");
        assert!(a["error"].as_str().unwrap().contains("reboot"), "{a}");
        let (ok, a) = answer(
            &mut l,
            json!({"id": "c2", "name": "dim", "params": {"level": 140}}),
        );
        assert!(!ok && a["error"].as_str().unwrap().contains("0-100"), "{a}");
        let (ok, _) = answer(&mut l, json!({"id": "c3", "name": "dim"}));
        assert!(!ok);
        let a = l.handle(b"not json");
        assert!(!a.ok);
        // Refused commands leave the schedule in charge.
        assert_eq!(readings(&l)[0].1, Value::Boolean(true));
    }
}

//! The condition of one rule for one device, step by step: pure, so every case is a unit test.
//!
//! A [`Track`] is what a (rule, device) pair remembers between readings: a threshold that began
//! to hold (and since when), the alert it raised, a rate rule's recent values. Times are the
//! gateway's receive times, so a device's wrong clock cannot raise or clear anything.

use std::collections::VecDeque;

use super::config::{format_ms, Condition, Rule};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Track {
    /// Threshold: when the condition began to hold, and the value then (not yet long enough).
    pub pending: Option<(i64, f64)>,
    /// The alert raised and not cleared: its id and when it was raised.
    pub active: Option<(String, i64)>,
    /// Rate: (time, value) within the window, oldest first.
    pub window: VecDeque<(i64, f64)>,
}

impl Track {
    /// Nothing worth keeping: the track can go.
    pub fn idle(&self) -> bool {
        self.pending.is_none() && self.active.is_none() && self.window.is_empty()
    }
}

/// What a step decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Raise { value: f64, message: String },
    Clear { value: f64, message: String },
}

/// One step's result: an alert event, and whether `pending` changed (it is kept durably, so a
/// duration survives a restart).
#[derive(Debug, Default, PartialEq)]
pub struct Step {
    pub event: Option<Event>,
    pub pending_changed: bool,
}

fn num(v: f64) -> String {
    // Shortest form that reads back the same: 2.5, not 2.5000000001.
    format!("{v}")
}

/// A reading of the rule's quantity (or, for an absence rule, any reading) at `t`.
pub fn on_reading(rule: &Rule, track: &mut Track, value: f64, t: i64) -> Step {
    let mut step = Step::default();
    // A reading older than the active alert (replayed after a restart) cannot clear it.
    let older_than_alert = track.active.as_ref().is_some_and(|(_, at)| t < *at);
    match &rule.condition {
        Condition::Threshold {
            above,
            threshold,
            clear,
            hold_ms,
        } => {
            let q = &rule.quantity;
            let (op, back) = if *above { (">", "<") } else { ("<", ">") };
            if track.active.is_some() {
                let cleared = if *above {
                    value < *clear
                } else {
                    value > *clear
                };
                if cleared && !older_than_alert {
                    step.event = Some(Event::Clear {
                        value,
                        message: format!("{q} {} {back} {}", num(value), num(*clear)),
                    });
                }
                return step;
            }
            let hits = if *above {
                value > *threshold
            } else {
                value < *threshold
            };
            if !hits {
                step.pending_changed = track.pending.take().is_some();
                return step;
            }
            let since = match track.pending {
                Some((since, _)) => since,
                None => {
                    step.pending_changed = true;
                    t
                }
            };
            if t - since >= *hold_ms {
                step.pending_changed = track.pending.take().is_some() || step.pending_changed;
                step.event = Some(Event::Raise {
                    value,
                    message: raise_message(rule, value, *threshold, op, *hold_ms),
                });
            } else {
                track.pending = Some((since, value));
            }
        }
        Condition::Absence { .. } => {
            if track.active.is_some() && !older_than_alert {
                step.event = Some(Event::Clear {
                    value,
                    message: "the device reported again".into(),
                });
            }
        }
        Condition::Rate {
            rises,
            delta,
            window_ms,
        } => {
            while track
                .window
                .front()
                .is_some_and(|(at, _)| *at < t - window_ms)
            {
                track.window.pop_front();
            }
            track.window.push_back((t, value));
            let moved = if *rises {
                value
                    - track
                        .window
                        .iter()
                        .map(|w| w.1)
                        .fold(f64::INFINITY, f64::min)
            } else {
                track
                    .window
                    .iter()
                    .map(|w| w.1)
                    .fold(f64::NEG_INFINITY, f64::max)
                    - value
            };
            let verb = if *rises { "rose" } else { "fell" };
            let holds = moved >= *delta;
            if track.active.is_none() && holds {
                step.event = Some(Event::Raise {
                    value,
                    message: format!(
                        "{} {verb} {} in {} (to {})",
                        rule.quantity,
                        num(moved),
                        format_ms(*window_ms),
                        num(value)
                    ),
                });
            } else if track.active.is_some() && !holds && !older_than_alert {
                step.event = Some(Event::Clear {
                    value,
                    message: format!(
                        "{} {verb} only {} in {}",
                        rule.quantity,
                        num(moved.max(0.0)),
                        format_ms(*window_ms)
                    ),
                });
            }
        }
    }
    step
}

fn raise_message(rule: &Rule, value: f64, threshold: f64, op: &str, hold_ms: i64) -> String {
    let hold = if hold_ms > 0 {
        format!(" for {}", format_ms(hold_ms))
    } else {
        String::new()
    };
    format!(
        "{} {} {op} {}{hold}",
        rule.quantity,
        num(value),
        num(threshold)
    )
}

/// Time passing with no reading: a threshold held long enough, or a device silent too long
/// (`last_seen`: its last reading, 0 when it never sent one; a device that never spoke is not
/// "silent").
pub fn on_tick(rule: &Rule, track: &mut Track, now: i64, last_seen: i64) -> Step {
    let mut step = Step::default();
    if track.active.is_some() {
        return step;
    }
    match &rule.condition {
        Condition::Threshold {
            above,
            threshold,
            hold_ms,
            ..
        } => {
            if let Some((since, value)) = track.pending {
                if now - since >= *hold_ms {
                    track.pending = None;
                    step.pending_changed = true;
                    let op = if *above { ">" } else { "<" };
                    step.event = Some(Event::Raise {
                        value,
                        message: raise_message(rule, value, *threshold, op, *hold_ms),
                    });
                }
            }
        }
        Condition::Absence { silent_ms } => {
            if last_seen > 0 && now - last_seen >= *silent_ms {
                step.event = Some(Event::Raise {
                    value: 0.0,
                    message: format!(
                        "device silent for {}s (limit {})",
                        (now - last_seen) / 1000,
                        format_ms(*silent_ms)
                    ),
                });
            }
        }
        Condition::Rate { .. } => {}
    }
    step
}

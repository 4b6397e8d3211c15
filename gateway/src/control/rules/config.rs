//! `[[rules]]` as operators write them, checked and compiled into [`Rule`]s.
//!
//! ```toml
//! [[rules]]                      # threshold with duration and hysteresis
//! name = "flood"
//! quantity = "water_level"
//! above = 2.5
//! for = "5m"
//! clear = 2.3                    # clears below 2.3 (default: the threshold itself)
//! severity = "critical"
//! kind = "water_level"           # scope: tenant, kind, commune, device (empty: any)
//!
//! [[rules]]                      # absence
//! name = "silent-sensor"
//! silent_for = "30m"
//! kind = "water_level"
//!
//! [[rules]]                      # rate of change
//! name = "rising-fast"
//! quantity = "water_level"
//! rises = 0.5
//! within = "15m"
//!
//! [[rules]]                      # an action: street lights of the commune on when it is dark
//! name = "dark"
//! quantity = "illuminance"
//! below = 30
//! for = "5m"
//! clear = 50
//! action = { command = "light", params = { on = true }, target_kind = "street_light", cooldown = "30m" }
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{is_slug, parse_duration};
use crate::control::commands::{DEFAULT_TTL_MS, MAX_TTL_MS};
use crate::proto::Severity;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// 1-64 of a-z 0-9 - _ (a metric label and part of the store keys).
    pub name: String,
    /// critical, major (default), minor, warning.
    #[serde(default)]
    pub severity: String,
    /// Scope: only devices of this tenant, kind, commune code, or this one device (empty: any).
    #[serde(default)]
    pub tenant: String,
    /// Scope: only devices of this kind (empty: any).
    #[serde(default)]
    pub kind: String,
    /// Scope: only devices in this commune code (empty: any).
    #[serde(default)]
    pub commune: String,
    /// Scope: only this device (empty: any).
    #[serde(default)]
    pub device: String,
    /// The reading quantity watched (threshold and rate rules); an alias from the quantity table
    /// (`illuminance`) means its canonical name (`lux`).
    #[serde(default)]
    pub quantity: String,
    /// Threshold: raise while the value is above (or below) this.
    pub above: Option<f64>,
    /// Threshold: raise while the value is below this.
    pub below: Option<f64>,
    /// Hysteresis: an active alert clears only below (for `above`) or above (for `below`) this.
    pub clear: Option<f64>,
    /// Threshold: the condition must hold this long (e.g. "5m"); default at once.
    #[serde(default, rename = "for")]
    pub for_: String,
    /// Absence: raise when the device sent nothing for this long (e.g. "30m").
    pub silent_for: Option<String>,
    /// Rate of change: raise when the value rose (fell) by this much within `within`.
    pub rises: Option<f64>,
    /// Rate of change: raise when the value fell by this much within `within`.
    pub falls: Option<f64>,
    /// Rate of change: the time window of `rises` / `falls` (e.g. "10m").
    pub within: Option<String>,
    /// A command sent when the rule raises an alert.
    pub action: Option<ActionConfig>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// The command's name (e.g. "light").
    pub command: String,
    /// Its params, a table (JSON object); default {}.
    #[serde(default)]
    pub params: Option<serde_json::Value>,
    /// Empty: the device that raised the alert. Otherwise the enabled devices of this kind in
    /// the same commune as that device (street lights near a light sensor).
    #[serde(default)]
    pub target_kind: String,
    /// No second command for the same rule and target within this time (default "10m").
    #[serde(default)]
    pub cooldown: String,
    /// The commands' time to live (default "1h").
    #[serde(default)]
    pub ttl: String,
}

/// What a rule watches for.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// `above`: raise while value > threshold, clear when value < clear (and the mirror image).
    Threshold {
        above: bool,
        threshold: f64,
        clear: f64,
        hold_ms: i64,
    },
    /// Nothing from the device for `silent_ms`; clears with its next reading.
    Absence { silent_ms: i64 },
    /// The value moved by `delta` (rises: up, else down) within `window_ms`; clears when the
    /// movement within the window falls back below `delta`.
    Rate {
        rises: bool,
        delta: f64,
        window_ms: i64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub command: String,
    pub params: String,
    pub target_kind: String,
    pub cooldown_ms: i64,
    pub ttl_ms: u64,
}

/// A checked rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub severity: Severity,
    pub tenant: String,
    pub kind: String,
    pub commune: String,
    pub device: String,
    pub quantity: String,
    pub condition: Condition,
    pub action: Option<Action>,
}

fn millis(what: &str, s: &str) -> anyhow::Result<i64> {
    let d: Duration = parse_duration(s).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok(d.as_millis().min(i64::MAX as u128) as i64)
}

pub fn parse_severity(s: &str) -> Option<Severity> {
    Some(match s.to_ascii_lowercase().as_str() {
        "critical" => Severity::Critical,
        "" | "major" => Severity::Major,
        "minor" => Severity::Minor,
        "warning" => Severity::Warning,
        _ => return None,
    })
}

/// "critical", "major", ...
pub fn severity_label(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "critical",
        Severity::Major => "major",
        Severity::Minor => "minor",
        Severity::Warning => "warning",
        Severity::Unspecified => "unspecified",
    }
}

impl RuleConfig {
    /// Checks the rule and turns it into a [`Rule`]; errors name the rule and the key.
    pub fn compile(&self) -> anyhow::Result<Rule> {
        let name = &self.name;
        anyhow::ensure!(
            is_slug(name),
            "rule name {name:?}: 1-64 characters of a-z 0-9 - _"
        );
        let ctx = |key: &str| format!("rule {name:?}: {key}");
        let severity = parse_severity(&self.severity).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: critical, major, minor or warning, not {:?}",
                ctx("severity"),
                self.severity
            )
        })?;
        let kinds = [
            self.above.is_some() || self.below.is_some(),
            self.silent_for.is_some(),
            self.rises.is_some() || self.falls.is_some(),
        ];
        anyhow::ensure!(
            kinds.iter().filter(|k| **k).count() == 1,
            "rule {name:?}: exactly one of above/below (threshold), silent_for (absence), \
             rises/falls (rate of change)"
        );
        let finite = |key: &str, v: f64| -> anyhow::Result<f64> {
            anyhow::ensure!(v.is_finite(), "{}: must be a finite number", ctx(key));
            Ok(v)
        };
        let needs_quantity = || -> anyhow::Result<()> {
            anyhow::ensure!(
                !self.quantity.is_empty(),
                "{}: the reading quantity to watch",
                ctx("quantity")
            );
            Ok(())
        };
        let condition = if kinds[0] {
            needs_quantity()?;
            anyhow::ensure!(
                self.above.is_none() || self.below.is_none(),
                "rule {name:?}: above or below, not both"
            );
            let above = self.above.is_some();
            let threshold = finite(
                if above { "above" } else { "below" },
                self.above.or(self.below).unwrap_or_default(),
            )?;
            let clear = finite("clear", self.clear.unwrap_or(threshold))?;
            anyhow::ensure!(
                if above {
                    clear <= threshold
                } else {
                    clear >= threshold
                },
                "{}: must be on the safe side of the threshold ({} {threshold})",
                ctx("clear"),
                if above { "at most" } else { "at least" }
            );
            let hold_ms = if self.for_.is_empty() {
                0
            } else {
                millis(&ctx("for"), &self.for_)?
            };
            Condition::Threshold {
                above,
                threshold,
                clear,
                hold_ms,
            }
        } else {
            anyhow::ensure!(
                self.clear.is_none() && self.for_.is_empty(),
                "rule {name:?}: clear and for belong to threshold rules"
            );
            if let Some(s) = &self.silent_for {
                let silent_ms = millis(&ctx("silent_for"), s)?;
                anyhow::ensure!(silent_ms >= 1000, "{}: at least 1s", ctx("silent_for"));
                Condition::Absence { silent_ms }
            } else {
                needs_quantity()?;
                anyhow::ensure!(
                    self.rises.is_none() || self.falls.is_none(),
                    "rule {name:?}: rises or falls, not both"
                );
                let rises = self.rises.is_some();
                let key = if rises { "rises" } else { "falls" };
                let delta = finite(key, self.rises.or(self.falls).unwrap_or_default())?;
                anyhow::ensure!(delta > 0.0, "{}: must be positive", ctx(key));
                let within = self
                    .within
                    .as_deref()
                    .ok_or_else(|| anyhow::anyhow!("{}: e.g. \"15m\"", ctx("within")))?;
                let window_ms = millis(&ctx("within"), within)?;
                anyhow::ensure!(
                    (1000..=86_400_000).contains(&window_ms),
                    "{}: 1s to 1d",
                    ctx("within")
                );
                Condition::Rate {
                    rises,
                    delta,
                    window_ms,
                }
            }
        };
        if self.within.is_some() {
            anyhow::ensure!(
                matches!(condition, Condition::Rate { .. }),
                "rule {name:?}: within belongs to rises/falls"
            );
        }
        let action = self
            .action
            .as_ref()
            .map(|a| a.compile(&ctx("action")))
            .transpose()?;
        Ok(Rule {
            name: name.clone(),
            severity,
            tenant: self.tenant.clone(),
            kind: self.kind.clone(),
            commune: self.commune.clone(),
            device: self.device.clone(),
            // As readings name it: "illuminance" is stored as "lux".
            quantity: crate::pipeline::normalise::canonical(&self.quantity, "")
                .0
                .into_owned(),
            condition,
            action,
        })
    }
}

impl ActionConfig {
    fn compile(&self, ctx: &str) -> anyhow::Result<Action> {
        let c = &self.command;
        anyhow::ensure!(
            !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')),
            "{ctx}.command {c:?}: 1-64 characters of A-Z a-z 0-9 _ - ."
        );
        let params = match &self.params {
            None => "{}".to_string(),
            Some(v @ serde_json::Value::Object(_)) => v.to_string(),
            Some(_) => anyhow::bail!("{ctx}.params: a table (JSON object)"),
        };
        let cooldown_ms = if self.cooldown.is_empty() {
            600_000
        } else {
            millis(&format!("{ctx}.cooldown"), &self.cooldown)?
        };
        let ttl_ms = if self.ttl.is_empty() {
            DEFAULT_TTL_MS
        } else {
            millis(&format!("{ctx}.ttl"), &self.ttl)? as u64
        };
        anyhow::ensure!(
            (1000..=MAX_TTL_MS).contains(&ttl_ms),
            "{ctx}.ttl: 1s to 30d"
        );
        Ok(Action {
            command: c.clone(),
            params,
            target_kind: self.target_kind.clone(),
            cooldown_ms,
            ttl_ms,
        })
    }
}

impl Rule {
    /// Whether a device with these attributes is in the rule's scope.
    pub fn covers(&self, device: &str, tenant: &str, kind: &str, commune: &str) -> bool {
        let ok = |want: &str, have: &str| want.is_empty() || want == have;
        ok(&self.device, device)
            && ok(&self.tenant, tenant)
            && ok(&self.kind, kind)
            && ok(&self.commune, commune)
    }

    pub fn type_label(&self) -> &'static str {
        match self.condition {
            Condition::Threshold { .. } => "threshold",
            Condition::Absence { .. } => "absence",
            Condition::Rate { .. } => "rate",
        }
    }

    /// The rule in words: "water_level > 2.5 for 5m, clear below 2.3".
    pub fn describe(&self) -> String {
        let secs = |ms: i64| format_ms(ms);
        match &self.condition {
            Condition::Threshold {
                above,
                threshold,
                clear,
                hold_ms,
            } => {
                let (op, side) = if *above {
                    (">", "below")
                } else {
                    ("<", "above")
                };
                let hold = if *hold_ms > 0 {
                    format!(" for {}", secs(*hold_ms))
                } else {
                    String::new()
                };
                format!(
                    "{} {op} {threshold}{hold}, clear {side} {clear}",
                    self.quantity
                )
            }
            Condition::Absence { silent_ms } => format!("device silent for {}", secs(*silent_ms)),
            Condition::Rate {
                rises,
                delta,
                window_ms,
            } => format!(
                "{} {} {delta} in {}",
                self.quantity,
                if *rises { "rises" } else { "falls" },
                secs(*window_ms)
            ),
        }
    }
}

/// 300000 → "5m", 1500 → "1500ms".
pub fn format_ms(ms: i64) -> String {
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Compiles every rule, refusing duplicate names.
pub fn compile_all(rules: &[RuleConfig]) -> anyhow::Result<Vec<Rule>> {
    let mut out: Vec<Rule> = Vec::with_capacity(rules.len());
    for r in rules {
        let rule = r.compile()?;
        anyhow::ensure!(
            out.iter().all(|o| o.name != rule.name),
            "rule {:?} is defined twice",
            rule.name
        );
        out.push(rule);
    }
    Ok(out)
}

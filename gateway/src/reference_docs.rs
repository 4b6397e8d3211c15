//! The book's reference pages are generated from the code and checked here, so they cannot drift.
//!
//! docs/src/reference/{config,metrics,dead-letters,cli}.md each hold a block between
//! `<!-- reference:begin NAME -->` and `<!-- reference:end NAME -->` that is exactly what this
//! module renders from the one source of truth in the code:
//!
//! - config keys: the JSON schema of [`Config`] (schemars, from the serde structs and their `///`
//!   comments), so every key, its type, default and meaning;
//! - metrics: everything [`observability`] describes (plus the process collector's), and every
//!   `citygw_*` name the code uses must be described there;
//! - dead-letter reasons: [`crate::reason::ALL`];
//! - CLI commands: clap's command tree of the `citygw` binary.
//!
//! A test fails when a block differs, naming what is missing or stale; with
//! `CITYGW_UPDATE_REFERENCE=1` it rewrites the blocks instead (then review the diff).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};

use crate::config::Config;
use crate::observability;

const UPDATE: &str = "CITYGW_UPDATE_REFERENCE";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Compares (or rewrites) one generated block; `items` are the names the block documents, for a
/// failure message that says what is missing where.
fn check_block(page: &str, name: &str, generated: &str, items: &BTreeSet<String>) {
    let path = repo().join("docs/src/reference").join(page);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let begin = format!("<!-- reference:begin {name} -->\n");
    let end = format!("<!-- reference:end {name} -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        panic!("docs/src/reference/{page} lacks the lines `{begin}` and `{end}`");
    };
    let current = &text[b + begin.len()..e];
    if current == generated {
        return;
    }
    if std::env::var_os(UPDATE).is_some() {
        let updated = format!("{}{generated}{}", &text[..b + begin.len()], &text[e..]);
        std::fs::write(&path, updated).unwrap();
        eprintln!("updated docs/src/reference/{page} ({name})");
        return;
    }
    let documented: BTreeSet<String> = items
        .iter()
        .filter(|i| current.contains(&format!("`{i}`")))
        .cloned()
        .collect();
    let missing: Vec<_> = items.difference(&documented).collect();
    panic!(
        "docs/src/reference/{page} is out of step with the code ({name}).\n\
         In the code but not on the page: {missing:?}\n\
         (other differences: stale entries, changed defaults or help texts)\n\
         Regenerate it with `{UPDATE}=1 cargo test -p citygw --lib reference_docs` and commit the \
         page; explain new entries in the code (a `///` comment on a config field, the help text \
         of a metric in observability.rs, the comment of a reason in reason.rs, the doc comment \
         of a CLI command or argument)."
    );
}

fn md_cell(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

// ---- config keys --------------------------------------------------------------------------

struct Key {
    name: String,
    ty: String,
    default: String,
    meaning: String,
}

fn resolve<'a>(schema: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(&defs[r.trim_start_matches("#/$defs/")], defs),
        None => schema,
    }
}

/// The schema without its `null` alternative (an `Option`).
fn non_null<'a>(schema: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    let schema = resolve(schema, defs);
    for alt in ["anyOf", "oneOf"] {
        if let Some(list) = schema.get(alt).and_then(Value::as_array) {
            let rest: Vec<_> = list
                .iter()
                .filter(|s| s.get("type") != Some(&Value::from("null")))
                .collect();
            if rest.len() == 1 && list.len() == 2 {
                return non_null(rest[0], defs);
            }
        }
    }
    schema
}

fn type_name(schema: &Value, defs: &Map<String, Value>) -> String {
    let s = non_null(schema, defs);
    let consts: Vec<String> = s
        .get("enum")
        .and_then(Value::as_array)
        .cloned()
        .or_else(|| {
            s.get("oneOf").and_then(Value::as_array).map(|alts| {
                alts.iter()
                    .flat_map(|a| match (a.get("const"), a.get("enum")) {
                        (Some(c), _) => vec![c.clone()],
                        (None, Some(Value::Array(e))) => e.clone(),
                        _ => Vec::new(),
                    })
                    .collect()
            })
        })
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(|v| format!("\"{v}\"")))
        .collect();
    if !consts.is_empty() {
        return consts.join(" \\| ");
    }
    let ty = match s.get("type") {
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("any")
            .to_string(),
        Some(Value::String(t)) => t.clone(),
        _ => "any".into(),
    };
    match ty.as_str() {
        "array" => format!(
            "array of {}",
            s.get("items")
                .map(|i| type_name(i, defs))
                .unwrap_or_else(|| "any".into())
        ),
        "integer" => "integer".into(),
        "number" => "number".into(),
        "boolean" => "boolean".into(),
        "object" => "table".into(),
        other => other.into(),
    }
}

fn toml_value(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => format!("`\"{s}\"`"),
        Value::Array(a) if a.is_empty() => "`[]`".into(),
        Value::Object(o) if o.is_empty() => "`{}`".into(),
        other => format!("`{other}`"),
    }
}

fn description(prop: &Value, resolved: &Value) -> String {
    prop.get("description")
        .or_else(|| resolved.get("description"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn walk(schema: &Value, defs: &Map<String, Value>, prefix: &str, out: &mut Vec<Key>) {
    let schema = non_null(schema, defs);
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (field, prop) in props {
        let name = if prefix.is_empty() {
            field.clone()
        } else {
            format!("{prefix}.{field}")
        };
        let inner = non_null(prop, defs);
        if inner.get("properties").is_some() {
            walk(inner, defs, &name, out);
            continue;
        }
        let items = inner.get("items").map(|i| non_null(i, defs));
        if let Some(items) = items.filter(|i| i.get("properties").is_some()) {
            walk(items, defs, &format!("{name}[]"), out);
            continue;
        }
        // A map whose keys are data (kinds, city codes, years), not names of settings.
        let mut value = inner;
        let mut key_name = name.clone();
        while let Some(v) = value.get("additionalProperties").filter(|v| v.is_object()) {
            key_name.push_str(".*");
            value = non_null(v, defs);
        }
        out.push(Key {
            ty: if key_name == name {
                type_name(prop, defs)
            } else {
                format!("table of {}", type_name(value, defs))
            },
            name: key_name,
            default: match prop.get("default") {
                _ if required.contains(&field.as_str()) => "required".into(),
                Some(v) if !v.is_null() => toml_value(v),
                _ => "none".into(),
            },
            meaning: description(prop, inner),
        });
    }
}

fn config_keys() -> Vec<Key> {
    let schema = serde_json::to_value(schemars::schema_for!(Config)).unwrap();
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    walk(&schema, &defs, "", &mut out);
    // Top-level keys first, then the sections in alphabetical order.
    out.sort_by_key(|k| (k.name.contains('.'), k.name.clone()));
    out
}

/// The environment variable overriding a key, where one does (not inside arrays of tables).
fn env_var(key: &str) -> String {
    let section = key.split('.').next().unwrap_or(key);
    if key.contains("[]") || (key.contains('.') && !crate::config::ENV_SECTIONS.contains(&section))
    {
        return String::new();
    }
    format!(
        "`CITYGW_{}`",
        key.replace('.', "__").replace('*', "<KEY>").to_uppercase()
    )
}

fn render_config(keys: &[Key]) -> String {
    let mut s = String::new();
    let mut section = None;
    for k in keys {
        let this = match k.name.split_once('.') {
            Some((sec, _)) => sec.to_string(),
            None => String::new(),
        };
        if section.as_ref() != Some(&this) {
            let title = match this.as_str() {
                "" => "Top level".to_string(),
                t if t.ends_with("[]") => format!("[[{}]]", t.trim_end_matches("[]")),
                t => format!("[{t}]"),
            };
            let _ = write!(
                s,
                "\n## {title}\n\n| key | type | default | environment | meaning |\n|---|---|---|---|---|\n"
            );
            section = Some(this);
        }
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} |",
            k.name,
            k.ty,
            k.default,
            env_var(&k.name),
            md_cell(&k.meaning)
        );
    }
    s.push('\n');
    s
}

#[test]
fn config_reference_is_current() {
    let keys = config_keys();
    let undocumented: Vec<_> = keys
        .iter()
        .filter(|k| k.meaning.trim().is_empty())
        .map(|k| k.name.as_str())
        .collect();
    assert!(
        undocumented.is_empty(),
        "config keys without a `///` comment on their field (the reference page shows it as \
         their meaning): {undocumented:?}"
    );
    let items = keys.iter().map(|k| k.name.clone()).collect();
    check_block("config.md", "config", &render_config(&keys), &items);
}

/// Every section that is a table (not an array of tables) can be overridden from the environment.
#[test]
fn every_config_section_takes_environment_overrides() {
    let missing: BTreeSet<_> = config_keys()
        .iter()
        .filter_map(|k| k.name.split_once('.').map(|(s, _)| s.to_string()))
        .filter(|s| !s.ends_with("[]") && !crate::config::ENV_SECTIONS.contains(&s.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "config sections missing from config::ENV_SECTIONS (their CITYGW_* variables would be \
         ignored): {missing:?}"
    );
}

// ---- metrics ------------------------------------------------------------------------------

#[derive(Default)]
struct Described(Mutex<Vec<(String, &'static str, String, String)>>);

impl Described {
    fn add(
        &self,
        key: metrics::KeyName,
        kind: &'static str,
        unit: Option<metrics::Unit>,
        help: metrics::SharedString,
    ) {
        let unit = unit
            .map(|u| u.as_canonical_label().to_string())
            .unwrap_or_default();
        self.0
            .lock()
            .unwrap()
            .push((key.as_str().to_string(), kind, unit, help.to_string()));
    }
}

impl metrics::Recorder for Described {
    fn describe_counter(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        help: metrics::SharedString,
    ) {
        self.add(key, "counter", unit, help)
    }
    fn describe_gauge(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        help: metrics::SharedString,
    ) {
        self.add(key, "gauge", unit, help)
    }
    fn describe_histogram(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        help: metrics::SharedString,
    ) {
        self.add(key, "histogram", unit, help)
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// (name, type, unit, help) of every metric the gateway exports, sorted by name.
fn described_metrics() -> Vec<(String, &'static str, String, String)> {
    let recorder = Described::default();
    metrics::with_local_recorder(&recorder, || {
        observability::describe();
        metrics_process::Collector::default().describe();
    });
    let mut all = recorder.0.into_inner().unwrap();
    all.sort();
    all
}

/// Marks a `"citygw_..."` literal that is not a metric name (a cookie, a prefix in a test).
const NOT_A_METRIC: &str = "// not a metric";

/// `"citygw_..."` string literals in the Rust sources under `dir`: the names the code records
/// (or, in device-sim, reads back from /metrics), except on lines marked [`NOT_A_METRIC`].
fn metric_names_used(dir: &Path, found: &mut BTreeSet<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            metric_names_used(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs")
            && !path.ends_with("reference_docs.rs")
        {
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("\"citygw_") {
                let line_end = text[i..].find('\n').map_or(text.len(), |n| i + n);
                if text[i..line_end].contains(NOT_A_METRIC) {
                    continue;
                }
                let name: String = text[i + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if text[i + 1 + name.len()..].starts_with('"') {
                    found.insert((
                        name,
                        path.strip_prefix(repo())
                            .unwrap_or(&path)
                            .display()
                            .to_string(),
                    ));
                }
            }
        }
    }
}

#[test]
fn every_metric_used_is_described_and_documented() {
    let described = described_metrics();
    let names: BTreeSet<String> = described.iter().map(|m| m.0.clone()).collect();
    let mut used = BTreeSet::new();
    metric_names_used(&repo().join("gateway/src"), &mut used);
    metric_names_used(&repo().join("device-sim/src"), &mut used);
    let undescribed: Vec<_> = used
        .iter()
        .filter(|(n, _)| !names.contains(n))
        .map(|(n, f)| format!("{n} ({f})"))
        .collect();
    assert!(
        undescribed.is_empty(),
        "metrics used in the code but not described in gateway/src/observability.rs (add a \
         describe_counter!/describe_gauge!/describe_histogram! with its help text there; a \
         literal that is not a metric name gets `{NOT_A_METRIC}` at the end of its line): \
         {undescribed:?}"
    );
    let used_names: BTreeSet<_> = used.iter().map(|(n, _)| n.clone()).collect();
    let unused: Vec<_> = names
        .iter()
        .filter(|n| n.starts_with("citygw_") && !used_names.contains(*n))
        .collect();
    assert!(
        unused.is_empty(),
        "metrics described in observability.rs that nothing records (remove them): {unused:?}"
    );
    let mut s = String::from("\n| metric | type | unit | help |\n|---|---|---|---|\n");
    for (name, kind, unit, help) in &described {
        assert!(!help.trim().is_empty(), "metric {name} has no help text");
        let _ = writeln!(s, "| `{name}` | {kind} | {unit} | {} |", md_cell(help));
    }
    s.push('\n');
    check_block("metrics.md", "metrics", &s, &names);
}

// ---- dead-letter reasons ------------------------------------------------------------------

#[test]
fn dead_letter_reference_is_current() {
    let mut s = String::from("\n| reason | meaning | given by |\n|---|---|---|\n");
    let mut items = BTreeSet::new();
    for d in crate::reason::ALL {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} |",
            d.reason,
            md_cell(d.meaning),
            d.given_by
        );
        items.insert(d.reason.to_string());
    }
    s.push('\n');
    check_block("dead-letters.md", "dead-letters", &s, &items);
}

// ---- CLI commands -------------------------------------------------------------------------

fn arg_spec(a: &clap::Arg) -> String {
    let values = a
        .get_value_names()
        .map(|v| {
            v.iter()
                .map(|v| format!("<{v}>"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    if a.is_positional() {
        return values;
    }
    let flag = match (a.get_short(), a.get_long()) {
        (Some(s), Some(l)) => format!("-{s}, --{l}"),
        (None, Some(l)) => format!("--{l}"),
        (Some(s), None) => format!("-{s}"),
        (None, None) => a.get_id().to_string(),
    };
    let takes_value = a.get_num_args().is_some_and(|n| n.takes_values());
    if takes_value && !values.is_empty() {
        format!("{flag} {values}")
    } else {
        flag
    }
}

fn arg_help(a: &clap::Arg) -> String {
    let mut help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
    let defaults: Vec<_> = a
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    let takes_value = a.get_num_args().is_some_and(|n| n.takes_values());
    if !defaults.is_empty() && takes_value {
        let _ = write!(help, " (default: {})", defaults.join(", "));
    }
    let values: Vec<_> = a
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_string())
        .collect();
    if !values.is_empty() && takes_value {
        let _ = write!(help, " (one of: {})", values.join(", "));
    }
    if let Some(env) = a.get_env() {
        let _ = write!(help, " [env: {}]", env.to_string_lossy());
    }
    md_cell(help.trim())
}

/// Renders every command under `cmd`; `unexplained` collects commands and arguments without a
/// doc comment (which `--help` would show empty, too).
fn render_command(
    cmd: &clap::Command,
    path: &str,
    s: &mut String,
    names: &mut BTreeSet<String>,
    unexplained: &mut Vec<String>,
) {
    for sub in cmd.get_subcommands().filter(|c| c.get_name() != "help") {
        let full = format!("{path} {}", sub.get_name());
        names.insert(full.clone());
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        if about.is_empty() {
            unexplained.push(full.clone());
        }
        let usage = sub.clone().render_usage().to_string();
        let usage = usage.trim().trim_start_matches("Usage: ");
        let _ = write!(s, "\n### `{full}`\n\n{}\n\n", md_cell(&about));
        if sub.has_subcommands() {
            let _ = writeln!(
                s,
                "Subcommands: {}.",
                sub.get_subcommands()
                    .filter(|c| c.get_name() != "help")
                    .map(|c| format!("`{}`", c.get_name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            render_command(sub, &full, s, names, unexplained);
            continue;
        }
        let _ = writeln!(s, "```text\n{usage}\n```");
        let args: Vec<_> = sub
            .get_arguments()
            .filter(|a| !a.is_global_set() && !a.is_hide_set() && a.get_id() != "help")
            .collect();
        if !args.is_empty() {
            s.push_str("\n| argument | meaning |\n|---|---|\n");
            for a in args {
                if a.get_help().is_none() {
                    unexplained.push(format!("{full} {}", arg_spec(a)));
                }
                let _ = writeln!(s, "| `{}` | {} |", arg_spec(a), arg_help(a));
            }
        }
    }
}

#[test]
fn cli_reference_is_current() {
    let mut cmd = crate::cli::command();
    cmd.build();
    let mut s = String::from("\nOptions of every command:\n\n| argument | meaning |\n|---|---|\n");
    for a in cmd
        .get_arguments()
        .filter(|a| a.get_id() != "help" && a.get_id() != "version")
    {
        let _ = writeln!(s, "| `{}` | {} |", arg_spec(a), arg_help(a));
    }
    let (mut names, mut unexplained) = (BTreeSet::new(), Vec::new());
    render_command(&cmd, "citygw", &mut s, &mut names, &mut unexplained);
    assert!(
        unexplained.is_empty(),
        "CLI commands or arguments without a `///` comment in gateway/src/cli (their --help and \
         the reference page would be empty): {unexplained:?}"
    );
    s.push('\n');
    check_block("cli.md", "cli", &s, &names);
}

//! CLI output: aligned tables for people, JSON for scripts (field names as in the .proto files).

use std::path::Path;

use base64::Engine;
use serde_json::{json, Value};

use super::Format;
use crate::pipeline::protocol_label;
use crate::proto::{
    reading, AgencyInfo, ClusterStatusResponse, DeadLetter, Device, ImportResult,
    Lwm2mRegistration, OperatorInfo, Protocol, Reading, SinkState,
};

pub struct Output {
    format: Format,
}

fn device_json(d: &Device) -> Value {
    json!({
        "id": d.id, "tenant": d.tenant, "kind": d.kind, "commune_code": d.commune_code,
        "lat": d.lat, "lon": d.lon, "enabled": d.enabled, "created_time_ms": d.created_time_ms,
        "last_seen_time_ms": d.last_seen_time_ms, "name": d.name, "online": d.online,
        "dev_eui": d.dev_eui, "codec": d.codec, "has_psk": d.has_psk,
        "cert_sha256": d.cert_sha256,
        "protocol": device_protocol(d),
    })
}

/// The protocol a device last reported over; "" when it never did.
fn device_protocol(d: &Device) -> &'static str {
    match d.protocol {
        0 => "",
        p => protocol(p),
    }
}

fn operator_json(o: &OperatorInfo) -> Value {
    json!({"name": o.name, "created_time_ms": o.created_time_ms, "from_config": o.from_config})
}

fn agency_json(a: &AgencyInfo) -> Value {
    json!({
        "name": a.name, "tenants": a.tenants, "kinds": a.kinds, "kpi": a.kpi,
        "control": a.control, "from_config": a.from_config,
    })
}

fn value_json(v: &Option<reading::Value>) -> Value {
    match v {
        Some(reading::Value::Number(n)) => json!(n),
        Some(reading::Value::Boolean(b)) => json!(b),
        Some(reading::Value::Text(s)) => json!(s),
        None => Value::Null,
    }
}

fn protocol(p: i32) -> &'static str {
    protocol_label(Protocol::try_from(p).unwrap_or(Protocol::Unspecified))
}

fn reading_json(r: &Reading) -> Value {
    json!({
        "id": r.id, "device_id": r.device_id, "tenant": r.tenant, "quantity": r.quantity,
        "value": value_json(&r.value), "unit": r.unit, "device_time_ms": r.device_time_ms,
        "received_time_ms": r.received_time_ms, "protocol": protocol(r.protocol),
        "commune_code": r.commune_code, "kind": r.kind, "device_seq": r.device_seq,
        "location": r.location.as_ref().map(|l| json!({"lat": l.lat, "lon": l.lon, "alt_m": l.alt_m})),
    })
}

fn dead_letter_json(d: &DeadLetter) -> Value {
    json!({
        "id": d.id, "received_time_ms": d.received_time_ms, "device_id": d.device_id,
        "protocol": protocol(d.protocol), "reason": d.reason, "detail": d.detail, "address": d.address,
        "payload_size": d.payload_size,
        "payload_head_base64": base64::engine::general_purpose::STANDARD.encode(&d.payload_head),
    })
}

pub(super) fn time(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
    )
}

/// Prints rows with columns padded to their widest cell.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

impl Output {
    pub fn new(format: Format) -> Self {
        Self { format }
    }

    fn json(&self, v: Value) {
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("json serialises")
        );
    }

    pub fn added(&self, d: &Device, secret: &str, psk: &str) {
        match self.format {
            Format::Json if psk.is_empty() => {
                self.json(json!({"device": device_json(d), "secret": secret}))
            }
            Format::Json => {
                self.json(json!({"device": device_json(d), "secret": secret, "psk": psk}))
            }
            Format::Table => {
                self.device(d);
                println!("\nsecret: {secret}\n(shown once; the gateway keeps only a salted hash)");
                if !psk.is_empty() {
                    println!(
                        "psk: {psk}\n(DTLS identity: {}; keep it as safe as the secret)",
                        d.id
                    );
                }
            }
        }
    }

    pub fn device(&self, d: &Device) {
        match self.format {
            Format::Json => self.json(device_json(d)),
            Format::Table => self.devices(std::slice::from_ref(d)),
        }
    }

    pub fn devices(&self, devices: &[Device]) {
        match self.format {
            Format::Json => self.json(Value::Array(devices.iter().map(device_json).collect())),
            Format::Table => table(
                &[
                    "id",
                    "tenant",
                    "kind",
                    "commune",
                    "enabled",
                    "online",
                    "via",
                    "last seen",
                ],
                devices
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.clone(),
                            d.tenant.clone(),
                            d.kind.clone(),
                            d.commune_code.clone(),
                            d.enabled.to_string(),
                            d.online.to_string(),
                            device_protocol(d).to_string(),
                            time(d.last_seen_time_ms),
                        ]
                    })
                    .collect(),
            ),
        }
    }

    pub fn import_results(&self, results: &[ImportResult]) {
        match self.format {
            Format::Json => self.json(Value::Array(
                results
                    .iter()
                    .map(|r| json!({"device_id": r.device_id, "ok": r.ok, "error": r.error, "secret": r.secret}))
                    .collect(),
            )),
            Format::Table => {
                let ok = results.iter().filter(|r| r.ok).count();
                for r in results.iter().filter(|r| !r.ok) {
                    println!("{}: {}", r.device_id, r.error);
                }
                println!("{ok} imported, {} failed", results.len() - ok);
            }
        }
    }

    pub fn readings(&self, readings: &[Reading]) {
        match self.format {
            Format::Json => self.json(Value::Array(readings.iter().map(reading_json).collect())),
            Format::Table => table(
                &["id", "device time", "quantity", "value", "unit", "protocol"],
                readings
                    .iter()
                    .map(|r| {
                        vec![
                            r.id.to_string(),
                            time(r.device_time_ms),
                            r.quantity.clone(),
                            value_json(&r.value).to_string(),
                            r.unit.clone(),
                            protocol(r.protocol).to_string(),
                        ]
                    })
                    .collect(),
            ),
        }
    }

    pub fn dead_letters(&self, dls: &[DeadLetter]) {
        match self.format {
            Format::Json => self.json(Value::Array(dls.iter().map(dead_letter_json).collect())),
            Format::Table => table(
                &[
                    "id", "received", "device", "protocol", "reason", "address", "bytes", "detail",
                ],
                dls.iter()
                    .map(|d| {
                        vec![
                            d.id.to_string(),
                            time(d.received_time_ms),
                            d.device_id.clone(),
                            protocol(d.protocol).to_string(),
                            d.reason.clone(),
                            d.address.clone(),
                            d.payload_size.to_string(),
                            d.detail.chars().take(80).collect(),
                        ]
                    })
                    .collect(),
            ),
        }
    }

    pub fn agency_added(&self, a: &AgencyInfo, token: &str) {
        match self.format {
            Format::Json => self.json(json!({"agency": agency_json(a), "token": token})),
            Format::Table => {
                self.agencies(std::slice::from_ref(a));
                println!("\ntoken: {token}\n(shown once; the gateway keeps only its SHA-256)");
            }
        }
    }

    pub fn operator_added(&self, o: &OperatorInfo, token: &str) {
        match self.format {
            Format::Json => self.json(json!({"operator": operator_json(o), "token": token})),
            Format::Table => {
                self.operators(std::slice::from_ref(o));
                println!("\ntoken: {token}\n(shown once; the gateway keeps only its SHA-256)");
            }
        }
    }

    pub fn operators(&self, operators: &[OperatorInfo]) {
        match self.format {
            Format::Json => self.json(Value::Array(operators.iter().map(operator_json).collect())),
            Format::Table => table(
                &["name", "created", "source"],
                operators
                    .iter()
                    .map(|o| {
                        vec![
                            o.name.clone(),
                            time(o.created_time_ms),
                            if o.from_config { "config" } else { "api" }.to_string(),
                        ]
                    })
                    .collect(),
            ),
        }
    }

    pub fn agencies(&self, agencies: &[AgencyInfo]) {
        match self.format {
            Format::Json => self.json(Value::Array(agencies.iter().map(agency_json).collect())),
            Format::Table => table(
                &["name", "tenants", "kinds", "kpi", "control", "source"],
                agencies
                    .iter()
                    .map(|a| {
                        vec![
                            a.name.clone(),
                            a.tenants.join(","),
                            a.kinds.join(","),
                            a.kpi.to_string(),
                            a.control.to_string(),
                            if a.from_config { "config" } else { "api" }.to_string(),
                        ]
                    })
                    .collect(),
            ),
        }
    }

    pub fn sinks(&self, sinks: &[SinkState]) {
        match self.format {
            Format::Json => self.json(Value::Array(
                sinks
                    .iter()
                    .map(|s| {
                        json!({
                            "name": s.name, "kind": s.kind, "cursor": s.cursor, "last_reading_id": s.last_reading_id,
                            "lag_readings": s.lag_readings, "lag_seconds": s.lag_seconds, "last_success_ms": s.last_success_ms,
                        })
                    })
                    .collect(),
            )),
            Format::Table => table(
                &["sink", "kind", "delivered up to", "lag (readings)", "lag (s)", "last success"],
                sinks
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.kind.clone(),
                            s.cursor.to_string(),
                            s.lag_readings.to_string(),
                            format!("{:.1}", s.lag_seconds),
                            time(s.last_success_ms),
                        ]
                    })
                    .collect(),
            ),
        }
    }

    pub fn cluster(&self, c: &ClusterStatusResponse) {
        if let Format::Json = self.format {
            let nodes: Vec<Value> = c
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "name": n.name, "version": n.version, "started_time_ms": n.started_time_ms,
                        "seen_time_ms": n.seen_time_ms, "applied_sequence": n.applied_sequence,
                        "lag_messages": n.lag_messages, "healthy": n.healthy, "problem": n.problem,
                        "this_node": n.this_node,
                    })
                })
                .collect();
            let replicas: Vec<Value> = c.stream_replicas.iter().map(|r| json!({
                "name": r.name, "leader": r.leader, "current": r.current, "offline": r.offline,
                "lag": r.lag, "active_seconds": r.active_seconds,
            })).collect();
            let leases: Vec<Value> = c
                .sink_leases
                .iter()
                .map(|l| json!({"sink": l.sink, "node": l.node}))
                .collect();
            return self.json(json!({
                "backend": c.backend, "node": c.node, "healthy": c.healthy, "problem": c.problem,
                "nats_server": c.nats_server, "stream": c.stream, "replicas": c.replicas,
                "leader": c.leader, "messages": c.messages, "bytes": c.bytes,
                "first_sequence": c.first_sequence, "last_sequence": c.last_sequence,
                "stream_replicas": replicas, "nodes": nodes, "sink_leases": leases,
            }));
        }
        if c.backend != "jetstream" {
            println!("backend: {} (single node)", c.backend);
            return;
        }
        let health = if c.healthy {
            "healthy".to_string()
        } else {
            format!("NOT READY: {}", c.problem)
        };
        println!(
            "node {} via NATS server {}: {health}",
            c.node, c.nats_server
        );
        println!(
            "stream {}: R{}, leader {}, {} messages, {} bytes, sequences {}..{}",
            c.stream, c.replicas, c.leader, c.messages, c.bytes, c.first_sequence, c.last_sequence
        );
        table(
            &["replica", "role", "current", "offline", "lag", "active (s)"],
            c.stream_replicas
                .iter()
                .map(|r| {
                    vec![
                        r.name.clone(),
                        if r.leader { "leader" } else { "follower" }.into(),
                        r.current.to_string(),
                        r.offline.to_string(),
                        r.lag.to_string(),
                        format!("{:.1}", r.active_seconds),
                    ]
                })
                .collect(),
        );
        table(
            &[
                "citygw node",
                "healthy",
                "applied",
                "lag (messages)",
                "started",
                "seen",
                "problem",
            ],
            c.nodes
                .iter()
                .map(|n| {
                    vec![
                        if n.this_node {
                            format!("{} (this)", n.name)
                        } else {
                            n.name.clone()
                        },
                        n.healthy.to_string(),
                        n.applied_sequence.to_string(),
                        n.lag_messages.to_string(),
                        time(n.started_time_ms),
                        time(n.seen_time_ms),
                        n.problem.clone(),
                    ]
                })
                .collect(),
        );
        if !c.sink_leases.is_empty() {
            table(
                &["lease", "held by"],
                c.sink_leases
                    .iter()
                    .map(|l| vec![l.sink.clone(), l.node.clone()])
                    .collect(),
            );
        }
    }

    pub fn lwm2m_registrations(&self, regs: &[Lwm2mRegistration]) {
        match self.format {
            Format::Json => self.json(Value::Array(
                regs.iter()
                    .map(|r| {
                        json!({
                            "id": r.id, "device_id": r.device_id, "address": r.address,
                            "lifetime_s": r.lifetime_s, "lwm2m_version": r.lwm2m_version,
                            "objects": r.objects, "registered_time_ms": r.registered_time_ms,
                            "updated_time_ms": r.updated_time_ms, "last_error": r.last_error,
                            "secure": r.secure, "binding": r.binding, "queue_mode": r.queue_mode,
                        })
                    })
                    .collect(),
            )),
            Format::Table => table(
                &[
                    "device",
                    "registration",
                    "address",
                    "lifetime (s)",
                    "objects",
                    "updated",
                    "last error",
                ],
                regs.iter()
                    .map(|r| {
                        vec![
                            r.device_id.clone(),
                            r.id.clone(),
                            r.address.clone(),
                            r.lifetime_s.to_string(),
                            r.objects.join(" "),
                            time(r.updated_time_ms),
                            r.last_error.clone(),
                        ]
                    })
                    .collect(),
            ),
        }
    }

    pub fn quantities(&self) {
        let known = crate::pipeline::normalise::KNOWN_QUANTITIES;
        match self.format {
            Format::Json => self.json(Value::Array(
                known
                    .iter()
                    .map(|q| json!({"name": q.name, "unit": q.unit, "aliases": q.aliases, "description": q.description}))
                    .collect(),
            )),
            Format::Table => table(
                &["quantity", "unit", "aliases", "description"],
                known
                    .iter()
                    .map(|q| vec![q.name.into(), q.unit.into(), q.aliases.join(", "), q.description.into()])
                    .collect(),
            ),
        }
    }
}

/// id,secret for every imported device, readable by the owner only.
pub fn write_secrets(path: &Path, results: &[ImportResult]) -> anyhow::Result<()> {
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut w = csv::Writer::from_writer(options.open(path)?);
    w.write_record(["id", "secret"])?;
    for r in results.iter().filter(|r| r.ok) {
        w.write_record([&r.device_id, &r.secret])?;
    }
    w.flush()?;
    Ok(w.into_inner()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .sync_all()?)
}

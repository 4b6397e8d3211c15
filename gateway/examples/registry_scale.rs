//! Registry at city scale: the measuring half of bench/registry_scale (the script runs it, also
//! built from an older commit for the before/after rows, so it uses only the registry's long-
//! standing public API). Not part of the product.
//!
//!     registry_scale import --devices 1000000 --dir D --secrets S.csv   # fresh store, JSON out
//!     registry_scale probe --dir D --secrets S.csv                      # a restart, JSON out
//!
//! `import` registers `--devices` devices through `Registry::import` in chunks of 50,000 (the
//! admin API's limit per call, the path `citygw device import` takes), showing progress, and
//! keeps every `--sample-every`-th generated secret. `probe` is the restart: it loads the
//! registry from the store, then times authentication with the sampled secrets, the
//! per-reading identity lookup (`Registry::get`) of random devices, one KPI-style pass over
//! every device, and, as the floor of a disk-backed registry, point reads of device records
//! straight from the store's engine. RSS comes from /proc/self/status.
//!
//! The device mix (deterministic, by index): 90 % short ids (`hn-000001234`), 10 % 28-byte URNs;
//! four tenants; every kind; 80 % with a Hà Nội commune code, 15 % with coordinates, 5 % with
//! both; 20 % LoRaWAN (DevEUI, codec lpp); 10 % named; 2 % with a DTLS PSK. Secrets are
//! generated (operator-chosen secrets would cost Argon2 at import).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use citygw::kpi::geo::Geo;
use citygw::registry::{psk::Sealer, NewDevice, Registry, KINDS};
use citygw::store::{Store, StoreOptions};
use rand::{Rng, SeedableRng};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CHUNK: usize = 50_000;
const TENANTS: &[&str] = &["hanoi-env", "hanoi-transport", "hanoi-water", "hanoi-power"];

#[derive(clap::Parser)]
enum Cli {
    /// A fresh store with `--devices` devices; the sampled secrets to `--secrets`.
    Import {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        secrets: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        devices: usize,
        /// Keep every n-th secret (default: 20,000 samples).
        #[arg(long)]
        sample_every: Option<usize>,
    },
    /// A restart of the store in `--dir`, then the latencies.
    Probe {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        secrets: PathBuf,
        #[arg(long, default_value_t = 200_000)]
        auths: usize,
        #[arg(long, default_value_t = 1_000_000)]
        lookups: usize,
        #[arg(long, default_value_t = 100_000)]
        reads: usize,
    },
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn device_id(i: usize) -> String {
    if i % 10 == 9 {
        format!("urn:dev:mac:{:016x}", 0x70b3_d500_0000_0000u64 + i as u64)
    } else {
        format!("hn-{i:09}")
    }
}

fn device(i: usize, communes: &[(String, f64, f64)]) -> NewDevice {
    let (code, lat, lon) = &communes[i % communes.len()];
    let (commune_code, lat, lon) = match i % 20 {
        0..16 => (code.clone(), None, None),
        16..19 => (String::new(), Some(lat + 0.0011), Some(lon - 0.0007)),
        _ => (code.clone(), Some(*lat), Some(*lon)),
    };
    NewDevice {
        id: device_id(i),
        tenant: TENANTS[i % TENANTS.len()].into(),
        kind: KINDS[i % KINDS.len()].into(),
        commune_code,
        lat,
        lon,
        name: if i % 10 == 3 {
            format!("Trạm {i}")
        } else {
            String::new()
        },
        secret: None,
        dev_eui: if i % 5 == 1 {
            format!("70b3d57ed{i:07x}")
        } else {
            String::new()
        },
        codec: if i % 5 == 1 {
            "lpp".into()
        } else {
            String::new()
        },
        psk: (i % 50 == 7).then(|| format!("psk-of-device-{i:012}")),
        cert_sha256: None,
    }
}

fn store_options() -> StoreOptions {
    StoreOptions {
        commit_window: Duration::ZERO,
        max_batch: 8192,
        retention: Duration::from_secs(86_400),
        ..StoreOptions::default()
    }
}

fn percentiles(mut ns: Vec<u64>) -> serde_json::Value {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize];
    let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
    json!({"count": ns.len(), "p50_ns": at(0.5), "p99_ns": at(0.99), "max_ns": at(1.0), "mean_ns": mean.round()})
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match <Cli as clap::Parser>::parse() {
        Cli::Import {
            dir,
            secrets,
            devices,
            sample_every,
        } => {
            let every = sample_every.unwrap_or((devices / 20_000).max(1));
            import(&dir, &secrets, devices, every).await
        }
        Cli::Probe {
            dir,
            secrets,
            auths,
            lookups,
            reads,
        } => probe(&dir, &secrets, auths, lookups, reads).await,
    }
}

async fn import(dir: &Path, secrets: &Path, n: usize, sample_every: usize) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let communes: Vec<(String, f64, f64)> = Geo::embedded(25.0)
        .communes()
        .iter()
        .filter(|c| c.province == "01")
        .map(|c| (c.code.clone(), c.lat, c.lon))
        .collect();
    let rss_start = rss_bytes();
    let store = Store::open(dir, store_options())?;
    let registry = Registry::load(store.clone())?;
    registry.set_psk_sealer(Sealer::new([7; 32]));
    let mut out = std::io::BufWriter::new(std::fs::File::create(secrets)?);
    writeln!(out, "id,secret")?;
    let started = Instant::now();
    let mut done = 0;
    while done < n {
        let end = (done + CHUNK).min(n);
        let news = (done..end).map(|i| device(i, &communes)).collect();
        for (i, r) in (done..end).zip(registry.import(news, 1_795_400_000_000).await?) {
            let (dev, secret) = r?;
            if i % sample_every == 0 {
                writeln!(out, "{},{secret}", dev.id)?;
            }
        }
        done = end;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "imported {done}/{n} devices in {secs:.1} s ({:.0}/s), RSS {} MiB",
            done as f64 / secs,
            rss_bytes() >> 20
        );
    }
    out.flush()?;
    let import_secs = started.elapsed().as_secs_f64();
    let rss_imported = rss_bytes();
    store.close().await;
    println!(
        "{}",
        json!({
            "devices": n,
            "import_secs": import_secs,
            "import_per_sec": n as f64 / import_secs,
            "rss_start_bytes": rss_start,
            "rss_after_import_bytes": rss_imported,
            "bytes_per_device_after_import": (rss_imported - rss_start) as f64 / n.max(1) as f64,
        })
    );
    Ok(())
}

async fn probe(
    dir: &Path,
    secrets: &Path,
    auths: usize,
    lookups: usize,
    reads: usize,
) -> anyhow::Result<()> {
    let rss_start = rss_bytes();
    let started = Instant::now();
    let store = Store::open(dir, store_options())?;
    let rss_store = rss_bytes();
    let registry = Registry::load(store.clone())?;
    let load_secs = started.elapsed().as_secs_f64();
    let rss_loaded = rss_bytes();
    let n = registry.len();
    anyhow::ensure!(n > 0, "no devices in {}", dir.display());

    let mut sample: Vec<(String, String)> = csv::Reader::from_path(secrets)?
        .deserialize()
        .collect::<Result<_, _>>()?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    sample.sort_by_cached_key(|_| rng.random::<u64>());

    // Authentication, each call timed (the secret check of every CONNECT).
    let mut auth_ns = Vec::with_capacity(auths);
    for (id, secret) in sample.iter().cycle().take(auths) {
        let t = Instant::now();
        let ok = registry.authenticate(id, Some(secret.as_bytes())).await;
        auth_ns.push(t.elapsed().as_nanos() as u64);
        anyhow::ensure!(ok.is_ok(), "{id} did not authenticate");
    }

    // The per-reading identity lookup of random devices: each call timed (the timer's own
    // ~20-40 ns is in every figure, in both builds alike), and the mean of an untimed loop.
    let ids: Vec<String> = (0..lookups)
        .map(|_| device_id(rng.random_range(0..n)))
        .collect();
    let mut get_ns = Vec::with_capacity(lookups);
    for id in &ids {
        let t = Instant::now();
        let d = registry.get(id);
        get_ns.push(t.elapsed().as_nanos() as u64);
        anyhow::ensure!(d.is_some(), "{id} not found");
    }
    let t = Instant::now();
    let found = ids.iter().filter(|id| registry.get(id).is_some()).count();
    let get_loop_ns = t.elapsed().as_nanos() as f64 / lookups as f64;
    anyhow::ensure!(found == lookups);

    // One pass over every device, as the KPI makes.
    let t = Instant::now();
    let mut active = 0usize;
    registry.for_each(|d| {
        if d.enabled() && d.last_seen_ms() >= 0 {
            active += 1;
        }
    });
    let scan_secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(active == n);

    // The disk-backed alternative's floor: a device record read (and its JSON decoded) from
    // the engine, per lookup.
    drop(registry);
    store.close().await;
    drop(store);
    let db = fjall::Database::builder(dir).open()?;
    let devices = db.keyspace("devices", fjall::KeyspaceCreateOptions::default)?;
    let mut read_ns = Vec::with_capacity(reads);
    for id in ids.iter().take(reads) {
        let t = Instant::now();
        let bytes = devices.get(id)?;
        let record: Option<serde_json::Value> =
            bytes.map(|b| serde_json::from_slice(&b)).transpose()?;
        read_ns.push(t.elapsed().as_nanos() as u64);
        anyhow::ensure!(record.is_some(), "{id} not stored");
    }

    println!(
        "{}",
        json!({
            "devices": n,
            "load_secs": load_secs,
            "rss_start_bytes": rss_start,
            "rss_store_open_bytes": rss_store,
            "rss_loaded_bytes": rss_loaded,
            "bytes_per_device_process": (rss_loaded - rss_start) as f64 / n as f64,
            "bytes_per_device_registry": (rss_loaded - rss_store) as f64 / n as f64,
            "auth": percentiles(auth_ns),
            "lookup": percentiles(get_ns),
            "lookup_loop_mean_ns": get_loop_ns,
            "scan_secs": scan_secs,
            "disk_read": percentiles(read_ns),
        })
    );
    Ok(())
}

//! Appends ~100-byte records in group commits of 1, 16, 128 and 1024 records, one fsync per
//! commit, for each engine, and prints records/s and commits/s as a Markdown table.
//!
//! Usage: `store-engines [DATA_DIR] [SECONDS_PER_CELL]`. DATA_DIR must be on the disk under test
//! (not tmpfs); defaults to ./store-engines-data.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VALUE_LEN: usize = 100;
const BATCHES: [usize; 4] = [1, 16, 128, 1024];

/// One engine under test: opens a fresh store in `dir` and appends batches until told to stop.
trait Engine {
    fn name(&self) -> &'static str;
    /// Appends `batch` records with keys `first..first+batch`, one durable commit.
    fn commit(&mut self, first: u64, batch: usize, value: &[u8]);
}

struct Fjall {
    db: fjall::Database,
    log: fjall::Keyspace,
}

impl Fjall {
    fn open(dir: &Path) -> Self {
        let db = fjall::Database::builder(dir).open().expect("fjall open");
        let log = db
            .keyspace("log", fjall::KeyspaceCreateOptions::default)
            .expect("fjall keyspace");
        Fjall { db, log }
    }
}

impl Engine for Fjall {
    fn name(&self) -> &'static str {
        "fjall 3 (batch + persist(SyncAll))"
    }
    fn commit(&mut self, first: u64, batch: usize, value: &[u8]) {
        let mut b = self.db.batch();
        for k in first..first + batch as u64 {
            b.insert(&self.log, k.to_be_bytes(), value);
        }
        b.commit().expect("fjall commit");
        self.db
            .persist(fjall::PersistMode::SyncAll)
            .expect("fjall persist");
    }
}

const REDB_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");

struct Redb {
    db: redb::Database,
}

impl Redb {
    fn open(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let db = redb::Database::create(dir.join("log.redb")).expect("redb open");
        Redb { db }
    }
}

impl Engine for Redb {
    fn name(&self) -> &'static str {
        "redb 4 (Durability::Immediate)"
    }
    fn commit(&mut self, first: u64, batch: usize, value: &[u8]) {
        let mut tx = self.db.begin_write().expect("redb begin");
        tx.set_durability(redb::Durability::Immediate)
            .expect("redb durability");
        {
            let mut t = tx.open_table(REDB_TABLE).expect("redb table");
            for k in first..first + batch as u64 {
                t.insert(k, value).expect("redb insert");
            }
        }
        tx.commit().expect("redb commit");
    }
}

struct Sqlite {
    conn: rusqlite::Connection,
}

impl Sqlite {
    fn open(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let conn = rusqlite::Connection::open(dir.join("log.sqlite")).expect("sqlite open");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.pragma_update(None, "synchronous", "FULL")
            .expect("sync full");
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, v BLOB NOT NULL)",
        )
        .expect("create");
        Sqlite { conn }
    }
}

impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        "SQLite (rusqlite bundled, WAL, synchronous=FULL)"
    }
    fn commit(&mut self, first: u64, batch: usize, value: &[u8]) {
        let tx = self.conn.transaction().expect("sqlite begin");
        {
            let mut st = tx
                .prepare_cached("INSERT INTO log (id, v) VALUES (?1, ?2)")
                .expect("prepare");
            for k in first..first + batch as u64 {
                st.execute(rusqlite::params![k as i64, value])
                    .expect("sqlite insert");
            }
        }
        tx.commit().expect("sqlite commit");
    }
}

struct Cell {
    records_per_s: f64,
    commits_per_s: f64,
}

fn run(engine: &mut dyn Engine, batch: usize, secs: f64) -> Cell {
    let value = vec![0x5au8; VALUE_LEN];
    let deadline = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut next = 1u64;
    let mut commits = 0u64;
    while start.elapsed() < deadline {
        engine.commit(next, batch, &value);
        next += batch as u64;
        commits += 1;
    }
    let el = start.elapsed().as_secs_f64();
    Cell {
        records_per_s: (next - 1) as f64 / el,
        commits_per_s: commits as f64 / el,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(args.next().unwrap_or_else(|| "store-engines-data".into()));
    let secs: f64 = args
        .next()
        .map(|s| s.parse().expect("seconds"))
        .unwrap_or(2.0);
    let _ = std::fs::remove_dir_all(&root);

    type Opener = fn(&Path) -> Box<dyn Engine>;
    let engines: [(&str, Opener); 3] = [
        ("fjall", |d| Box::new(Fjall::open(d))),
        ("redb", |d| Box::new(Redb::open(d))),
        ("sqlite", |d| Box::new(Sqlite::open(d))),
    ];

    let mut rows = Vec::new();
    // Interleave engines per batch size so background load drifts hit all of them alike.
    for &batch in &BATCHES {
        for (key, open) in &engines {
            let dir = root.join(format!("{key}-{batch}"));
            let mut e = open(&dir);
            let cell = run(e.as_mut(), batch, secs);
            eprintln!(
                "{:<8} batch {:>5}: {:>10.0} records/s {:>8.0} commits/s",
                key, batch, cell.records_per_s, cell.commits_per_s
            );
            rows.push((*key, e.name(), batch, cell));
            drop(e);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    println!("| engine | records/commit | records/s | commits/s |");
    println!("|---|---:|---:|---:|");
    for (key, _) in &engines {
        for (_, name, batch, c) in rows.iter().filter(|r| r.0 == *key) {
            println!(
                "| {name} | {batch} | {:.0} | {:.0} |",
                c.records_per_s, c.commits_per_s
            );
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

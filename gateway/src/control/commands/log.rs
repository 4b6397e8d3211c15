//! The durable command log: every command with its whole history, in the store's `commands`
//! table, written through the group commit (so a state change survives kill -9 once it is
//! acknowledged anywhere).
//!
//! Keys:
//! - `c/{id}`: the command (protobuf `Command`, history included). Ids are UUIDv7, so key order
//!   is creation order and listing newest-first is a reverse range scan.
//! - `o/{id}`: marks a command still open (not final); the gateway reloads only these at start.
//!
//! This is the one place the command state touches storage: a replicated backend replaces this
//! file, not the state machine. In cluster mode the log is still this node's own
//! (`put_local_records`): a command lives on the node that accepted it (see the book's
//! "Commands and alerts", cluster mode).

use prost::Message as _;

use crate::control::Aged;
use crate::proto::Command;
use crate::store::{Store, StoreError, Table};

const COMMAND: &str = "c/";
const OPEN: &str = "o/";

#[derive(Clone)]
pub struct CommandLog {
    store: Store,
}

/// One write of the log: the command as it now is, and whether it is still open.
pub struct Entry {
    pub command: Command,
    pub open: bool,
}

impl CommandLog {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// One durable commit of this node's store.
    async fn put(&self, records: Vec<(String, Option<Vec<u8>>)>) -> Result<(), StoreError> {
        self.store
            .put_local_records(Table::Commands, records, None)
            .await
    }

    /// Writes commands (and their open markers) in one durable commit.
    pub async fn save(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let mut records = Vec::with_capacity(entries.len() * 2);
        for e in entries {
            let id = &e.command.id;
            records.push((format!("{COMMAND}{id}"), Some(e.command.encode_to_vec())));
            records.push((format!("{OPEN}{id}"), e.open.then(Vec::new)));
        }
        self.put(records).await
    }

    pub fn get(&self, id: &str) -> Result<Option<Command>, StoreError> {
        self.store
            .get_record(Table::Commands, &format!("{COMMAND}{id}"))?
            .map(|bytes| decode(id, &bytes))
            .transpose()
    }

    /// Every open command, oldest first.
    pub fn load_open(&self) -> Result<Vec<Command>, StoreError> {
        let mut out = Vec::new();
        self.store
            .for_each_record(Table::Commands, OPEN, |key, _| {
                let id = &key[OPEN.len()..];
                match self.get(id)? {
                    Some(c) => out.push(c),
                    None => tracing::warn!(command = id, "open marker without its command"),
                }
                Ok(())
            })?;
        Ok(out)
    }

    /// Commands newest first, older than `before_id` (empty: from the newest), that `keep`
    /// accepts; at most `limit`, scanning at most `max_scan` records.
    pub fn list(
        &self,
        before_id: &str,
        limit: usize,
        max_scan: usize,
        mut keep: impl FnMut(&Command) -> bool,
    ) -> Result<Vec<Command>, StoreError> {
        let before = if before_id.is_empty() {
            String::new()
        } else {
            format!("{COMMAND}{before_id}")
        };
        self.store.newest_records(
            Table::Commands,
            COMMAND,
            &before,
            limit,
            max_scan,
            |key, bytes| {
                let c = decode(&key[COMMAND.len()..], bytes)?;
                Ok(keep(&c).then_some(c))
            },
        )
    }

    /// Deletes final commands created before `cutoff_ms` (retention), a page at a time;
    /// returns how many went. Open commands stay whatever their age (their TTL ends them).
    pub async fn expire(&self, cutoff_ms: i64) -> Result<usize, StoreError> {
        crate::control::expire_records(&self.store, Table::Commands, COMMAND, |id, bytes| {
            let c = decode(id, bytes)?;
            if c.created_time_ms >= cutoff_ms {
                return Ok(Aged::Stop);
            }
            let open = self
                .store
                .get_record(Table::Commands, &format!("{OPEN}{}", c.id))?
                .is_some();
            Ok(if open { Aged::Keep } else { Aged::Delete })
        })
        .await
    }
}

fn decode(id: &str, bytes: &[u8]) -> Result<Command, StoreError> {
    Command::decode(bytes).map_err(|e| StoreError::Corrupt(format!("command {id}: {e}")))
}

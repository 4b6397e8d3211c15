//! Dead letters: payloads the gateway refused, kept so an operator can see why data is missing.

use fjall::Slice;
use prost::Message as _;
use tokio::sync::oneshot;

use super::writer::Request;
use super::{keys, Store, StoreError};
use crate::proto::DeadLetter;

/// Decodes a `dead_letters` value and puts back the id kept in its key.
pub(super) fn decode(key: &[u8], value: &[u8]) -> Result<DeadLetter, StoreError> {
    let id = keys::parse_id(key).ok_or_else(|| StoreError::Corrupt("dead letter key".into()))?;
    let mut dl = DeadLetter::decode(value)
        .map_err(|e| StoreError::Corrupt(format!("dead letter {id}: {e}")))?;
    dl.id = id;
    Ok(dl)
}

impl Store {
    /// Records a refused payload durably (same group commit as readings) and returns its id.
    /// Durable because a device's missing data must stay explainable after a crash.
    pub async fn dead_letter(&self, mut dl: DeadLetter) -> Result<u64, StoreError> {
        dl.id = 0; // the id lives in the key
        let (done, reply) = oneshot::channel();
        self.submit(Request::DeadLetter {
            value: Slice::from(dl.encode_to_vec()),
            done,
        })
        .await?;
        reply.await.map_err(|_| StoreError::Closed)?
    }

    /// A page of dead letters with id > `after_id`, oldest first (page on with the last id),
    /// optionally for one device only.
    ///
    /// The device filter scans: dead letters are few (bounded by retention) and an extra index
    /// would cost every write.
    pub fn dead_letters(
        &self,
        device_id: Option<&str>,
        after_id: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let Some(start) = after_id.checked_add(1) else {
            return Ok(Vec::new());
        };
        let engine = self.engine()?;
        collect(
            engine.ks.dead_letters.range(keys::id_key(start)..),
            device_id,
            limit,
        )
    }

    /// A page of dead letters with id < `before_id` (0: from the newest), newest first: what an
    /// operator looks at first.
    pub fn dead_letters_newest(
        &self,
        device_id: Option<&str>,
        before_id: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let end = if before_id == 0 { u64::MAX } else { before_id };
        let engine = self.engine()?;
        collect(
            engine.ks.dead_letters.range(..keys::id_key(end)).rev(),
            device_id,
            limit,
        )
    }
}

fn collect(
    guards: impl Iterator<Item = fjall::Guard>,
    device_id: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    for guard in guards {
        let (key, value) = guard.into_inner()?;
        let dl = decode(&key, &value)?;
        if device_id.is_some_and(|d| d != dl.device_id) {
            continue;
        }
        out.push(dl);
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

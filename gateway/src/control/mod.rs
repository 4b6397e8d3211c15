//! Acting on data: commands to devices with a tracked fate, and alert rules over the readings.
//!
//! Beside the data path, not in it: [`commands`] takes requests from the Control API (and from
//! rule actions), keeps each command's fate in a durable log and hands it to the device through
//! the transport of the way the device is connected (sources hand their outbound half to it).
//! Rules read committed readings after the fact, so no acknowledgement ever waits on a rule.

pub mod commands;
pub mod rules;

use crate::store::{Store, StoreError, Table};

/// What a retention pass does with one record of a log.
pub(crate) enum Aged {
    Delete,
    Keep,
    /// Created after the cutoff: this record and every later one stay.
    Stop,
}

/// Deletes, a page at a time, the records under `prefix` that `verdict` calls old (it gets the
/// key without the prefix and the value); keys are in creation order, so the pass ends at the
/// first [`Aged::Stop`]. Returns how many went. The command and alert logs' retention.
pub(crate) async fn expire_records(
    store: &Store,
    table: Table,
    prefix: &str,
    mut verdict: impl FnMut(&str, &[u8]) -> Result<Aged, StoreError>,
) -> Result<usize, StoreError> {
    const PAGE: usize = 1000;
    let mut deleted = 0;
    let mut after = String::new();
    loop {
        let page = store.records_with_prefix(table, prefix, &after, false, PAGE)?;
        let Some((last, _)) = page.last() else {
            return Ok(deleted);
        };
        after = last.clone();
        let mut gone = Vec::new();
        let mut reached_cutoff = page.len() < PAGE;
        for (key, bytes) in &page {
            match verdict(&key[prefix.len()..], bytes)? {
                Aged::Stop => {
                    reached_cutoff = true;
                    break;
                }
                Aged::Delete => gone.push((key.clone(), None)),
                Aged::Keep => {}
            }
        }
        deleted += gone.len();
        if !gone.is_empty() {
            store.put_local_records(table, gone, None).await?;
        }
        if reached_cutoff {
            return Ok(deleted);
        }
    }
}

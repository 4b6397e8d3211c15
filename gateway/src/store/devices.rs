//! Registry persistence: the registry owns the record format, the store only keeps the bytes.

use tokio::sync::oneshot;

use super::writer::Request;
use super::{Store, StoreError};

impl Store {
    /// Stores one registry record, fsync'd before returning: a provisioned device must survive
    /// a crash together with the readings it is about to send.
    pub async fn put_device(&self, id: &str, record: Vec<u8>) -> Result<(), StoreError> {
        self.put_devices(vec![(id.to_owned(), record)]).await
    }

    /// Stores many registry records in one commit (bulk import): all or none.
    pub async fn put_devices(&self, records: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let (done, reply) = oneshot::channel();
        self.submit(Request::Devices { records, done }).await?;
        reply.await.map_err(|_| StoreError::Closed)?
    }

    /// Every registry record, ordered by device id; the registry loads them once at start.
    pub fn load_devices(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.inner
            .ks
            .devices
            .iter()
            .map(|guard| {
                let (key, value) = guard.into_inner()?;
                let id = String::from_utf8(key.to_vec())
                    .map_err(|_| StoreError::Corrupt("device id is not UTF-8".into()))?;
                Ok((id, value.to_vec()))
            })
            .collect()
    }
}

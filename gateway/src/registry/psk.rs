//! DTLS pre-shared keys: generated or chosen per device, kept sealed at rest.
//!
//! Unlike the device secret, which is only ever verified and so is stored as a hash, a PSK must
//! be known to the gateway itself to complete a DTLS handshake. It is stored encrypted with
//! AES-256-GCM under a key file kept apart from the store (`<data_dir>/psk.key` by default, or
//! `coap.psk_key_file`), with the device id as associated data so a sealed key cannot be moved
//! to another device's record. See docs/decisions/0004-dtls.md.

use std::path::Path;

use base64::Engine;
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use rand::RngCore;

const PREFIX: &str = "aes256gcm$";
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// PSK length bounds (bytes): libcoap and tinydtls accept up to 64.
pub const MIN_LEN: usize = 16;
pub const MAX_LEN: usize = 64;

/// A new random PSK: 24 random bytes as 32 URL-safe characters, used as the key's bytes (so it
/// can be typed into `coap-client -k` and device configuration as text).
pub fn generate() -> String {
    super::secret::generate()
}

pub fn validate(psk: &str) -> Result<(), String> {
    if (MIN_LEN..=MAX_LEN).contains(&psk.len()) && psk.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!(
            "psk: {MIN_LEN} to {MAX_LEN} printable ASCII characters"
        ))
    }
}

/// The key that seals PSKs at rest.
#[derive(Clone)]
pub struct Sealer {
    key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// Reads the key file, creating it (32 random bytes, hex, mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Sealer> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim())
                    .map_err(|e| anyhow::anyhow!("psk key file {}: {e}", path.display()))?;
                let key: [u8; 32] = bytes.try_into().map_err(|_| {
                    anyhow::anyhow!("psk key file {}: 64 hex digits expected", path.display())
                })?;
                Ok(Sealer::new(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                crate::config::write_private(path, &hex::encode(key))
                    .map_err(|e| anyhow::anyhow!("psk key file {}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), "generated the psk sealing key");
                Ok(Sealer::new(key))
            }
            Err(e) => Err(anyhow::anyhow!("psk key file {}: {e}", path.display())),
        }
    }

    pub fn seal(&self, device_id: &str, psk: &[u8]) -> String {
        let mut iv = [0u8; IV_LEN];
        rand::rng().fill_bytes(&mut iv);
        let mut tag = [0u8; TAG_LEN];
        let ct = encrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key,
            Some(&iv),
            device_id.as_bytes(),
            psk,
            &mut tag,
        )
        .expect("AES-256-GCM with a 32-byte key and 12-byte iv encrypts");
        let mut out = iv.to_vec();
        out.extend_from_slice(&ct);
        out.extend_from_slice(&tag);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(out)
        )
    }

    /// The PSK, or `None` when the record was sealed under another key or for another device.
    pub fn open(&self, device_id: &str, sealed: &str) -> Option<Vec<u8>> {
        let raw = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(sealed.strip_prefix(PREFIX)?)
            .ok()?;
        if raw.len() < IV_LEN + TAG_LEN {
            return None;
        }
        let (iv, rest) = raw.split_at(IV_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        decrypt_aead(
            Cipher::aes_256_gcm(),
            &self.key,
            Some(iv),
            device_id.as_bytes(),
            ct,
            tag,
        )
        .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_for_their_device_and_key() {
        let s = Sealer::new([7; 32]);
        let sealed = s.seal("dev-1", b"0123456789abcdef");
        assert!(!sealed.contains("0123456789abcdef"));
        assert_eq!(
            s.open("dev-1", &sealed).as_deref(),
            Some(&b"0123456789abcdef"[..])
        );
        assert_eq!(s.open("dev-2", &sealed), None);
        assert_eq!(Sealer::new([8; 32]).open("dev-1", &sealed), None);
        assert_eq!(s.open("dev-1", "aes256gcm$AAAA"), None);
    }

    #[test]
    fn key_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk.key");
        let a = Sealer::load_or_create(&path).unwrap();
        let b = Sealer::load_or_create(&path).unwrap();
        assert_eq!(a.key, b.key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn generated_psks_are_valid() {
        assert!(validate(&generate()).is_ok());
        assert!(validate("short").is_err());
        assert!(validate("has a space in it, see").is_err());
    }
}

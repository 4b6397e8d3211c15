//! Which device a client certificate names, and its fingerprint for pinning.
//!
//! One reading for every listener that takes device certificates (MQTT on the mTLS port, CoAPS
//! in X.509 mode): the identity is the subject's common name, or one configured kind of
//! subjectAltName, and it must equal the client id / endpoint, which is the device id.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Where a device certificate carries the device id (`tls.device_identity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum IdentityField {
    /// The subject's common name (CN), the usual place.
    #[default]
    Cn,
    /// The certificate's one subjectAltName of type dNSName.
    SanDns,
    /// The certificate's one subjectAltName of type uniformResourceIdentifier.
    SanUri,
}

/// What the gateway takes from a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The device id the certificate names.
    pub device_id: String,
    /// SHA-256 of the certificate (DER), what a device may be pinned to.
    pub fingerprint: [u8; 32],
    /// Serial number, hex, for logs.
    pub serial: String,
    /// The subject distinguished name, for logs.
    pub subject: String,
}

/// SHA-256 of a certificate's DER encoding.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Reads the device identity of a certificate; the error says what is missing.
pub fn identity(der: &[u8], field: IdentityField) -> Result<CertIdentity, &'static str> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| "certificate does not parse")?;
    let device_id = match field {
        IdentityField::Cn => {
            let mut names = cert.subject().iter_common_name();
            let cn = names.next().ok_or("certificate subject has no CN")?;
            if names.next().is_some() {
                return Err("certificate subject has more than one CN");
            }
            cn.as_str()
                .map_err(|_| "certificate CN is not text")?
                .to_string()
        }
        IdentityField::SanDns | IdentityField::SanUri => {
            let san = cert
                .subject_alternative_name()
                .map_err(|_| "certificate subjectAltName is malformed")?
                .ok_or("certificate has no subjectAltName")?;
            let mut names = san
                .value
                .general_names
                .iter()
                .filter_map(|n| match (n, field) {
                    (GeneralName::DNSName(v), IdentityField::SanDns) => Some(*v),
                    (GeneralName::URI(v), IdentityField::SanUri) => Some(*v),
                    _ => None,
                });
            let name = names
                .next()
                .ok_or("certificate has no subjectAltName of the configured kind")?;
            if names.next().is_some() {
                return Err("certificate has several subjectAltNames of the configured kind");
            }
            name.to_string()
        }
    };
    if device_id.is_empty() {
        return Err("certificate names an empty identity");
    }
    Ok(CertIdentity {
        device_id,
        fingerprint: fingerprint(der),
        serial: cert.raw_serial_as_string(),
        subject: cert.subject().to_string(),
    })
}

/// Seconds since the Unix epoch when the certificate (DER) stops being valid.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// A fingerprint as operators write it: 64 hex digits, any case, `:` separators allowed.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(hex).ok()?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn common_name_and_subject_alt_names() {
        let der = cert(
            "aq-0001",
            vec![
                rcgen::SanType::DnsName("aq-0001.devices.city".try_into().unwrap()),
                rcgen::SanType::URI("urn:dev:aq-0001".try_into().unwrap()),
            ],
        );
        assert_eq!(
            identity(&der, IdentityField::Cn).unwrap().device_id,
            "aq-0001"
        );
        assert_eq!(
            identity(&der, IdentityField::SanDns).unwrap().device_id,
            "aq-0001.devices.city"
        );
        let id = identity(&der, IdentityField::SanUri).unwrap();
        assert_eq!(id.device_id, "urn:dev:aq-0001");
        assert_eq!(id.fingerprint, fingerprint(&der));
    }

    #[test]
    fn missing_or_ambiguous_names_are_refused() {
        let der = cert("aq-1", vec![]);
        assert!(identity(&der, IdentityField::SanDns).is_err());
        let two = cert(
            "aq-1",
            vec![
                rcgen::SanType::DnsName("a".try_into().unwrap()),
                rcgen::SanType::DnsName("b".try_into().unwrap()),
            ],
        );
        assert!(identity(&two, IdentityField::SanDns).is_err());
        assert!(identity(b"not a certificate", IdentityField::Cn).is_err());
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let f = [0xabu8; 32];
        let plain = hex::encode(f);
        let colons = f
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&plain), Some(f));
        assert_eq!(parse_fingerprint(&colons), Some(f));
        assert_eq!(parse_fingerprint("abcd"), None);
    }
}

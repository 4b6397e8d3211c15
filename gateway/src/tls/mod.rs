//! Transport security shared by the listeners: TLS 1.2 and 1.3 (rustls on ring) for MQTT, gRPC
//! and HTTP, the identity a device certificate carries, and certificates, client CAs and CRLs
//! that are reloaded while the listeners serve (SIGHUP, or a change of the files).
//!
//! Every TLS listener owns one [`ServerTls`]: a rustls configuration built once, whose
//! certificate resolver and client verifier read the material currently loaded, so a reload
//! swaps what new handshakes see and leaves established connections alone. CoAPS (DTLS) runs on
//! OpenSSL (`sources/coap/dtls.rs`) and takes part in the same reloads through [`Reloadable`].
//!
//! Why rustls and how the MQTT broker takes our configuration: docs/decisions/0020.

pub mod identity;
pub mod incoming;
mod reload;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

pub use reload::{Reloadable, Reloader};

/// The one crypto provider of the process. rustls panics when two providers are compiled in and
/// none is chosen, so `citygw` installs this one before anything builds a TLS configuration.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs [`provider`] as the process default (idempotent).
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A TLS client configuration (rustls on ring, TLS 1.2 and 1.3) that verifies servers against
/// the CA certificates in `ca_file`, or the system's roots when there is none: for the LoRaWAN
/// bridges' brokers and for device-sim.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A malformed system certificate is skipped, as browsers do.
                let _ = roots.add(cert);
            }
        }
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "no CA certificate to verify the server with (give a CA file)"
    );
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether a listener asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    /// Verified when presented; connections without one are served too.
    Optional,
    Required,
}

/// The files of one TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM: the server certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CA certificates client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    /// PEM: certificate revocation lists of those CAs.
    pub client_crl: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

impl TlsFiles {
    fn paths(&self) -> Vec<PathBuf> {
        let mut v = vec![self.cert.clone(), self.key.clone()];
        v.extend(self.client_ca.iter().cloned());
        v.extend(self.client_crl.iter().cloned());
        v
    }
}

/// A check a verified client certificate must also pass (its device identity, a pinned
/// fingerprint); the error is the refusal's reason label.
pub type CertCheck = Arc<dyn Fn(&CertificateDer<'_>) -> Result<(), &'static str> + Send + Sync>;

/// One TLS listener's rustls configuration, reloadable while it serves.
pub struct ServerTls {
    name: &'static str,
    files: TlsFiles,
    resolver: Arc<Resolver>,
    verifier: Option<Arc<Verifier>>,
    config: Arc<ServerConfig>,
}

impl ServerTls {
    /// Loads the files; `name` labels metrics and logs (`mqtt_tls`, `grpc`, ...); `alpn` lists
    /// the application protocols offered (`h2` for gRPC).
    pub fn new(
        name: &'static str,
        files: TlsFiles,
        alpn: &[&[u8]],
        check: Option<CertCheck>,
    ) -> anyhow::Result<Arc<ServerTls>> {
        let key = load_key(&files)?;
        let resolver = Arc::new(Resolver(RwLock::new(key)));
        let verifier = match files.client_auth {
            ClientAuth::None => None,
            auth => Some(Arc::new(Verifier {
                listener: name,
                mandatory: auth == ClientAuth::Required,
                inner: RwLock::new(client_verifier(&files)?),
                check,
            })),
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("TLS protocol versions")?;
        let builder = match &verifier {
            Some(v) => builder.with_client_cert_verifier(v.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(resolver.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tls = ServerTls {
            name,
            files,
            resolver,
            verifier,
            config: Arc::new(config),
        };
        tls.export_expiry();
        Ok(Arc::new(tls))
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.clone()
    }

    fn export_expiry(&self) {
        let key = self.resolver.current();
        if let Some(t) = key.cert.first().and_then(|c| identity::not_after(c)) {
            metrics::gauge!("citygw_tls_certificate_expiry_timestamp_seconds", "listener" => self.name)
                .set(t as f64);
        }
    }
}

impl Reloadable for ServerTls {
    fn name(&self) -> &str {
        self.name
    }

    fn files(&self) -> Vec<PathBuf> {
        self.files.paths()
    }

    fn reload(&self) -> anyhow::Result<()> {
        // Everything is loaded before anything is swapped: a half-written set of files leaves
        // the listener on what it had.
        let key = load_key(&self.files)?;
        let inner = match &self.verifier {
            Some(_) => Some(client_verifier(&self.files)?),
            None => None,
        };
        *self.resolver.0.write().expect("resolver lock") = key;
        if let (Some(v), Some(inner)) = (&self.verifier, inner) {
            *v.inner.write().expect("verifier lock") = inner;
        }
        self.export_expiry();
        Ok(())
    }
}

fn load_key(files: &TlsFiles) -> anyhow::Result<Arc<CertifiedKey>> {
    let chain = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow::anyhow!("{}: {e}", files.key.display()))?;
    // Also checks that the key belongs to the certificate.
    let key = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| anyhow::anyhow!("{} / {}: {e}", files.cert.display(), files.key.display()))?;
    Ok(Arc::new(key))
}

/// The certificates of a PEM file; an empty file is an error.
pub fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate in it",
        path.display()
    );
    Ok(certs)
}

fn client_verifier(files: &TlsFiles) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let ca = files
        .client_ca
        .as_ref()
        .context("client certificates need a client CA file")?;
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?;
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if let Some(crl) = &files.client_crl {
        let crls = CertificateRevocationListDer::pem_file_iter(crl)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow::anyhow!("{}: {e}", crl.display()))?;
        anyhow::ensure!(!crls.is_empty(), "{}: no CRL in it", crl.display());
        // A device certificate whose issuer has no CRL in the file is refused (its status is
        // unknown); intermediates are trusted as issued.
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    if files.client_auth == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|e| match &files.client_crl {
        Some(crl) => anyhow::anyhow!("{} / {}: {e}", ca.display(), crl.display()),
        None => anyhow::anyhow!("{}: {e}", ca.display()),
    })
}

/// The server certificate currently loaded.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl Resolver {
    fn current(&self) -> Arc<CertifiedKey> {
        self.0.read().expect("resolver lock").clone()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The client verifier currently loaded (CAs and CRLs), plus citygw's own check.
struct Verifier {
    listener: &'static str,
    mandatory: bool,
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
    check: Option<CertCheck>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("listener", &self.listener)
            .finish()
    }
}

impl Verifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.read().expect("verifier lock").clone()
    }
}

fn refused(listener: &'static str, reason: &'static str) {
    metrics::counter!("citygw_tls_client_certs_refused_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

impl ClientCertVerifier for Verifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    // No CA names in the CertificateRequest: they would have to outlive a reload. Clients then
    // send the certificate they were given, which is what devices do.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .current()
            .verify_client_cert(end_entity, intermediates, now)
        {
            refused(self.listener, cert_error_reason(&e));
            return Err(e);
        }
        if let Some(check) = &self.check {
            if let Err(reason) = check(end_entity) {
                refused(self.listener, reason);
                return Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ));
            }
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// A short, stable label for why a certificate was refused.
fn cert_error_reason(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::Revoked => "revoked",
            C::UnknownIssuer => "unknown_issuer",
            C::UnknownRevocationStatus => "unknown_revocation_status",
            C::BadSignature => "bad_signature",
            _ => "invalid",
        },
        _ => "invalid",
    }
}

//! `citygw cert`: a certificate authority for a city without a PKI of its own, with rcgen: create
//! the city CA, issue server and device certificates, revoke them into a CRL. Works on files
//! only (it never talks to a gateway), so it can run on an offline machine that keeps the CA key.
//!
//! Files in the CA directory: `ca.pem` (give it to devices and to `mqtt.client_ca_file`),
//! `ca.key` (mode 0600; never leaves this directory), `revoked.txt` (serials, one per line) and
//! `crl.pem` (for `mqtt.client_crl_file`; rewritten by every `revoke`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

#[derive(Subcommand)]
pub enum CertCommand {
    /// Create a city CA (ca.pem, ca.key) in DIR.
    Ca {
        /// The CA directory (created if missing); keep it off the gateway.
        #[arg(long)]
        dir: PathBuf,
        /// The CA's name (subject CN).
        #[arg(long, default_value = "citygw city CA")]
        name: String,
        /// Days the CA certificate is valid for.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a certificate signed by the CA in CA_DIR: OUT.pem and OUT.key. Prints its SHA-256
    /// (what `citygw device add --cert-sha256` pins).
    Issue {
        /// The CA directory made by `citygw cert ca`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Path prefix of the files written.
        #[arg(long)]
        out: PathBuf,
        /// A device certificate: CN (and a dNSName) = this device id.
        #[arg(long, conflicts_with = "server")]
        device: Option<String>,
        /// A server certificate for these host names or IP addresses (repeat).
        #[arg(long, required_unless_present = "device")]
        server: Vec<String>,
        /// Days the certificate is valid for.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Revoke certificates issued by the CA in CA_DIR and rewrite its crl.pem.
    Revoke {
        /// The CA directory made by `citygw cert ca`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// PEM certificate files to revoke; none: only renew crl.pem before it runs out.
        certs: Vec<PathBuf>,
        /// Days the CRL is valid for; renew it before then.
        #[arg(long, default_value_t = 30)]
        crl_days: i64,
    },
}

pub fn run(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Ca { dir, name, days } => create_ca(&dir, &name, days),
        CertCommand::Issue {
            ca_dir,
            out,
            device,
            server,
            days,
        } => issue(&ca_dir, &out, device.as_deref(), &server, days),
        CertCommand::Revoke {
            ca_dir,
            certs,
            crl_days,
        } => revoke(&ca_dir, &certs, crl_days),
    }
}

fn create_ca(dir: &Path, name: &str, days: i64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    anyhow::ensure!(
        !key_path.exists(),
        "{} exists: refusing to replace a CA key (every certificate it issued would be orphaned)",
        key_path.display()
    );
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    validity(&mut params, days);
    params.serial_number = Some(serial());
    let cert = params.self_signed(&key)?;
    crate::config::write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())?;
    println!(
        "CA written: {} (certificate: give it to devices and to mqtt.client_ca_file) and {} (key, mode 0600: keep it off the gateway)",
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that lag.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn load_issuer(ca_dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let cert = std::fs::read_to_string(ca_dir.join("ca.pem"))
        .with_context(|| format!("{}/ca.pem (run `citygw cert ca` first)", ca_dir.display()))?;
    let key = std::fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("{}/ca.key", ca_dir.display()))?;
    let key = KeyPair::from_pem(&key)?;
    Ok(Issuer::from_ca_cert_pem(&cert, key)?)
}

fn issue(
    ca_dir: &Path,
    out: &Path,
    device: Option<&str>,
    servers: &[String],
    days: i64,
) -> anyhow::Result<()> {
    let issuer = load_issuer(ca_dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    match device {
        Some(id) => {
            params.distinguished_name = dn(id);
            params.subject_alt_names = vec![SanType::DnsName(id.try_into()?)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        None => {
            params.distinguished_name = dn(&servers[0]);
            params.subject_alt_names = servers
                .iter()
                .map(|s| match s.parse::<std::net::IpAddr>() {
                    Ok(ip) => Ok(SanType::IpAddress(ip)),
                    Err(_) => Ok(SanType::DnsName(s.as_str().try_into()?)),
                })
                .collect::<Result<_, rcgen::Error>>()?;
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial());
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (with_ext(out, "pem"), with_ext(out, "key"));
    if key_path.exists() {
        std::fs::remove_file(&key_path)?;
    }
    crate::config::write_private(&key_path, &key.serialize_pem())?;
    std::fs::write(&cert_path, cert.pem())?;
    println!("certificate: {}", cert_path.display());
    println!("key:         {} (mode 0600)", key_path.display());
    println!(
        "sha256:      {}",
        hex::encode(crate::tls::identity::fingerprint(cert.der()))
    );
    Ok(())
}

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn revoke(ca_dir: &Path, certs: &[PathBuf], crl_days: i64) -> anyhow::Result<()> {
    let issuer = load_issuer(ca_dir)?;
    let list = ca_dir.join("revoked.txt");
    let mut serials: Vec<String> = std::fs::read_to_string(&list)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    for path in certs {
        for der in crate::tls::read_certs(path)? {
            let (_, cert) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let serial = hex::encode(cert.raw_serial());
            if !serials.contains(&serial) {
                println!("revoked {} (serial {serial})", cert.subject());
                serials.push(serial);
            }
        }
    }
    let now = OffsetDateTime::now_utc();
    let revoked = serials
        .iter()
        .map(|s| {
            Ok(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&hex::decode(s)?),
                revocation_time: now,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let crl = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + Duration::days(crl_days),
        crl_number: SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    std::fs::write(&list, serials.join("\n") + "\n")?;
    let crl_path = ca_dir.join("crl.pem");
    std::fs::write(&crl_path, crl.pem()?)?;
    println!(
        "{} written ({} revoked); gateways reload it on change or SIGHUP",
        crl_path.display(),
        serials.len()
    );
    Ok(())
}

"""A throw-away PKI for the TLS tests, made with the `cryptography` package (not with citygw's own
`citygw cert`, so the gateway is tested against certificates it did not make): a city CA, server
certificates for loopback, device certificates (CN = device id, optional SANs), expired ones,
ones from another CA, and CRLs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Issued:
    """A certificate and key written as PEM files."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def serial(self) -> int:
        return self.cert.serial_number


class Ca:
    """A CA whose certificate, key and CRL live in `dir`."""

    def __init__(self, dir: Path, name: str = "test city CA"):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.dir / "ca.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.revoked: list[int] = []
        self.crl_path = self.dir / "crl.pem"

    def _issue(self, stem: str, cn: str, sans: list[x509.GeneralName], usage,
               not_before: dt.datetime, not_after: dt.datetime) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return Issued(cert_path, key_path, cert)

    def server(self, stem: str = "server", hosts: tuple[str, ...] = ("127.0.0.1", "::1", "localhost"),
               cn: str = "citygw test server") -> Issued:
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        now = _now()
        return self._issue(stem, cn, sans, ExtendedKeyUsageOID.SERVER_AUTH,
                           now - dt.timedelta(hours=1), now + dt.timedelta(days=30))

    def device(self, device_id: str, stem: str | None = None, dns: list[str] = (),
               uris: list[str] = (), expired: bool = False) -> Issued:
        now = _now()
        if expired:
            nb, na = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
        else:
            nb, na = now - dt.timedelta(hours=1), now + dt.timedelta(days=30)
        sans = [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uris]
        return self._issue(stem or f"dev-{device_id}", device_id, sans,
                           ExtendedKeyUsageOID.CLIENT_AUTH, nb, na)

    def client(self, name: str) -> Issued:
        """An agency's client certificate (gRPC mTLS)."""
        now = _now()
        return self._issue(f"client-{name}", name, [], ExtendedKeyUsageOID.CLIENT_AUTH,
                           now - dt.timedelta(hours=1), now + dt.timedelta(days=30))

    def revoke(self, *issued: Issued) -> Path:
        """Adds the certificates to the CRL and rewrites crl.pem."""
        self.revoked += [i.serial for i in issued]
        now = _now()
        self.crl_number = getattr(self, "crl_number", 0) + 1
        b = (x509.CertificateRevocationListBuilder()
             .issuer_name(self.cert.subject)
             .last_update(now - dt.timedelta(minutes=5))
             .next_update(now + dt.timedelta(days=7))
             .add_extension(x509.CRLNumber(self.crl_number), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 self.key.public_key()), critical=False))
        for serial in self.revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=1)).build())
        crl = b.sign(self.key, hashes.SHA256())
        tmp = self.crl_path.with_suffix(".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        tmp.replace(self.crl_path)
        return self.crl_path

"""`citygw cert` (rcgen) for a city without a PKI, as the security chapter's walk-through uses it:
a CA, a server certificate, a device certificate, mosquitto_pub with it over MQTT mTLS, then
revocation into a CRL the running gateway picks up.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from support import CITYGW_BIN, wait_until


def citygw(*args: str) -> str:
    p = subprocess.run([str(CITYGW_BIN), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_walk_through_ca_issue_connect_revoke(gateway_factory, tmp_path):
    ca = tmp_path / "ca"
    citygw("cert", "ca", "--dir", str(ca), "--name", "Test City IoT CA")
    assert (ca / "ca.key").stat().st_mode & 0o077 == 0
    # Refuses to replace an existing CA key.
    p = subprocess.run([str(CITYGW_BIN), "cert", "ca", "--dir", str(ca)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "refusing" in p.stderr
    citygw("cert", "issue", "--ca-dir", str(ca), "--out", str(tmp_path / "server"),
           "--server", "127.0.0.1", "--server", "localhost")
    citygw("cert", "revoke", "--ca-dir", str(ca))  # an empty CRL to start with
    gw = gateway_factory(config_toml=f"""
[tls]
watch_secs = 1
[mqtt]
tls_cert_file = "{tmp_path / 'server.pem'}"
tls_key_file = "{tmp_path / 'server.key'}"
client_ca_file = "{ca / 'ca.pem'}"
client_crl_file = "{ca / 'crl.pem'}"
""")
    d = gw.add_device()
    out = citygw("cert", "issue", "--ca-dir", str(ca), "--out", str(tmp_path / "dev"),
                 "--device", d.id)
    fingerprint = re.search(r"sha256:\s+([0-9a-f]{64})", out).group(1)
    gw.cli("device", "pin", d.id, "--cert-sha256", fingerprint)

    def publish(value: int) -> subprocess.CompletedProcess:
        return subprocess.run([shutil.which("mosquitto_pub"), "-h", gw.host,
                               "-p", str(gw.mqtt_mtls_port), "--cafile", str(ca / "ca.pem"),
                               "--cert", str(tmp_path / "dev.pem"), "--key", str(tmp_path / "dev.key"),
                               "-i", d.id, "-q", "1", "-t", d.topic, "-m", f'{{"temp": {value}}}'],
                              capture_output=True, text=True, timeout=30)

    p = publish(1)
    assert p.returncode == 0, p.stderr
    citygw("cert", "revoke", "--ca-dir", str(ca), str(tmp_path / "dev.pem"))
    # The running gateway picks the new crl.pem up within tls.watch_secs.
    wait_until(lambda: publish(2).returncode != 0, timeout=15,
               desc="the revoked certificate to be refused")
    stored = len(gw.readings(d.id))
    assert publish(3).returncode != 0
    assert len(gw.readings(d.id)) == stored and 3.0 not in [r["value"] for r in gw.readings(d.id)]

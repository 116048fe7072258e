"""The federation's keys and certificates (python ``cryptography``).

* A private certificate authority (RSA-4096, 5 years) that signs the SuperLink's TLS certificate.
  Sites trust only this CA, so no public CA is involved and nothing else can impersonate the
  coordinator.
* The SuperLink's certificate (RSA-2048, 1 year) for the host names and IP addresses the sites
  dial, plus localhost / 127.0.0.1 for the coordinator's own command-line tools.
* One authentication key pair per site (EC P-384, OpenSSH format, which is what Flower's
  SuperNode authentication accepts; client/bundle.py). Best made at the site, so that only the
  public key travels; otherwise the coordinator makes it and the private key goes to the site in
  its bundle and nowhere else.

Private keys are written owner-only (0600) and never replaced unless asked to (``force``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ccmr_core.files import write_atomic

CA_DAYS = 5 * 365
SERVER_DAYS = 365


class KeyExists(FileExistsError):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def write_private(path: Path, data: bytes, force: bool = False) -> None:
    """Owner-only from the first byte (created with mode 0600, not chmod-ed afterwards)."""
    if path.exists() and not force:
        raise KeyExists(f"{path} exists; refusing to replace a key (pass --force to rotate it deliberately)")
    write_atomic(path, data, mode=0o600)


def write_public(path: Path, data: bytes, force: bool = False) -> None:
    if path.exists() and not force:
        raise KeyExists(f"{path} exists; refusing to replace it (pass --force)")
    write_atomic(path, data, mode=0o644)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(name: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a new certificate authority."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} federation CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CC-CMR Federated")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _san(hosts: list[str], loopback: bool = True) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, *(("localhost", "127.0.0.1", "::1") if loopback else ())]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_server_cert(ca_cert_pem: bytes, ca_key_pem: bytes, hosts: list[str],
                     days: int = SERVER_DAYS, loopback: bool = True) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of the SuperLink for ``hosts`` (names or IPs), plus the
    loopback names the coordinator's own tools use unless ``loopback`` is False."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts, loopback), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def cert_summary(pem: bytes) -> dict:
    c = x509.load_pem_x509_certificate(pem)
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
            [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        hosts = []
    return {"subject": c.subject.rfc4514_string(), "issuer": c.issuer.rfc4514_string(),
            "not_before": c.not_valid_before_utc, "not_after": c.not_valid_after_utc, "hosts": hosts}

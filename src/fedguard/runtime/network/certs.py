"""A development PKI: a CA, a server certificate, client certificates and client keys.

``fedguard certs --out certs --clients 3`` writes::

    certs/ca.pem, ca-key.pem            the development CA (keep ca-key.pem private)
    certs/server.pem, server-key.pem    the server's certificate, valid for --hosts
    certs/client-K.pem, client-K-key.pem  client K's certificate (CN client-K) for mutual TLS
    certs/client-K.key                  client K's secret key for request MACs
    certs/clients.json                  the server's registry of client keys

For production, use certificates from your organisation's CA; the registry and key files
work the same.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedguard.durable import write_durably
from fedguard.runtime.network.auth import ClientRecord, load_registry, new_key, save_registry, write_key_file

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class Issuer:
    """A CA's key and certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def client_common_name(client_id: int) -> str:
    """The certificate common name of client ``client_id`` (checked by the server under mTLS)."""
    return f"client-{client_id}"


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedguard dev"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def make_ca(days: int = 365, common_name: str = "fedguard development CA") -> Issuer:
    """A self-signed CA for development."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issuer(key, cert)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def make_cert(
    ca: Issuer, common_name: str, hosts: list[str], client: bool, days: int = 365
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate signed by ``ca``: a server one for ``hosts`` or a client one."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        _builder(_name(common_name), ca.cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return key, builder.sign(ca.key, hashes.SHA256())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    write_durably(path, data, 0o600 if private else 0o644)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(pem, pkcs8, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_ca(out: Path) -> Issuer:
    """The CA previously written to ``out``."""
    key = serialization.load_pem_private_key((out / "ca-key.pem").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("ca-key.pem is not an EC private key")
    return Issuer(key, x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()))


def add_clients(out: str | Path, client_ids: list[int], days: int = 365) -> list[Path]:
    """Certificates and keys for new clients, registered in ``out/clients.json``."""
    out = Path(out)
    ca = load_ca(out)
    registry_path = out / "clients.json"
    records = load_registry(registry_path) if registry_path.exists() else {}
    written = []
    for cid in client_ids:
        key, cert = make_cert(ca, client_common_name(cid), [], client=True, days=days)
        _write(out / f"client-{cid}.pem", _cert_pem(cert))
        _write(out / f"client-{cid}-key.pem", _key_pem(key), private=True)
        secret = new_key()
        write_key_file(out / f"client-{cid}.key", cid, secret)
        records[cid] = ClientRecord(secret)
        written.append(out / f"client-{cid}.key")
    save_registry(registry_path, records)
    return written


def make_dev_pki(out: str | Path, clients: int, hosts: list[str] | None = None, days: int = 365) -> Path:
    """A fresh CA, server certificate, and ``clients`` client certificates and keys in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca = make_ca(days)
    _write(out / "ca.pem", _cert_pem(ca.cert))
    _write(out / "ca-key.pem", _key_pem(ca.key), private=True)
    key, cert = make_cert(ca, (hosts or list(DEFAULT_HOSTS))[0], hosts or list(DEFAULT_HOSTS), client=False, days=days)
    _write(out / "server.pem", _cert_pem(cert))
    _write(out / "server-key.pem", _key_pem(key), private=True)
    if (out / "clients.json").exists():
        (out / "clients.json").unlink()
    add_clients(out, list(range(clients)), days)
    return out


def set_revoked(out: str | Path, client_ids: list[int], revoked: bool = True) -> None:
    """Mark clients revoked (or active again) in ``out/clients.json``; a running server picks it up."""
    path = Path(out) / "clients.json"
    records = load_registry(path)
    for cid in client_ids:
        if cid not in records:
            raise KeyError(f"client {cid} is not registered in {path}")
        records[cid].revoked = revoked
    save_registry(path, records)

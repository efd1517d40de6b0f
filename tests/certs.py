"""Certificates for TLS tests, made with `cryptography`: a CA, a server certificate for 127.0.0.1 and localhost
signed by it, and client certificates (mTLS). Everything is PEM bytes; `write` puts a set on disk.

    ca = CertificateAuthority("test CA")
    server = ca.issue("attrserve test server", server=True)   # (cert_pem, key_pem)
    client = ca.issue("attrserve test client")
    other = CertificateAuthority("unrelated CA").issue("stranger")  # refused by a server that trusts `ca`
    expired = ca.issue("old server", server=True, valid=(now - 10 * DAY, now - DAY))

Keys are EC P-256 (fast to generate) unless `rsa_bits` says; certificates are valid from an hour ago for a day
unless `valid` says. `ed448_pair`: a self-signed certificate and key that OpenSSL (the ssl module) reads and gRPC's
BoringSSL does not. `SecretVolume`: files laid out, and replaced, as the kubelet mounts a Kubernetes Secret.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key_pem(key: ec.EllipticCurvePrivateKey | ed448.Ed448PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


DAY = datetime.timedelta(days=1)


Validity = tuple[datetime.datetime, datetime.datetime]  # (not before, not after)


def _validity(builder: x509.CertificateBuilder, valid: Validity | None = None) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    since, until = valid or (now - datetime.timedelta(hours=1), now + DAY)
    return builder.not_valid_before(since).not_valid_after(until)


@dataclass(frozen=True)
class Pair:
    cert: bytes  # PEM
    key: bytes  # PEM (PKCS#8, unencrypted)

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """`<stem>.crt` and `<stem>.key` in `folder`; their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        cert.write_bytes(self.cert)
        key.write_bytes(self.key)
        return cert, key

    @property
    def der(self) -> bytes:
        """The certificate, DER: what a TLS peer presents (ssl's getpeercert(binary_form=True))."""
        return x509.load_pem_x509_certificate(self.cert).public_bytes(serialization.Encoding.DER)

    @property
    def not_after(self) -> float:
        """The certificate's notAfter, Unix time."""
        return x509.load_pem_x509_certificate(self.cert).not_valid_after_utc.timestamp()

    def encrypted_key(self, password: bytes) -> bytes:
        """The key, encrypted with `password` (PEM)."""
        key = serialization.load_pem_private_key(self.key, None)
        encryption = serialization.BestAvailableEncryption(password)
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def ed448_pair(common_name: str) -> Pair:
    key = ed448.Ed448PrivateKey.generate()
    builder = _validity(x509.CertificateBuilder()).subject_name(_name(common_name)).issuer_name(_name(common_name))
    cert = builder.public_key(key.public_key()).serial_number(x509.random_serial_number()).sign(key, None)
    return Pair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


class CertificateAuthority:
    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(common_name)
        builder = (
            _validity(x509.CertificateBuilder())
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
        )
        self.certificate = builder.sign(self.key, hashes.SHA256())
        self.cert = self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool = False, valid: Validity | None = None, rsa_bits: int = 0) -> Pair:
        """A certificate signed by this CA: for a server (127.0.0.1 and localhost) or a client; `valid`: (from, until);
        `rsa_bits`: an RSA key of that size instead of EC P-256."""
        key = rsa.generate_private_key(65537, rsa_bits) if rsa_bits else ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            _validity(x509.CertificateBuilder(), valid)
            .subject_name(_name(common_name))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Pair(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def write(self, folder: Path, stem: str = "ca") -> Path:
        """`<stem>.crt` in `folder`; its path."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}.crt"
        path.write_bytes(self.cert)
        return path


class SecretVolume:
    """A folder as the kubelet mounts a Secret: each file a link to `..data/<name>`, and `..data` a link to a folder
    of the current version. `update` writes a new version's folder and swaps `..data` to it by one rename (the files'
    links stay; what they resolve to changes at once)."""

    def __init__(self, folder: Path, files: dict[str, bytes]) -> None:
        self.folder = folder
        self.versions = 0
        folder.mkdir(parents=True)
        self.update(files)
        for name in files:
            (folder / name).symlink_to(Path("..data") / name)

    def update(self, files: dict[str, bytes]) -> None:
        """The Secret's new content (every file, as the kubelet writes them)."""
        self.versions += 1
        version = self.folder / f"..version_{self.versions}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        link = self.folder / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.folder / "..data")

    def path(self, name: str) -> Path:
        return self.folder / name

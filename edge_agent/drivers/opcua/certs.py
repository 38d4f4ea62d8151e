"""OPC UA application certificates: self-signed generation, loading, and a trust folder of server certificates.

OPC UA peers authenticate each other with X.509 application instance certificates whose
subjectAltName carries the application URI. Trust is by folder, as UaExpert, open62541 and the UA
.NET stack do it: a server is trusted when its own certificate, or the CA that issued it, is a file
(DER or PEM) in the trust folder. A refused certificate is saved into a `rejected` folder so an
operator can inspect it and move it across.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertPurpose",
    "CertificateInfo",
    "TrustFolder",
    "application_uri_of",
    "describe",
    "generate_certificate",
    "load_certificate",
    "load_private_key",
    "thumbprint",
]

_CERT_SUFFIXES = (".der", ".pem", ".crt", ".cer")


class CertPurpose(StrEnum):
    """What a generated certificate is for (its extended key usage)."""

    CLIENT = "client"  # the agent connecting to servers
    SERVER = "server"  # the simulator's server (it also accepts client use, as the UA stacks do)


@dataclass(frozen=True)
class CertificateInfo:
    """What `generate_certificate` wrote."""

    cert_path: Path
    key_path: Path
    application_uri: str
    thumbprint: str  # SHA-1 of the DER bytes, hex: how OPC UA tools name a certificate
    not_after: dt.datetime


def generate_certificate(
    cert_path: Path,
    key_path: Path,
    *,
    application_uri: str,
    hostname: str,
    days: int = 730,
    purpose: CertPurpose = CertPurpose.CLIENT,
    overwrite: bool = False,
) -> CertificateInfo:
    """Write a self-signed RSA-2048/SHA-256 certificate (DER, or PEM for a .pem name) and its PEM key."""
    cert_path, key_path = Path(cert_path), Path(key_path)
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:\S+$", application_uri):
        raise ValueError(f"{application_uri!r} is not a URI: write e.g. urn:{hostname}:edge-agent")
    if not 1 <= days <= 36500:
        raise ValueError(f"days must be 1 to 36500, not {days}")
    if not overwrite:
        for p in (cert_path, key_path):
            if p.exists():
                raise FileExistsError(f"{p} exists; remove it first (or overwrite it on purpose)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, _common_name(application_uri)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-agent"),
        ]
    )
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(application_uri)]
    try:
        alt.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        alt.append(x509.DNSName(hostname))
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if purpose is CertPurpose.SERVER:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a peer whose clock is a little behind
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # OPC UA Part 6 asks for all four on an application instance certificate
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    encoding = serialization.Encoding.PEM if cert_path.suffix.lower() == ".pem" else serialization.Encoding.DER
    cert_path.write_bytes(cert.public_bytes(encoding))
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)  # a private key readable by others is no key
    key_path.write_bytes(key_bytes)
    return CertificateInfo(cert_path, key_path, application_uri, thumbprint(cert), cert.not_valid_after_utc)


def _common_name(uri: str) -> str:
    # the last part of a URN reads best in tools' certificate lists (urn:host:edge-agent -> edge-agent@host)
    parts = uri.split(":")
    if len(parts) >= 3 and parts[0] == "urn":
        return f"{parts[-1]}@{parts[-2]}"[:64]
    return uri[:64]


def load_certificate(path: Path) -> x509.Certificate:
    """Read a certificate file, PEM or DER whatever its name says."""
    return parse_certificate(Path(path).read_bytes())


def parse_certificate(data: bytes) -> x509.Certificate:
    """Parse PEM or DER certificate bytes (ValueError when they are neither)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_private_key(path: Path) -> PrivateKeyTypes:
    """Read an unencrypted private key file, PEM or DER."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return serialization.load_pem_private_key(data, password=None)
    return serialization.load_der_private_key(data, password=None)


def thumbprint(cert: x509.Certificate) -> str:
    """SHA-1 of the DER encoding in hex, as OPC UA tools show it."""
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def application_uri_of(cert: x509.Certificate) -> str | None:
    """The first URI in the subjectAltName: the application URI an OPC UA peer must announce."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def describe(cert: x509.Certificate) -> str:
    """One line for logs and errors: subject, application URI, thumbprint."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = str(cn[0].value) if cn else cert.subject.rfc4514_string()
    uri = application_uri_of(cert)
    return f"{subject!r}" + (f" ({uri})" if uri else "") + f", thumbprint {thumbprint(cert)}"


def file_name_for(cert: x509.Certificate) -> str:
    """`<common name> [<thumbprint>].der`, the name the UA stacks give certificates in their folders."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    base = re.sub(r"[^A-Za-z0-9._@\-]+", "_", str(cn[0].value) if cn else "certificate").strip("_") or "certificate"
    return f"{base} [{thumbprint(cert)}].der"


class TrustFolder:
    """Certificates trusted by being in a folder; refused ones are saved for review.

    Nothing is cached: the folder is read on every check (at connect), so a certificate copied in
    is picked up at the next reconnect attempt without restarting the agent.
    """

    def __init__(self, trust_dir: Path, rejected_dir: Path | None = None) -> None:
        self.trust_dir = Path(trust_dir)
        self.rejected_dir = Path(rejected_dir) if rejected_dir is not None else self.trust_dir.parent / "rejected"

    def certificates(self) -> list[x509.Certificate]:
        """Every readable certificate file directly in the trust folder (OSError when it cannot be listed)."""
        out = []
        for p in sorted(self.trust_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in _CERT_SUFFIXES:
                try:
                    out.append(load_certificate(p))
                except (OSError, ValueError):
                    continue  # a stray or broken file must not hide the good ones
        return out

    def verdict(self, cert: x509.Certificate, *, now: dt.datetime | None = None) -> str | None:
        """None when trusted; otherwise why not, in words."""
        now = now or dt.datetime.now(dt.UTC)
        if cert.not_valid_after_utc < now:
            return f"it expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        if cert.not_valid_before_utc > now:
            return f"it is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clocks)"
        der = cert.public_bytes(serialization.Encoding.DER)
        for trusted in self.certificates():
            if trusted.public_bytes(serialization.Encoding.DER) == der:
                return None
            if _issued_by(cert, trusted):
                return None
        return f"it is not in the trust folder {self.trust_dir}"

    def reject(self, cert: x509.Certificate) -> Path | None:
        """Save a refused certificate (DER) into the rejected folder; None when that is not possible."""
        try:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)
            path = self.rejected_dir / file_name_for(cert)
            path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        except OSError:
            return None
        return path


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True

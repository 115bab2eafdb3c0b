"""`dnsgate cert init`: a private certificate authority and a server certificate for encrypted DNS.

Devices check the certificate of a DNS-over-TLS or DNS-over-HTTPS resolver like any TLS server's,
and a home network's resolver has no public name a public CA would certify (nor its IP address,
which DDR's verified discovery needs in the certificate). So dnsgate makes its own CA, once, and
the operator installs its certificate (ca.pem) on the devices that should trust the resolver.

The CA can certify only the names and addresses given (X.509 name constraints, RFC 5280 §4.2.1.10,
honoured by OpenSSL, GnuTLS, BoringSSL/Chrome, Android, Apple and Windows): a device that trusts it
trusts nothing else through it, even if its key leaks. Its key is kept (0600) beside it so the
server certificate can be renewed without touching the devices again; run again with other names
and a new CA is made (devices need the new ca.pem).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dnsgate.config import HOST_NAME

CA_DAYS = 3650
# Apple's platforms refuse TLS server certificates valid for more than 825 days, whatever CA made them.
SERVER_DAYS = 825
CA_FILE, CA_KEY, CERT_FILE, KEY_FILE = "ca.pem", "ca.key", "server.pem", "server.key"


class CertError(Exception):
    """The names, addresses or directory cannot be used; the message says which."""


@dataclass(frozen=True, slots=True)
class Issued:
    directory: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    new_ca: bool
    ca_fingerprint: str  # SHA-256 of the CA certificate, as devices show it (AA:BB:...)
    spki_pin: str  # base64 SHA-256 of the server key (kdig +tls-pin, Android's pin format)
    names: tuple[str, ...]
    addresses: tuple[str, ...]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())  # P-256: every TLS client has it


def _write(path: Path, data: bytes, private: bool) -> None:
    """Written whole (to a temporary file renamed over the old one), so a running dnsgate watching
    the file never reads half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def check_names(names: list[str], addresses: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    clean_names = []
    for name in names:
        name = name.strip().rstrip(".").lower()
        if not HOST_NAME.fullmatch(name):
            raise CertError(f"--name: expected a host name of two or more labels (dns.home.arpa), got {name!r}")
        clean_names.append(name)
    clean_addresses = []
    for address in addresses:
        try:
            clean_addresses.append(str(ipaddress.ip_address(address.strip().strip("[]"))))
        except ValueError:
            raise CertError(f"--ip: not an IP address: {address!r}") from None
    if not clean_names and not clean_addresses:
        raise CertError("give the resolver's names (--name) and addresses (--ip) its clients will use")
    return tuple(dict.fromkeys(clean_names)), tuple(dict.fromkeys(clean_addresses))


def _constraints(names: tuple[str, ...], addresses: tuple[str, ...]) -> x509.NameConstraints:
    """Only these names (and their subdomains) and addresses. A kind of name the CA is not
    constrained in would be unconstrained (RFC 5280), so without names it may certify only under
    `invalid` (RFC 6761: never a real name), and without addresses none."""
    permitted: list[x509.GeneralName] = [x509.DNSName(n) for n in names] or [x509.DNSName("invalid")]
    permitted += [x509.IPAddress(ipaddress.ip_network(a)) for a in addresses]
    excluded: list[x509.GeneralName] | None = None
    if not addresses:
        excluded = [x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")), x509.IPAddress(ipaddress.ip_network("::/0"))]
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)


def _existing_ca(directory: Path, names: tuple[str, ...],
                 addresses: tuple[str, ...]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The CA made before, if it may certify exactly these names and addresses and is not expiring."""
    try:
        ca = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except (OSError, ValueError):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    try:
        constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    wanted = _constraints(names, addresses)
    if set(constraints.permitted_subtrees or ()) != set(wanted.permitted_subtrees or ()) or \
            set(constraints.excluded_subtrees or ()) != set(wanted.excluded_subtrees or ()):
        return None
    now = datetime.datetime.now(datetime.UTC)
    if ca.not_valid_after_utc - now < datetime.timedelta(days=SERVER_DAYS):
        return None
    return ca, key


def init(directory: Path, names: list[str], addresses: list[str], *, new_ca: bool = False,
         now: datetime.datetime | None = None) -> Issued:
    """Make (or reuse) the CA in `directory` and issue a server certificate for `names` and
    `addresses`; returns what was written."""
    clean_names, clean_addresses = check_names(names, addresses)
    directory = directory.absolute()  # the paths printed go into dnsgate.toml as they are
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CertError(f"--dir: cannot create {directory}: {exc.strerror}") from None
    now = now or datetime.datetime.now(datetime.UTC)
    existing = None if new_ca else _existing_ca(directory, clean_names, clean_addresses)
    if existing is None:
        ca_key = _key()
        label = clean_names[0] if clean_names else clean_addresses[0]
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dnsgate"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"dnsgate private CA for {label}"[:64])])
        ca = (x509.CertificateBuilder()
              .subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1))
              .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .add_extension(_constraints(clean_names, clean_addresses), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    else:
        ca, ca_key = existing
    server_key = _key()
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in clean_names]
    alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in clean_addresses]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dnsgate resolver")]))
            .issuer_name(ca.subject)
            .public_key(server_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(min(now + datetime.timedelta(days=SERVER_DAYS), ca.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = Issued(directory, directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE, existing is None,
                   ca.fingerprint(hashes.SHA256()).hex(":").upper(),
                   base64.b64encode(hashlib.sha256(server_key.public_key().public_bytes(
                       serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).digest()).decode(),
                   clean_names, clean_addresses)
    if existing is None:
        _write(directory / CA_KEY, _pem_key(ca_key), private=True)
        _write(paths.ca_file, ca.public_bytes(serialization.Encoding.PEM), private=False)
    # the key first: a watcher that sees the new certificate finds its key already there
    _write(paths.key_file, _pem_key(server_key), private=True)
    _write(paths.cert_file, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def summary(issued: Issued) -> str:
    """What `dnsgate cert init` prints: what was made and what to do with it."""
    covered = ", ".join((*issued.names, *issued.addresses))
    ca = "a new private CA" if issued.new_ca else "the existing private CA"
    return "\n".join([
        f"server certificate for {covered}, signed by {ca} (it can certify only these)",
        f"  install on devices:  {issued.ca_file}   (SHA-256 {issued.ca_fingerprint})",
        f"  dnsgate.toml [dns]:  tls_cert = \"{issued.cert_file}\"",
        f"                       tls_key = \"{issued.key_file}\"",
        f"  key pin (kdig +tls-pin): {issued.spki_pin}",
        "a running dnsgate picks the new certificate up by itself; see docs/encrypted-dns.md for each platform",
    ])

"""The certificate's first DNS name (what DDR names when dns.resolver_name is empty), read without
the cryptography package; checked here against what cryptography itself reads."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dnsgate.cli.cert import init
from dnsgate.dns.tls import TlsFiles


def cryptography_first_name(cert: Path) -> str:
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    try:
        names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    found = names.get_values_for_type(x509.DNSName)
    return found[0] if found and "*" not in found[0] else ""


@pytest.mark.parametrize(("names", "addresses"), [
    (["dns.example.test"], ["192.0.2.1"]),
    (["resolver.home.arpa", "dns.example.test"], ["192.0.2.1", "2001:db8::1"]),
    ([], ["127.0.0.1"]),
    ([f"n{i}.{'x' * 60}.example.test" for i in range(8)], []),  # long: DER lengths in two octets
])
def test_first_name_is_what_cryptography_reads(tmp_path: Path, names: list[str], addresses: list[str]) -> None:
    issued = init(tmp_path / "tls", names, addresses)
    tls = TlsFiles(issued.cert_file, issued.key_file)
    tls.load()
    expected = cryptography_first_name(issued.cert_file)
    assert tls.first_name == expected
    assert expected == ("" if not names or "*" in names[0] else names[0].lower())


def self_signed(directory: Path, alt: list[x509.GeneralName] | None) -> TlsFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dns.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if alt is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    tls = TlsFiles(cert_file, key_file)
    tls.load()
    assert tls.dot is not None
    return tls


@pytest.mark.parametrize(("alt", "first"), [
    (None, ""),  # no subjectAltName at all
    ([x509.RFC822Name("ops@example.test"), x509.DNSName("dns.example.test")], "dns.example.test"),
    ([x509.DNSName("*.example.test"), x509.DNSName("dns.example.test")], ""),  # a wildcard names no host
])
def test_names_in_other_certificates(tmp_path: Path, alt: list[x509.GeneralName] | None, first: str) -> None:
    tls = self_signed(tmp_path, alt)
    assert tls.first_name == cryptography_first_name(tls.cert) == first

"""`dnsgate cert init`: the CA and certificate it makes are what TLS clients accept for the names and
addresses given, and for nothing else (name constraints); renewal keeps the CA; bad input is refused."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dnsgate.cli.cert import CA_KEY, CertError, init
from tests.cli.test_serve import _env


async def handshake(cert: Path, key: Path, ca: Path, server_hostname: str) -> str | None:
    """A real TLS handshake on loopback with a server using `cert`; None if the client accepted it,
    else the client's verification error."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        client = ssl.create_default_context(cafile=str(ca))
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname=server_hostname)
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_message
        writer.close()
        return None
    finally:
        server.close()


async def test_the_certificate_is_accepted_for_its_names_and_addresses(tmp_path: Path) -> None:
    issued = init(tmp_path / "tls", ["dns.home.arpa", "DNS2.home.arpa."], ["127.0.0.1", "[::1]"])
    assert issued.names == ("dns.home.arpa", "dns2.home.arpa") and issued.addresses == ("127.0.0.1", "::1")
    for hostname in ("dns.home.arpa", "dns2.home.arpa", "127.0.0.1"):
        assert await handshake(issued.cert_file, issued.key_file, issued.ca_file, hostname) is None
    assert await handshake(issued.cert_file, issued.key_file, issued.ca_file, "other.home.arpa") is not None
    for private in (issued.key_file, issued.directory / CA_KEY):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(issued.cert_file.read_bytes())
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 826  # Apple's limit


async def test_the_ca_cannot_vouch_for_anything_else(tmp_path: Path) -> None:
    """Its key leaked, the CA still cannot make a certificate devices accept for another name."""
    issued = init(tmp_path / "tls", ["dns.home.arpa"], ["127.0.0.1"])
    ca = x509.load_pem_x509_certificate(issued.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key((issued.directory / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    forged = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]))
              .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    (tmp_path / "forged.pem").write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "forged.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    error = await handshake(tmp_path / "forged.pem", tmp_path / "forged.key", issued.ca_file, "bank.example")
    assert error == "permitted subtree violation"  # OpenSSL enforces the name constraints


def test_renewal_keeps_the_ca_and_other_names_make_a_new_one(tmp_path: Path) -> None:
    first = init(tmp_path / "tls", ["dns.home.arpa"], ["192.168.1.2"])
    ca_pem, cert_pem = first.ca_file.read_bytes(), first.cert_file.read_bytes()
    again = init(tmp_path / "tls", ["dns.home.arpa"], ["192.168.1.2"])
    assert not again.new_ca and again.ca_file.read_bytes() == ca_pem and again.cert_file.read_bytes() != cert_pem
    other = init(tmp_path / "tls", ["dns.home.arpa", "resolver.home.arpa"], ["192.168.1.2"])
    assert other.new_ca and other.ca_file.read_bytes() != ca_pem
    forced = init(tmp_path / "tls", ["dns.home.arpa", "resolver.home.arpa"], ["192.168.1.2"], new_ca=True)
    assert forced.new_ca


@pytest.mark.parametrize(("names", "addresses", "message"), [
    ([], [], "give the resolver's names"),
    (["localhost"], [], "two or more labels"),
    (["bad_name.example"], [], "host name"),
    (["dns.home.arpa"], ["192.168.1.300"], "not an IP address"),
])
def test_bad_names_and_addresses_are_refused(tmp_path: Path, names: list[str], addresses: list[str],
                                             message: str) -> None:
    with pytest.raises(CertError, match=message):
        init(tmp_path / "tls", names, addresses)
    assert not (tmp_path / "tls").exists() or not any((tmp_path / "tls").iterdir())


def test_the_command_prints_what_to_install_and_configure(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "dnsgate", "cert", "init", "--name", "dns.home.arpa", "--ip",
                          "192.168.1.2", "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                         env=_env(), timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    directory = tmp_path / "data" / "tls"
    assert f"install on devices:  {directory / 'ca.pem'}" in run.stdout
    assert f'tls_cert = "{directory / "server.pem"}"' in run.stdout
    bad = subprocess.run([sys.executable, "-m", "dnsgate", "cert", "init", "--dir", str(tmp_path / "x")],
                         capture_output=True, text=True, env=_env(), timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("dnsgate: error: give the resolver's names")
    assert not (tmp_path / "x").exists()

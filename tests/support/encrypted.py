"""Helpers for the encrypted-DNS tests: a certificate for the loopback resolver, a dnsgate serving
DNS over TLS and over HTTPS with it, and the real command-line clients (kdig, dig, curl) run against
it from a chosen loopback source address."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import dns.rdatatype

from dnsgate.cli.cert import init
from dnsgate.config import Config, DnsConfig
from tests.conftest import Gate, make_config
from tests.support.stub_upstream import StubUpstream

SERVER_NAME = "dns.dnsgate.test"


@dataclass
class Certs:
    """A private CA and a server certificate for SERVER_NAME, 127.0.0.1 and ::1, as PEM files, made
    by `dnsgate cert init`'s code: every client below checks what operators will install."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_certs(directory: Path, name: str = SERVER_NAME) -> Certs:
    issued = init(directory, [name], ["127.0.0.1", "::1"])
    return Certs(issued.ca_file, issued.cert_file, issued.key_file)


def encrypted_config(stub: StubUpstream, data_dir: Path, certs: Certs, *, tls: bool = True, https: bool = False,
                     **dns: Any) -> Config:
    cfg = make_config(stub, data_dir)
    return replace(cfg, dns=replace(DnsConfig(listen=("127.0.0.1:0",)),
                                    tls_listen=("127.0.0.1:0",) if tls else (),
                                    https_listen=("127.0.0.1:0",) if https else (),
                                    tls_cert=str(certs.cert_file), tls_key=str(certs.key_file), **dns))


async def dot_query(gate: Gate, certs: Certs, name: str, rdtype: str = "A", *, source: str = "127.0.0.1",
                    timeout: float = 3.0, **make: Any) -> dns.message.Message:
    """One query over DNS over TLS with dnspython, verifying the certificate against the test CA."""
    q = dns.message.make_query(name, dns.rdatatype.from_text(rdtype), **make)
    return await dns.asyncquery.tls(q, "127.0.0.1", port=gate.running.tls[0].port, source=source, timeout=timeout,
                                    ssl_context=certs.client_context(), server_hostname=SERVER_NAME)


@dataclass
class Run:
    code: int
    out: str
    err: str


async def run(*argv: str, timeout: float = 20.0) -> Run:
    """A command-line client, its output, bounded in time (killed by its own PID if it hangs)."""
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def have(tool: str) -> bool:
    return shutil.which(tool) is not None

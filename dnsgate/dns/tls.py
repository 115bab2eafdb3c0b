"""The server certificate of the encrypted listeners (DNS over TLS, DNS over HTTPS): read from its
PEM files into TLS contexts, and read again when the files change or on SIGHUP.

Each reading builds new contexts and swaps them in only if the certificate and key load and match:
a half-written file or a key for another certificate leaves the running ones in place (and says
so), so a renewal that goes wrong never takes encrypted DNS down. Connections already open keep the
certificate they were made with; every new handshake gets the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

DOT_ALPN = ("dot",)  # RFC 7858 §3.1 and the ALPN registry; clients that offer none are served too
DOH_ALPN = ("h2", "http/1.1")  # RFC 8484 §5.2: HTTP/2 preferred, HTTP/1.1 kept working
WATCH_INTERVAL = 2.0  # seconds between looks at the files


class TlsFilesError(Exception):
    """The certificate or key cannot be used; the message names the file and why."""


@dataclass(frozen=True, slots=True)
class _Stamp:
    """What tells a file changed without reading it: renewals replace (new inode) or rewrite it."""

    inode: int
    size: int
    mtime_ns: int


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stamp(st.st_ino, st.st_size, st.st_mtime_ns)


def server_context(cert: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server context with TLS 1.2 or newer (RFC 8310 §9, RFC 8484 §5.2) for `cert` and `key`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION  # CRIME: compression leaks what is encrypted
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TlsFilesError(f"{exc.filename}: no such file") from None
    except PermissionError as exc:
        raise TlsFilesError(f"{exc.filename}: not readable by dnsgate's user") from None
    except ssl.SSLError as exc:
        raise TlsFilesError(f"{cert} / {key}: not a PEM certificate and its private key ({exc.reason or exc})") \
            from None
    except OSError as exc:
        raise TlsFilesError(f"{cert} / {key}: {exc.strerror or exc}") from None
    context.set_alpn_protocols(list(alpn))
    return context


def _first_dns_name(cert: Path) -> str:
    """The first DNS name of the certificate's subjectAltName, read from its DER with a few lines
    rather than the cryptography package: importing that costs the serving process ~9 MiB."""
    try:
        pem = cert.read_text(encoding="ascii", errors="replace")
        begin = pem.index(_PEM_BEGIN)
        der = ssl.PEM_cert_to_DER_cert(pem[begin:pem.index(_PEM_END, begin) + len(_PEM_END)])
        name = _san_dns_name(der)
    except (OSError, ValueError, IndexError, StopIteration):  # unreadable, or not the DER it should be
        return ""
    return name if "*" not in name else ""


_PEM_BEGIN: Final = "-----BEGIN CERTIFICATE-----"
_PEM_END: Final = "-----END CERTIFICATE-----"
_SAN_OID: Final = b"\x06\x03\x55\x1d\x11"  # 2.5.29.17, subjectAltName


def _der_items(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER element in der[start:end]."""
    while start < end:
        tag, length = der[start], der[start + 1]
        start += 2
        if length & 0x80:
            octets = length & 0x7F
            length = int.from_bytes(der[start:start + octets], "big")
            start += octets
        if start + length > end:
            raise ValueError("DER element longer than its container")
        yield tag, start, start + length
        start += length


def _san_dns_name(der: bytes) -> str:
    """The first dNSName of the subjectAltName extension of a DER certificate, or ""."""
    _, cert_start, cert_end = next(_der_items(der, 0, len(der)))  # Certificate
    _, tbs_start, tbs_end = next(_der_items(der, cert_start, cert_end))  # TBSCertificate
    for tag, start, end in _der_items(der, tbs_start, tbs_end):
        if tag != 0xA3:  # [3] extensions
            continue
        _, exts_start, exts_end = next(_der_items(der, start, end))
        for _, ext_start, ext_end in _der_items(der, exts_start, exts_end):
            if der[ext_start:ext_start + len(_SAN_OID)] != _SAN_OID:
                continue
            *_, (_, value_start, value_end) = _der_items(der, ext_start, ext_end)  # the OCTET STRING
            _, names_start, names_end = next(_der_items(der, value_start, value_end))  # GeneralNames
            for name_tag, name_start, name_end in _der_items(der, names_start, names_end):
                if name_tag == 0x82:  # [2] dNSName
                    return der[name_start:name_end].decode("ascii")
            return ""
    return ""


class TlsFiles:
    """The contexts for DoT (`dot`) and DoH (`doh`), made from `cert` and `key`."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.dot: ssl.SSLContext | None = None
        self.doh: ssl.SSLContext | None = None
        self.loads = 0  # successful readings (the first included)
        self.failures = 0
        self.problem = ""  # why the last reading failed, if it did ("" once one succeeds)
        self.first_name = ""  # the certificate's first DNS name (what DDR names when dns.resolver_name is empty)
        self._stamps: tuple[_Stamp | None, _Stamp | None] = (None, None)

    def load(self) -> None:
        """Read both files into new contexts; raises TlsFilesError (the running contexts stay)."""
        stamps = (_stamp(self.cert), _stamp(self.key))
        try:
            dot = server_context(self.cert, self.key, DOT_ALPN)
            doh = server_context(self.cert, self.key, DOH_ALPN)
        except TlsFilesError as exc:
            self._stamps = stamps  # not tried again until a file changes once more
            self.failures += 1
            self.problem = str(exc)
            raise
        self.dot, self.doh = dot, doh
        self.first_name = _first_dns_name(self.cert)
        self._stamps = stamps
        self.loads += 1
        self.problem = ""

    def reload(self, why: str) -> bool:
        """Read the files again, logging the outcome; True if the new certificate is in force."""
        try:
            self.load()
        except TlsFilesError as exc:
            log.error("tls certificate not reloaded (%s): %s; the previous one stays in force", why, exc)
            return False
        log.info("tls certificate reloaded (%s) from %s", why, self.cert)
        return True

    def changed(self) -> bool:
        return (_stamp(self.cert), _stamp(self.key)) != self._stamps

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Reload when either file changes (a renewal by certbot, `dnsgate cert init`, a deploy)."""
        while True:
            await asyncio.sleep(interval)
            if self.changed():
                # a renewal may write the certificate and the key one after the other: let it finish
                await asyncio.sleep(min(interval, 0.5))
                self.reload("file changed")


class TlsFailure(Exception):
    """The peer does not speak TLS, or the handshake or a record failed."""


class TlsSession:
    """Server-side TLS over a connection's bytes, in memory (ssl.MemoryBIO): the connection's
    protocol feeds it what arrives and writes what it returns, so TLS behaves the same on asyncio's
    loop and on uvloop (whose start_tls crashed under a handshake, uvloop 0.23), and the connection
    is admitted and timed by dnsgate before and during the handshake."""

    __slots__ = ("_in", "_out", "_tls", "established")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self.established = False

    @property
    def alpn(self) -> str | None:
        return self._tls.selected_alpn_protocol()

    def receive(self, data: bytes) -> bytes:
        """The plaintext in `data` (b"" while the handshake runs, or for a partial record). Raises
        TlsFailure; after it, `outgoing()` may still hold an alert for the peer."""
        self._in.write(data)
        if not self.established:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            except (ssl.SSLError, ValueError) as exc:
                raise TlsFailure(str(exc)) from None
            self.established = True
        plain = bytearray()
        try:
            while chunk := self._tls.read(65536):
                plain += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # the peer's close_notify: what came before it still counts
            pass
        except ssl.SSLError as exc:
            raise TlsFailure(str(exc)) from None
        return bytes(plain)

    def send(self, data: bytes) -> bytes:
        """`data` encrypted, with anything else TLS has to send first. Raises TlsFailure."""
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:
            raise TlsFailure(str(exc)) from None
        return self.outgoing()

    def outgoing(self) -> bytes:
        return self._out.read() if self._out.pending else b""

    def close(self) -> bytes:
        """close_notify, to tell the peer nothing was cut off."""
        if self.established:
            with contextlib.suppress(ssl.SSLError):  # (it waits for the peer's, which is not needed)
                self._tls.unwrap()
        return self.outgoing()

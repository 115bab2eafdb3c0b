"""UDP served in batches on Linux: up to BATCH datagrams taken with one recvmmsg(2), and the replies
made of them sent with one sendmmsg(2), both called through ctypes on libc (no compiled code).

One receive and one send system call per datagram is what an asyncio datagram endpoint pays, and
on loopback that is most of what a query costs; taking what waits in the socket at once and
answering it at once shares those calls between the datagrams of a batch. Batches fill only
under load: a lone query is taken as soon as the socket is readable (the socket never waits to
fill a batch), and answered before the next read.

Buffers are allocated once per socket (anonymous mmaps, so the kernel gives pages only as far as
datagrams reach into them): slot i of each holds datagram i's bytes, its sender's address, its
control message and its reply. Replies to queries forwarded upstream go out when their answer
comes, those completing in the same turn of the event loop in one sendmmsg. A send the socket
cannot take (its buffer full) is kept, in order, and sent when the socket becomes writable; reading
pauses meanwhile, so a client that floods faster than its replies leave meets the kernel's
receive queue, not a growing backlog here. A datagram the kernel refuses for good (no route) is
dropped and counted, as the asyncio endpoint logs its `error_received`.

On a wildcard address (0.0.0.0, ::) the reply must leave from the address the query was sent to,
or the client (which checks where a reply comes from) discards it: IP_PKTINFO / IPV6_RECVPKTINFO
give each datagram's destination as a control message, which goes back with the reply as its
source (the IPv4 interface index cleared, so the routing table picks the way out).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import mmap
import socket
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from dnsgate.addresses import normalize_client
from dnsgate.wire import SERVFAIL, Rejection, rejection_reply

if TYPE_CHECKING:
    from dnsgate.dns.forwarding import Resolver
    from dnsgate.dns.pipeline import Pipeline

log = logging.getLogger(__name__)

BATCH: Final = 64  # datagrams per system call (Knot DNS and gdnsd use 64 too)
SLOT: Final = 65536  # room for the largest UDP datagram: nothing is ever truncated
NAME: Final = 32  # room for a sockaddr_in6 (28 bytes)
CONTROL: Final = 64  # room for one IP_PKTINFO (32 bytes) or IPV6_PKTINFO (40) control message
CLIENT_MEMO: Final = 65_536  # sender addresses whose text form is remembered
INTERNAL_ERROR: Final = Rejection(SERVFAIL, "internal error")
_ZERO4: Final = bytes(4)
_RETRY: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS})


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32), ("msg_iov", ctypes.c_void_p),
                ("msg_iovlen", ctypes.c_size_t), ("msg_control", ctypes.c_void_p),
                ("msg_controllen", ctypes.c_size_t), ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


HDR: Final = ctypes.sizeof(_Mmsghdr)
IOV: Final = ctypes.sizeof(_Iovec)
SIZE_T: Final = ctypes.sizeof(ctypes.c_size_t)  # = a pointer's on Linux: the buffers are read as "P"
_LEN_AT: Final = _Mmsghdr.msg_len.offset
_CONTROLLEN_AT: Final = _Msghdr.msg_controllen.offset
_IOV_LEN_AT: Final = _Iovec.iov_len.offset


def _libc_calls() -> tuple[Any, Any] | None:
    """recvmmsg(fd, headers, vlen, flags, timeout) and sendmmsg(fd, headers, vlen, flags), both
    returning a C int. Without `argtypes`: converting each argument through its declared type took
    half of what one call costs in Python (8 000 -> 4 300 instructions), so callers pass the
    pointers as ctypes.c_void_p (a Python int would go as a C int, and one that does not fit raises)
    and the counts, the descriptor and the flags as ints.

    Loaded as a PyDLL: the GIL is kept through each call. Every socket they are called on is
    non-blocking, so they return at once; letting go of the GIL there handed it, twice a batch, to
    any thread waiting for it (the consent store's, once per SQLite statement of a change), and
    each hand-off on the shared core cost the DNS path more than the other thread's own work.
    Other threads still take the GIL between the event loop's callbacks."""
    try:
        libc = ctypes.PyDLL(ctypes.util.find_library("c") or None, use_errno=True)
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):  # not Linux (or a libc without them)
        return None
    recvmmsg.restype = sendmmsg.restype = ctypes.c_int
    return recvmmsg, sendmmsg


_CALLS = _libc_calls()
# Python's socket module lacks IP_PKTINFO before 3.12 (and IPV6_RECVPKTINFO on some builds): Linux's values
_LINUX = sys.platform.startswith("linux")
_IPV6_RECVPKTINFO: Final[int] = getattr(socket, "IPV6_RECVPKTINFO", 49 if _LINUX else -1)
_IP_PKTINFO: Final[int] = getattr(socket, "IP_PKTINFO", 8 if _LINUX else -1)


def available() -> bool:
    """Whether this system has recvmmsg and sendmmsg (Linux)."""
    return _CALLS is not None and hasattr(socket, "SO_REUSEPORT")


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class _ServedSocket:
    """What both ways of serving a socket from the event loop's callbacks share: reading switched
    off while replies wait for the socket to take them, and back on after; closing."""

    sock: socket.socket
    fd: int
    loop: asyncio.AbstractEventLoop
    reading: bool
    closed: bool
    backlog: Sequence[object]  # replies the socket could not take yet, in order

    def _readable(self) -> None:
        raise NotImplementedError

    def _resume_reading(self) -> None:
        if not self.reading and not self.closed:
            self.loop.add_reader(self.fd, self._readable)
            self.reading = True

    def _pause_reading(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.fd)
            self.reading = False

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pause_reading()
        if self.backlog:
            self.loop.remove_writer(self.fd)
        self.sock.close()


class BatchedUdp(_ServedSocket):
    """One UDP socket served with recvmmsg/sendmmsg from the event loop's reader callback."""

    def __init__(self, sock: socket.socket, pipeline: Pipeline, resolver: Resolver,
                 may_answer: Callable[[], bool] | None = None) -> None:
        if _CALLS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        self._recvmmsg, self._sendmmsg = _CALLS
        self.sock = sock
        self.fd = sock.fileno()
        self.v6 = sock.family == socket.AF_INET6
        self.pipeline = pipeline
        self.answer = pipeline.answer
        self.resolver = resolver
        self.may_answer = may_answer
        self.loop = asyncio.get_running_loop()
        host = sock.getsockname()[0]
        self.pktinfo = is_wildcard(host)
        if self.pktinfo:
            if self.v6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        self.clients: dict[Any, str] = {}
        self.backlog: list[tuple[bytes, bytes, bytes]] = []  # (reply, address, control) the socket could not take
        self.late: list[tuple[bytes, bytes, bytes]] = []  # forwarded queries' replies, sent at the end of this turn
        self.send_errors = 0  # replies the kernel refused for good (no route to the client, ...)
        self.closed = False
        # The buffers: datagrams, replies, addresses, control messages, and the headers of both calls.
        self.rbuf = mmap.mmap(-1, BATCH * SLOT)
        self.sbuf = mmap.mmap(-1, BATCH * SLOT)
        self.names = mmap.mmap(-1, BATCH * NAME)
        self.controls = mmap.mmap(-1, BATCH * CONTROL)
        self.rhdr = mmap.mmap(-1, BATCH * HDR)  # recvmmsg's headers
        self.shdr = mmap.mmap(-1, BATCH * HDR)  # the template of sendmmsg's: slot i replies to datagram i
        self.packed = mmap.mmap(-1, BATCH * HDR)  # sendmmsg's headers when not every slot has a reply
        self.iovs = mmap.mmap(-1, 2 * BATCH * IOV)  # receive, then send
        rbase, sbase, nbase, cbase = (_address(b) for b in (self.rbuf, self.sbuf, self.names, self.controls))
        ibase = _address(self.iovs)
        iovs = (_Iovec * (2 * BATCH)).from_buffer(self.iovs)
        rh = (_Mmsghdr * BATCH).from_buffer(self.rhdr)
        sh = (_Mmsghdr * BATCH).from_buffer(self.shdr)
        namelen = 28 if self.v6 else 16
        for i in range(BATCH):
            iovs[i].iov_base, iovs[i].iov_len = rbase + i * SLOT, SLOT
            iovs[BATCH + i].iov_base = sbase + i * SLOT
            for hdr, iov in ((rh[i].msg_hdr, i), (sh[i].msg_hdr, BATCH + i)):
                hdr.msg_name = nbase + i * NAME
                hdr.msg_iov = ibase + iov * IOV
                hdr.msg_iovlen = 1
                if self.pktinfo:
                    hdr.msg_control = cbase + i * CONTROL
            rh[i].msg_hdr.msg_namelen = NAME
            sh[i].msg_hdr.msg_namelen = namelen
            if self.pktinfo:
                rh[i].msg_hdr.msg_controllen = CONTROL
        del iovs, rh, sh  # (an mmap with live exports cannot be closed)
        self.rtemplate = memoryview(bytes(self.rhdr))  # recvmmsg writes lengths into its headers: reset them
        self.rhdr_view = memoryview(self.rhdr)
        self.shdr_view = memoryview(self.shdr)
        self.packed_view = memoryview(self.packed)
        self.sizes = memoryview(self.rhdr).cast("I")  # msg_len of datagram i: [i * HDR // 4 + _LEN_AT // 4]
        self.rsize_t = memoryview(self.rhdr).cast("P")  # msg_controllen as received
        self.ssize_t = memoryview(self.shdr).cast("P")  # msg_controllen to send
        self.iov_size_t = memoryview(self.iovs).cast("P")  # iov_len of reply i: [(BATCH + i) * IOV // SIZE_T + 1]
        self.name_words = memoryview(self.names).cast("I")  # an IPv4 sender: word i * NAME // 4 + 1
        self.rhdr_at, self.shdr_at, self.packed_at = (ctypes.c_void_p(_address(b))
                                                      for b in (self.rhdr, self.shdr, self.packed))
        # per slot: where its datagram starts in rbuf, and the indexes of its received length, of its
        # sender's IPv4 address and of its reply's length in the views above (computed once, not per datagram)
        self.slots = [(i * SLOT, i * HDR // 4 + _LEN_AT // 4, i * NAME // 4 + 1,
                       (BATCH + i) * IOV // SIZE_T + _IOV_LEN_AT // SIZE_T) for i in range(BATCH)]
        self.used = 0  # headers recvmmsg filled last time
        self.reading = False
        self.flush_scheduled = False
        sock.setblocking(False)
        self._resume_reading()

    # ----------------------------------------------------------------------------------------

    def _readable(self) -> None:
        used = self.used
        if used:
            self.rhdr_view[: used * HDR] = self.rtemplate[: used * HDR]
        n = self._recvmmsg(self.fd, self.rhdr_at, BATCH, 0, None)
        if n <= 0:
            self.used = 0
            if n < 0:
                err = ctypes.get_errno()
                if err not in _RETRY:
                    log.debug("UDP receive error: %s", errno.errorcode.get(err, err))
            return
        self.used = n
        if self.may_answer is not None and not self.may_answer():
            return
        answer = self.answer
        rbuf, sbuf, names, clients, slots = self.rbuf, self.sbuf, self.names, self.clients, self.slots
        sizes, iov_sizes, words = self.sizes, self.iov_size_t, self.name_words
        pktinfo, v6 = self.pktinfo, self.v6
        ready: list[int] = []
        for i in range(n):
            off, size_at, word_at, iov_at = slots[i]
            data = rbuf[off : off + sizes[size_at]]
            if v6:
                key: Any = names[i * NAME + 8 : i * NAME + 24]
            else:
                key = words[word_at]
            client = clients.get(key)
            if client is None:
                client = self._client(key)
            try:
                result = answer(data, client, False)
            except Exception:
                log.exception("internal error answering a UDP query from %s", client)
                result = rejection_reply(data, INTERNAL_ERROR, self.pipeline.udp_max)
            if result is None:
                continue
            control = self._keep_control(i) if pktinfo else 0
            if result.__class__ is bytes:
                size = len(result)  # (a UDP reply is at most dns.udp_max_size: it fits its slot)
                sbuf[off : off + size] = result
                iov_sizes[iov_at] = size
                ready.append(i)
            else:
                name = names[i * NAME : (i + 1) * NAME]
                kept = self.controls[i * CONTROL : i * CONTROL + control] if control else b""
                self.resolver.start(result, partial(self._forwarded, name, kept))  # type: ignore[arg-type]
        if ready:
            self._send_slots(ready)

    def _client(self, key: Any) -> str:
        """The text form of a sender's address, as the pipeline and the rate limiter know clients."""
        if len(self.clients) >= CLIENT_MEMO:
            self.clients.clear()
        if self.v6:
            text = socket.inet_ntop(socket.AF_INET6, key)
            client = normalize_client(text) if "." in text else text  # IPv4-mapped: the IPv4 address
        else:
            client = socket.inet_ntoa(key.to_bytes(4, sys.byteorder))
        self.clients[key] = client
        return client

    def _keep_control(self, i: int) -> int:
        """Datagram i's destination, as the source of its reply (its control message goes back as is);
        returns the control message's length."""
        stride = HDR // SIZE_T
        at = _CONTROLLEN_AT // SIZE_T
        length = self.rsize_t[i * stride + at]
        self.ssize_t[i * stride + at] = length
        if length and not self.v6:  # in_pktinfo: the interface index left to the routing table
            self.controls[i * CONTROL + 16 : i * CONTROL + 20] = _ZERO4
        return int(length)

    # ----------------------------------------------------------------------------------------
    # Sending

    def _send_slots(self, ready: list[int]) -> None:
        """Send the replies in slots `ready` (ascending), whose addresses and control messages are in place."""
        count = len(ready)
        if ready[-1] == count - 1:  # slots 0..count-1: the template's headers as they are
            at = self.shdr_at
        else:
            packed, template = self.packed_view, self.shdr_view
            for j, i in enumerate(ready):
                packed[j * HDR : (j + 1) * HDR] = template[i * HDR : (i + 1) * HDR]
            at = self.packed_at
        sent = self._sendmmsg(self.fd, at, count, 0)
        if sent == count:
            return
        # Some were not taken (or one was refused): keep the rest, in order, before the slots are reused.
        self._after_partial(sent, [self._owned(i) for i in ready])

    def _owned(self, i: int) -> tuple[bytes, bytes, bytes]:
        size = self.iov_size_t[(BATCH + i) * (IOV // SIZE_T) + _IOV_LEN_AT // SIZE_T]
        control = b""
        if self.pktinfo:
            length = self.ssize_t[i * (HDR // SIZE_T) + _CONTROLLEN_AT // SIZE_T]
            control = self.controls[i * CONTROL : i * CONTROL + length]
        return (self.sbuf[i * SLOT : i * SLOT + size], self.names[i * NAME : (i + 1) * NAME], control)

    def _after_partial(self, sent: int, items: list[tuple[bytes, bytes, bytes]]) -> None:
        """`sendmmsg` took `sent` of `items` (-1: none, errno says why): keep the rest for later."""
        if sent < 0:
            err = ctypes.get_errno()
            sent = 0
            if err not in _RETRY:  # the first one is refused for good: drop it, go on with the others
                self.send_errors += 1
                log.debug("UDP send error: %s", errno.errorcode.get(err, err))
                sent = 1
        rest = items[sent:]
        if not rest:
            return
        self.backlog[:0] = rest  # before replies queued later
        self._pause_reading()
        self.loop.add_writer(self.fd, self._writable)

    def _forwarded(self, name: bytes, control: bytes, reply: bytes) -> None:
        """A forwarded query's reply: sent at the end of this turn of the loop, with others that complete in it."""
        if self.closed:
            return
        if self.backlog:
            self.backlog.append((reply, name, control))
            return
        self.late.append((reply, name, control))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_late)

    def _flush_late(self) -> None:
        self.flush_scheduled = False
        items, self.late = self.late, []
        if self.closed or not items:
            return
        if self.backlog:
            self.backlog.extend(items)
            return
        self._send_owned(items)

    def _writable(self) -> None:
        items, self.backlog = self.backlog, []
        self.loop.remove_writer(self.fd)
        if not self.closed:
            self._send_owned(items)
        if not self.backlog:
            self._resume_reading()

    def _send_owned(self, items: list[tuple[bytes, bytes, bytes]]) -> None:
        """Send replies held as bytes, through the slots (free outside `_readable`), BATCH at a time."""
        iov_sizes, ssize_t = self.iov_size_t, self.ssize_t
        iov_at = BATCH * IOV // SIZE_T + _IOV_LEN_AT // SIZE_T
        control_at = _CONTROLLEN_AT // SIZE_T
        while items:
            chunk = items[:BATCH]
            for i, (reply, name, control) in enumerate(chunk):
                size = len(reply)
                self.sbuf[i * SLOT : i * SLOT + size] = reply
                iov_sizes[iov_at + i * (IOV // SIZE_T)] = size
                self.names[i * NAME : (i + 1) * NAME] = name
                if self.pktinfo:
                    self.controls[i * CONTROL : i * CONTROL + len(control)] = control
                    ssize_t[i * (HDR // SIZE_T) + control_at] = len(control)
            sent = self._sendmmsg(self.fd, self.shdr_at, len(chunk), 0)
            if sent != len(chunk):
                self._after_partial(sent, items)
                return
            items = items[BATCH:]


def pktinfo_supported() -> bool:
    """Whether a wildcard socket can learn each datagram's destination (IP_PKTINFO: Linux and a few more)."""
    return _IP_PKTINFO >= 0 and _IPV6_RECVPKTINFO >= 0 and hasattr(socket.socket, "recvmsg")


class PktinfoUdp(_ServedSocket):
    """dns.udp_io = "asyncio" on a wildcard address: one recvmsg and one sendmsg per datagram (the
    event loop's datagram endpoint cannot pass control messages), so that the reply leaves from the
    address the query was sent to (see the module's docstring). A reply the socket cannot take
    waits, in order, for it to become writable, reading paused meanwhile."""

    def __init__(self, sock: socket.socket, pipeline: Pipeline, resolver: Resolver,
                 may_answer: Callable[[], bool] | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.v6 = sock.family == socket.AF_INET6
        if self.v6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        self.pipeline = pipeline
        self.resolver = resolver
        self.may_answer = may_answer
        self.loop = asyncio.get_running_loop()
        self.backlog: list[tuple[bytes, Any, list[tuple[int, int, bytes]]]] = []
        self.send_errors = 0
        self.closed = False
        self.reading = False
        sock.setblocking(False)
        self._resume_reading()

    def _readable(self) -> None:
        try:
            data, ancillary, _flags, addr = self.sock.recvmsg(SLOT, CONTROL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("UDP receive error: %s", exc)
            return
        if self.may_answer is not None and not self.may_answer():
            return
        host = addr[0]
        client = normalize_client(host) if self.v6 and ("." in host or "%" in host) else host
        try:
            result = self.pipeline.answer(data, client, False)
        except Exception:
            log.exception("internal error answering a UDP query from %s", client)
            result = rejection_reply(data, INTERNAL_ERROR, self.pipeline.udp_max)
        if result is None:
            return
        control = [(level, kind, _source_of(level, kind, value)) for level, kind, value in ancillary]
        if result.__class__ is bytes:
            self._send(addr, control, result)
        else:
            self.resolver.start(result, partial(self._send, addr, control))  # type: ignore[arg-type]

    def _send(self, addr: Any, control: list[tuple[int, int, bytes]], reply: bytes) -> None:
        if self.closed:
            return
        if self.backlog:
            self.backlog.append((reply, addr, control))
            return
        self._try_send(reply, addr, control)

    def _try_send(self, reply: bytes, addr: Any, control: list[tuple[int, int, bytes]]) -> bool:
        try:
            self.sock.sendmsg([reply], control, 0, addr)
        except (BlockingIOError, InterruptedError):
            self.backlog.insert(0, (reply, addr, control))
            self._pause_reading()
            self.loop.add_writer(self.fd, self._writable)
            return False
        except OSError as exc:
            self.send_errors += 1
            log.debug("UDP send error: %s", exc)
        return True

    def _writable(self) -> None:
        self.loop.remove_writer(self.fd)
        items, self.backlog = self.backlog, []
        for n, (reply, addr, control) in enumerate(items):
            if not self._try_send(reply, addr, control):
                self.backlog[1:1] = items[n + 1 :]
                return
        self._resume_reading()


def _source_of(level: int, kind: int, value: bytes) -> bytes:
    """A received IP_PKTINFO as the one to send: the IPv4 interface index left to the routing table."""
    if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(value) >= 12:
        return _ZERO4 + value[4:12]
    return value


# --------------------------------------------------------------------------------------------
# The upstream side: replies to forwarded queries, and the queries themselves


REPLIES: Final = 16  # upstream replies per recvmmsg (a wake-up of one upstream socket finds a handful)
QUERY_SLOT: Final = 512  # room for a query of ours: header, a name of up to 255 bytes, type, class, OPT
_NAMELEN_AT: Final = _Msghdr.msg_namelen.offset


class UpstreamBatches:
    """recvmmsg and sendmmsg for the upstream UDP sockets (dns/upstreams.py): the replies waiting in
    a socket taken REPLIES at a time, and the queries of one turn of the event loop that leave from
    one socket sent with one call. One set of buffers serves every socket of the process: each call
    reads or writes one socket, to the end, before the next can begin."""

    def __init__(self) -> None:
        if _CALLS is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        self._recvmmsg, self._sendmmsg = _CALLS
        self.rbuf = mmap.mmap(-1, REPLIES * SLOT)
        self.sbuf = mmap.mmap(-1, BATCH * QUERY_SLOT)
        self.rnames = mmap.mmap(-1, REPLIES * NAME)
        self.snames = mmap.mmap(-1, BATCH * NAME)
        self.rhdr = mmap.mmap(-1, REPLIES * HDR)
        self.shdr = mmap.mmap(-1, BATCH * HDR)
        self.iovs = mmap.mmap(-1, (REPLIES + BATCH) * IOV)  # receive, then send
        rbase, sbase, rnames, snames, ibase = (_address(b) for b in (self.rbuf, self.sbuf, self.rnames, self.snames,
                                                                      self.iovs))
        iovs = (_Iovec * (REPLIES + BATCH)).from_buffer(self.iovs)
        rh = (_Mmsghdr * REPLIES).from_buffer(self.rhdr)
        sh = (_Mmsghdr * BATCH).from_buffer(self.shdr)
        for i in range(REPLIES):
            iovs[i].iov_base, iovs[i].iov_len = rbase + i * SLOT, SLOT
            hdr = rh[i].msg_hdr
            hdr.msg_name, hdr.msg_namelen = rnames + i * NAME, NAME
            hdr.msg_iov, hdr.msg_iovlen = ibase + i * IOV, 1
        for i in range(BATCH):
            iovs[REPLIES + i].iov_base = sbase + i * QUERY_SLOT
            hdr = sh[i].msg_hdr
            hdr.msg_name = snames + i * NAME
            hdr.msg_iov, hdr.msg_iovlen = ibase + (REPLIES + i) * IOV, 1
        del iovs, rh, sh  # (an mmap with live exports cannot be closed)
        self.rtemplate = memoryview(bytes(self.rhdr))  # recvmmsg writes lengths into its headers: reset them
        self.rhdr_view = memoryview(self.rhdr)
        self.sizes = memoryview(self.rhdr).cast("I")  # msg_len of reply i: [i * HDR // 4 + _LEN_AT // 4]
        self.namelens = memoryview(self.shdr).cast("I")  # msg_namelen of query i: [(i * HDR + _NAMELEN_AT) // 4]
        self.iov_sizes = memoryview(self.iovs).cast("P")  # iov_len of query i: [(REPLIES + i) * IOV // SIZE_T + 1]
        self.rhdr_at, self.shdr_at = ctypes.c_void_p(_address(self.rhdr)), ctypes.c_void_p(_address(self.shdr))
        self.used = 0

    def receive(self, fd: int, v6: bool, handle: Callable[[bytes, bytes], None]) -> None:
        """Hand every datagram waiting in `fd` to `handle(datagram, source)`: `source` is the
        sender's port and address as its sockaddr holds them (upstreams.sockaddr_of gives a server's)."""
        rbuf, names, sizes = self.rbuf, self.rnames, self.sizes
        end = 28 if v6 else 8  # sockaddr_in6: port, flow label (0 on receipt), address, scope; IPv4: port, address
        stride, len_at = HDR // 4, _LEN_AT // 4
        while True:
            used = self.used
            if used:
                self.rhdr_view[: used * HDR] = self.rtemplate[: used * HDR]
            n = self._recvmmsg(fd, self.rhdr_at, REPLIES, 0, None)
            if n <= 0:
                self.used = 0
                if n < 0:
                    err = ctypes.get_errno()
                    if err not in _RETRY:  # an ICMP error queued for the socket: the attempt times out
                        log.debug("upstream socket error: %s", errno.errorcode.get(err, err))
                return
            self.used = n
            for i in range(n):
                off = i * SLOT
                handle(rbuf[off : off + sizes[i * stride + len_at]], names[i * NAME + 2 : i * NAME + end])
            if n < REPLIES:
                return

    def send(self, fd: int, batch: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        """Send up to BATCH (query, sockaddr) pairs from `fd` with one sendmmsg: how many the kernel
        took, and if it took none, the errno of the first (it refused that one)."""
        if len(batch) > BATCH:
            raise ValueError(f"{len(batch)} queries for {BATCH} slots")
        sbuf, names, namelens, iov_sizes = self.sbuf, self.snames, self.namelens, self.iov_sizes
        iov_at = REPLIES * IOV // SIZE_T + _IOV_LEN_AT // SIZE_T
        namelen_at = _NAMELEN_AT // 4
        for j, (message, address) in enumerate(batch):
            size = len(message)
            if size > QUERY_SLOT or len(address) > NAME:
                raise ValueError(f"a query of {size} bytes to a {len(address)}-byte address")
            sbuf[j * QUERY_SLOT : j * QUERY_SLOT + size] = message
            iov_sizes[iov_at + j * (IOV // SIZE_T)] = size
            names[j * NAME : j * NAME + len(address)] = address
            namelens[j * (HDR // 4) + namelen_at] = len(address)
        sent = self._sendmmsg(fd, self.shdr_at, len(batch), 0)
        if sent < 0:
            return 0, ctypes.get_errno()
        return sent, 0


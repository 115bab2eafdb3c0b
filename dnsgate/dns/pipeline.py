"""The per-query decision: parse -> match vendor -> look up consent -> sinkhole, cached answer, or forward.

Each step feels the effect of the ones before it and never of those after (CoreDNS's rule):
  1. parse the query (raw bytes; `wire.parse_query` for anything unusual),
  2. names dnsgate answers itself (`local_answers`: localhost, canaries, health probe, ...),
  3. match the name against the catalog and its lists (the cache entry remembers the rule it is
     gated on, including a vendor its answer leads into through a CNAME: `admit`),
  4. look up the client's consent for the rule's vendor: no consent -> the sinkhole answer; the
     cache is never allowed to bypass this (the client is the source address; on the general
     path, a trusted forwarder's EDNS options may name the device behind it: dns/identity.py),
  5. serve the cached answer (asking for a prefetch when it nears expiry), answer ANY and zone
     transfers locally, or hand back a `Forward` for the shell to resolve upstream and `complete`
     (or, when every upstream failed, answer `stale` per RFC 8767). Pairing names,
     `<token>.pair.<portal host>`, are answered before step 2, since they live in dnsgate's zone.
No I/O here: the shell (dns/forwarding.py) does the awaiting, and tests drive this directly.
The first branch of `answer` is the same steps inlined for the common shapes (no Query object is
built): tests check it against the general path.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from dnsgate.consent.model import FOREVER, ClientState, ConsentTable
from dnsgate.dns.admission import Admission
from dnsgate.dns.cache import ADDRESSES, ALIASES, AnswerCache, Entry, TtlPolicy, UnusableReply, entry_from_reply
from dnsgate.dns.cloaking import answer_rule
from dnsgate.dns.cname_chains import ChainLoop, chain_target, joined_reply
from dnsgate.dns.identity import QueryIdentity
from dnsgate.dns.local_answers import CH, SERVER_ID_NAMES, LocalTable, local_reply, server_id_reply
from dnsgate.dns.local_records import LocalRecords, Resolved
from dnsgate.dns.sinkhole import Sinkhole
from dnsgate.dns.tally import (
    CACHED,
    DROPPED,
    FORMERR,
    FORWARDED,
    LOCAL,
    NONE,
    NOTIMP,
    OTHER,
    REFUSED,
    SERVFAIL,
    SINKHOLED,
    STALE,
    TYPE_SLOT,
    LogEntry,
    Tally,
    slot,
    type_slot,
)
from dnsgate.histogram import QUERY_BUCKETS, Histogram
from dnsgate.rules.catalog import Catalog, DomainRule
from dnsgate.wire import (
    AD,
    ANY,
    AXFR,
    BADVERS,
    CD,
    CNAME,
    COUNTS,
    EDE_NOT_SUPPORTED,
    EDE_STALE,
    HEADER,
    HINFO,
    IN,
    IXFR,
    MIN_UDP,
    QR,
    RA,
    RD,
    RR_FIXED,
    Edns,
    Query,
    Rejection,
    cache_key,
    ede_option,
    error_reply,
    opt_record,
    parse_query,
    records_well_formed,
    rejection_reply,
    scan_name,
)
from dnsgate.wire import FORMERR as FORMERR_RCODE
from dnsgate.wire import NOTIMP as NOTIMP_RCODE
from dnsgate.wire import REFUSED as REFUSED_RCODE
from dnsgate.wire import SERVFAIL as SERVFAIL_RCODE

log = logging.getLogger(__name__)

ID_FLAGS: Final = struct.Struct(">HH")
TCP_LIMIT: Final = 65535
_OPT_HEAD: Final = b"\x00\x00\x29"  # root owner, type OPT
_SINKHOLED: Final = slot(SINKHOLED, 0)
_SINKHOLED_OTHER: Final = slot(SINKHOLED, OTHER)
_CACHED_OTHER: Final = slot(CACHED, OTHER)
_FORWARDED_OTHER: Final = slot(FORWARDED, OTHER)
CLASS_ANY: Final = 255
# Meta-types and the OPT pseudo-type (RFC 6895 §3.1): never questions a resolver answers; FORMERR,
# the reason in an Extended DNS Error "Not Supported"
META_TYPES: Final = {
    41: "OPT is a pseudo-record of EDNS, not a type to ask for (RFC 6891)",
    249: "TKEY is a meta-type for key agreement between servers (RFC 2930), not a question",
    250: "TSIG is a meta-type that signs messages (RFC 8945), not a question",
    253: "MAILB is an obsolete meta-type (RFC 883), not supported",
    254: "MAILA is an obsolete meta-type (RFC 883), not supported",
}
# RFC 8482 §4.2: one HINFO record, CPU "RFC8482", OS empty, owned by the question's name
ANY_HINFO: Final = b"\xc0\x0c" + RR_FIXED.pack(HINFO, IN, 3600, 9) + b"\x07RFC8482\x00"
GATED_MEMO_LIMIT: Final = 65_536
SUNK_LIMIT: Final = 65_536  # sinkhole answers kept per (question, client)
# A sinkhole answer kept for one client: the client's consent state it was decided from and the
# EDNS form (-1, 0, 1) it was made for, the wall time it holds until, its count slot, the vendor as
# logged, then the reply's flags but RD/CD, its counts and its records after the question
# (sinkhole.Parts)
Sunk = tuple[ClientState, int, float, int, tuple[str, str], int, bytes, bytes]
PREFETCH_AT: Final = 0.9  # share of an entry's lifetime after which a hit triggers a refresh
PREFETCH_MIN_TTL: Final = 2  # entries that live shorter are not refreshed early


@dataclass(slots=True)  # not frozen: it is built per miss, and a frozen dataclass costs 4x to create
class Forward:
    """The query needs an upstream answer; `rule` is the catalog rule of its name, if any.
    `started` is the monotonic time the query arrived (for the duration histogram and the log)."""

    query: Query
    rule: DomainRule | None
    client: str
    tcp: int  # the transport (tally.PROTOCOLS): 0 UDP; any other is a stream, never truncated
    started: float = 0.0
    catalog: Catalog | None = None  # the catalog `rule` comes from
    hop: int = 0  # names asked before this one to complete a CNAME chain (0: the client's own question)
    awaits: bytes | None = None  # the cache key of the chain target this answer waits for, if any
    # A local CNAME chain that leaves the local data (local_records.py): the aliases, as an upstream
    # would answer them; the resolver completes the chain from the name it stops at, caching nothing
    # under the question's own name (the local data answers it).
    local: bytes | None = None


@dataclass(slots=True)
class Chase:
    """An upstream answer whose CNAME chain stops short of the records asked for (dns/cname_chains.py):
    `target` is the name to ask next (lower-case wire), `key` its cache key, `entry` the answer as it
    stands (gated on what it reveals; not cached)."""

    reply: bytes
    target: bytes
    key: bytes
    entry: Entry


class Pipeline:
    __slots__ = ("admission", "any_query", "cache", "cached_slot", "catalog", "consent", "counters", "counts",
                 "durations", "entries", "forwarded_slot", "gated", "gated_ttl", "gates", "identity", "kiosk_seen",
                 "local", "log_all", "log_gated", "mono", "on_refresh", "opt_tail", "plain_ttl", "prefetch", "records",
                 "server_id", "sinkhole", "sinkhole_slot", "stale_tail", "stale_ttl", "sunk", "trust_ad", "udp_max",
                 "wall")

    def __init__(
        self,
        catalog: Catalog,
        consent: ConsentTable,
        cache: AnswerCache,
        sinkhole: Sinkhole,
        *,
        udp_max: int,
        plain_ttl: TtlPolicy,
        gated_ttl: TtlPolicy,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        identity: QueryIdentity | None = None,
        local: LocalTable | None = None,
        records: LocalRecords | None = None,
        any_query: Literal["hinfo", "refused"] = "hinfo",
        trust_ad: bool = False,
        prefetch: bool = False,
        stale_ttl: int = 30,
        admission: Admission | None = None,
        log_gated: Callable[[LogEntry], None] | None = None,
        log_all: Callable[[LogEntry], None] | None = None,
        on_refresh: Callable[[Forward], None] | None = None,
        server_id: bytes = b"dnsgate",
    ) -> None:
        self.catalog = catalog
        # Who may ask and how fast (dns/admission.py); by default everyone, without a rate limit.
        self.admission = admission if admission is not None else Admission(("0.0.0.0/0", "::/0"))
        self.gates = self.admission.gates  # client -> True or [tokens, allowed]: read directly
        self.consent = consent
        self.cache = cache
        # The fast path's lookups skip a method call. A packed value (bytes: an entry not served since
        # eviction last passed it) has no `expires`: the fast path has `cache.get` unpack it.
        self.entries: dict[bytes, Entry] = cache.entries  # type: ignore[assignment]
        # cache key -> rule, for gated questions met on the general path: the fast path sinkholes
        # them with the key it has already hashed (the catalog's own memo is keyed by name); and per
        # client asking, the sinkhole answer rendered for it (Sunk), while its decision holds
        self.gated: dict[bytes, tuple[DomainRule, dict[str, Sunk]]] = {}
        self.sunk = 0  # answers kept in `gated`
        self.sinkhole = sinkhole
        self.udp_max = udp_max
        self.plain_ttl = plain_ttl
        self.gated_ttl = gated_ttl
        self.mono = mono
        self.wall = wall
        self.identity = identity
        # Kiosk clients with a choice: their last query time keeps their session alive. The same
        # dict as the consent table's, read directly: empty (no kiosk sessions), it costs one truth test.
        self.kiosk_seen = consent.kiosk_seen
        self.local = local if local is not None else LocalTable()
        self.records = records  # the operator's own names, before the built-in local zones
        self.any_query = any_query
        self.trust_ad = trust_ad  # keep the upstream's AD bit in entries (else it is dropped on admission)
        self.prefetch = prefetch
        self.stale_ttl = stale_ttl
        # The shell's (dns/forwarding.py): called with a Forward when a hit finds its entry near expiry.
        self.on_refresh = on_refresh
        # Our OPT record, without and with DO, appended to replies to EDNS queries.
        self.opt_tail = (opt_record(udp_max, False), opt_record(udp_max, True))
        stale_ede = ede_option(EDE_STALE, "")
        self.stale_tail = (opt_record(udp_max, False, stale_ede), opt_record(udp_max, True, stale_ede))
        self.counters = Tally()
        # where a sinkholed query of each type (< 256) is counted, over UDP; +1 for TCP
        self.sinkhole_slot = [slot(SINKHOLED, TYPE_SLOT[t]) for t in range(256)]
        self.cached_slot = [slot(CACHED, TYPE_SLOT[t]) for t in range(256)]  # an entry's count_slot
        self.forwarded_slot = [slot(FORWARDED, TYPE_SLOT[t]) for t in range(256)]
        self.counts = self.counters.counts  # the hot path's one increment, one attribute away
        # Seconds from arrival to reply of queries that went upstream (answers from memory take
        # microseconds and are not timed: two clock reads would cost more than the answer).
        self.durations = Histogram(QUERY_BUCKETS)
        # Query-log sinks (observe/querylog.py): `log_gated` receives every query for a gated name,
        # `log_all` (None unless the log keeps every query) every other one. Each is a list's
        # append, so recording costs one tuple.
        self.log_gated = log_gated
        self.log_all = log_all
        # What `dig CH TXT id.server` answers: which process this is (a worker says its number).
        self.server_id = server_id

    # ----------------------------------------------------------------------------------------
    def answer(self, data: bytes, client: str, tcp: int) -> bytes | Forward | None:
        """The reply to send now, a Forward to resolve upstream, or None to stay silent. `tcp` is the
        transport the query came on (tally.PROTOCOLS: 0 UDP, 1 TCP, 2 DNS over TLS, 3 DNS over HTTPS):
        replies on any but UDP are never truncated, and each is counted and logged under its own.

        The steps of `_answer_general`, inlined for the packets nearly every client sends (a standard
        query, at most an empty OPT) when the answer is in memory: a cache hit, or the sinkhole for
        a name already matched. Every other case goes the general way. About 1 µs of Python here
        costs about 10 % of throughput (measured with tests/bench/handler_cost.py), hence the shape.
        First of all, who may ask and how fast (dns/admission.py): one dict lookup and an identity test
        for a client in the ACL that is not rate limited; two subscripts and a decrement more for one
        that is."""
        gate = self.gates.get(client)
        if gate is not True:  # True: in the ACL and not rate limited (loopback; everyone when rate is 0)
            if gate is not None and gate[1] and gate[0] > 0:  # in the ACL, tokens left this second
                gate[0] -= 1
            else:  # first sight, outside the ACL, or over the prefix's rate: dns/admission.py decides
                verdict = self.admission.turn_away(gate, client, data, tcp, self.counters, self.udp_max)
                if verdict is not True:
                    return verdict
        seen = self.kiosk_seen
        if seen and client in seen:
            self.consent.touch(client, self.wall())
        n = len(data)
        if n < 17:
            return self._answer_general(data, client, tcp)
        qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
        if flags & 0xF800 or qdcount != 1 or ancount or nscount:  # QR=1, an opcode, odd counts
            return self._answer_general(data, client, tcp)
        # The question is the rest of the packet, or all but an empty OPT record at its end. Whether
        # it is well formed is not checked here: only a key seen before can hit (cache.cache_key).
        if arcount == 0:
            question = data[12:]
            edns = -1
        elif (arcount == 1 and n >= 28 and data[-11:-8] == _OPT_HEAD and not data[-5] and not data[-2]
              and not data[-1]):  # n >= 28: room for a question (5+) before the OPT (the fuzzer found it)
            question = data[12:-11]  # EDNS version 0, no options
            edns = data[-4] >> 7
        else:
            return self._answer_general(data, client, tcp)
        lower = question.lower()
        if question[-3] > 64 or question[-4] or question[-2] or question[-1] > 64:
            lower = lower[:-4] + question[-4:]  # fold the name only: HTTPS is type 65, b"A"
        key = lower + (b"\x02" if edns == 1 else b"\x00")  # = cache_key(lower, edns == 1, cd=False)
        if flags & CD:
            key = cache_key(lower, edns == 1, True)
        now = self.mono()
        entry = self.entries.get(key)
        if entry is not None:
            try:
                expires = entry.expires
            except AttributeError:  # packed: its first hit since eviction passed it
                found = self.cache.get(key, now)  # unpacked (and kept so), if fresh
                if found is None:
                    return self._answer_general(data, client, tcp)  # drops it, or keeps it for serve-stale
                entry, expires = found, found.expires
            if expires <= now:
                return self._answer_general(data, client, tcp)  # drops it, or keeps it for serve-stale
            rule = entry.rule
            if rule is None or not (cause := self.consent.blocked(client, rule.vendor, wall := self.wall())):
                # a cache hit
                entry.seen = True  # (the cache's second chance)
                shape = entry.shape
                self.counts[shape.count_slot + tcp] += 1
                if rule is None:
                    if self.log_all is not None:
                        self.log_all((now, client, question, tcp, CACHED, shape.flags & 0xF, None, None, 0.0))
                elif self.log_gated is not None:
                    self.log_gated((now, client, question, tcp, CACHED, shape.flags & 0xF, rule.vendor.logged,
                                    self.consent.grant_for(client, rule.vendor, wall), 0.0))
                fl = shape.reply_flags | (flags & 0x0110)  # RD and CD copied
                if fl & AD and not (flags & AD or edns == 1):
                    fl &= ~AD  # AD only to clients that said they understand it (RFC 6840 §5.8)
                if now < entry.body_until:  # (never past the prefetch time: one check for both)
                    body = entry.body
                else:
                    body = entry.body_at(now)
                    if entry.refresh_at <= now:
                        self._refresh(key, entry)
                if edns < 0:
                    if n + entry.extra > MIN_UDP and not tcp:
                        return self._truncated(qid, fl, question, edns)
                    return ID_FLAGS.pack(qid, fl) + shape.head + question + body
                if n + entry.extra > MIN_UDP and not tcp and n + entry.extra > _udp_limit(data, edns, self.udp_max):
                    return self._truncated(qid, fl, question, edns)
                return ID_FLAGS.pack(qid, fl) + shape.head_edns + question + body + self.opt_tail[edns]
        else:
            gated = self.gated.get(key)  # gated questions seen before; None: not gated, or unseen
            if gated is not None:
                rule, sunk = gated
                consent = self.consent
                memo = sunk.get(client)  # this client's sinkhole answer to it, as last rendered
                if (memo is not None and memo[0] is consent.states.get(client) and memo[1] == edns
                        and (memo[2] == FOREVER or self.wall() < memo[2])):  # (no clock read for no limit)
                    self.counts[memo[3] + tcp] += 1
                    if self.log_gated is not None:
                        self.log_gated((now, client, question, tcp, SINKHOLED, -1, memo[4], None, 0.0))
                    return ID_FLAGS.pack(qid, memo[5] | (flags & 0x0110)) + memo[6] + question + memo[7]
            if gated is None or not (decided := self.consent.decided(client, gated[0].vendor, self.wall()))[0]:
                # not in memory: the general steps, without parsing the packet a second time
                if scan_name(question, 0) != len(question) - 5:
                    return self._answer_general(data, client, tcp)  # a malformed name: FORMERR
                qtype = (question[-4] << 8) | question[-3]
                q = Query(qid, flags, question, lower[:-4], qtype, (question[-2] << 8) | question[-1],
                          None if edns < 0 else Edns((data[-8] << 8) | data[-7], 0, edns == 1), key)
                return self._decide(q, data, client, tcp, now)
            cause, state = decided
        # the sinkhole: a gated name, and this client has not consented to its vendor
        assert rule is not None
        qtype = (question[-4] << 8) | question[-3]
        parts = self.sinkhole.parts(qtype, rule, edns, cause)
        reply = ID_FLAGS.pack(qid, parts[0] | (flags & 0x0110)) + parts[1] + question + parts[2]
        if len(reply) > MIN_UDP and not tcp:
            return self._answer_general(data, client, tcp)  # it truncates
        count_slot = self.sinkhole_slot[qtype] if qtype < 256 else _SINKHOLED_OTHER
        self.counts[count_slot + tcp] += 1
        if self.log_gated is not None:
            self.log_gated((now, client, question, tcp, SINKHOLED, -1, rule.vendor.logged, None, 0.0))
        if entry is None:
            # Remembered for this client's next asking, as long as the consent table keeps the state
            # it was decided from (a change that can alter this client's decisions forgets it: its
            # own or a network's choice, the notice, the profiles, the vendors; other clients'
            # changes do not) and the decision's own time limit (a grant's expiry, a kiosk
            # session's idle limit) says it holds.
            self.sunk += 1
            if self.sunk > SUNK_LIMIT:
                self.gated.clear()  # (the general path finds the rules again)
                self.sunk = 0
            sunk[client] = (state, edns, state.until, count_slot, rule.vendor.logged, *parts)
        return reply

    def _answer_general(self, data: bytes, client: str, tcp: int) -> bytes | Forward | None:
        q = parse_query(data)
        if isinstance(q, Rejection):
            self._rejected(q, data, client, tcp)
            return rejection_reply(data, q, self.udp_max)
        now = self.mono()
        if q.edns is not None and q.edns.version != 0:
            self._plain(FORMERR, now, client, q, tcp, BADVERS, 0.0)
            return error_reply(q, BADVERS, self.udp_max)  # RFC 6891 §6.1.3
        return self._decide(q, data, client, tcp, now)

    def _decide(self, q: Query, data: bytes, client: str, tcp: int, now: float) -> bytes | Forward | None:
        """Steps 2 to 5 for a parsed query."""
        identity = self.identity
        if identity is not None and client in identity.trusted:
            client = identity.client_of(data, q, client)  # the device behind a trusted forwarder
        why = META_TYPES.get(q.qtype)
        if why is not None:  # never a question: not forwarded, whatever the name (as unbound and dnsmasq)
            self._plain(FORMERR, now, client, q, tcp, FORMERR_RCODE, 0.0)
            return error_reply(q, FORMERR_RCODE, self.udp_max, ede_option(EDE_NOT_SUPPORTED, why), ra=False)
        if q.qclass != IN:
            if q.qclass == CLASS_ANY:  # QCLASS * (RFC 1035): IN is the one class there is; cached and asked as IN
                q.key = q.key[:-3] + b"\x00\x01" + q.key[-1:]
            elif q.qclass == CH and q.name in SERVER_ID_NAMES:
                self._plain(LOCAL, now, client, q, tcp, 0, 0.0)
                return self._limit(q, server_id_reply(q, self.server_id, self.udp_max), tcp)
            else:  # CH, HS, NONE, numbered classes: no upstream serves them (unbound refuses them too)
                self._plain(REFUSED, now, client, q, tcp, REFUSED_RCODE, 0.0)
                return error_reply(q, REFUSED_RCODE, self.udp_max)
        if identity is not None and q.name.endswith(identity.pair_suffix):  # in dnsgate's zone: before it
            paired = identity.pairing_reply(q, client, self.udp_max)  # <token>.pair.<portal host>
            if paired is not None:
                return paired
        records = self.records
        if records is not None:
            found = records.resolve(q.name, q.qtype)
            if found is not None:
                return self._local_records(records, found, q, client, tcp, now)
        local = self.local.match(q.name)
        if local is not None:
            reply = self._limit(q, local_reply(local, q, self.udp_max, client), tcp)
            self._plain(LOCAL, now, client, q, tcp, reply[3] & 0xF, 0.0)
            return reply
        edns = -1 if q.edns is None else int(q.edns.do)
        entry = self.cache.get(q.key, now)
        if entry is not None:
            rule = entry.rule
        else:
            rule = self.catalog.match(q.name)
            if rule is not None:  # the fast path sinkholes this question from now on
                gated = self.gated
                if len(gated) >= GATED_MEMO_LIMIT:
                    gated.clear()
                if q.key not in gated:
                    gated[q.key] = (rule, {})
        if rule is not None and (cause := self.consent.blocked(client, rule.vendor, self.wall())):
            self._gated(SINKHOLED, now, client, q.question, q.qtype, tcp, -1, rule, 0.0)
            return self._limit(q, self.sinkhole.reply(q.id, q.flags, q.question, q.qtype, rule, edns, cause), tcp)
        if entry is not None:
            if entry.refresh_at <= now:
                self._refresh(q.key, entry)
            reply = self._render(entry, q.id, q.flags, q.question, edns, now, self._reply_limit(q, tcp))
            if rule is not None:
                self._gated(CACHED, now, client, q.question, q.qtype, tcp, entry.flags & 0xF, rule, 0.0)
            else:
                self._plain(CACHED, now, client, q, tcp, entry.flags & 0xF, 0.0)
            return reply
        if q.qtype == ANY:
            refused = self.any_query == "refused"
            self._plain(REFUSED if refused else LOCAL, now, client, q, tcp, REFUSED_RCODE if refused else 0, 0.0)
            return self._answer_any(q)
        if q.qtype in (AXFR, IXFR):  # a forwarder does not relay zone transfers, nor recurse for them
            self._plain(REFUSED, now, client, q, tcp, REFUSED_RCODE, 0.0)
            return error_reply(q, REFUSED_RCODE, self.udp_max, ra=False)
        self.counters.cache_misses += 1
        return Forward(q, rule, client, tcp, now, self.catalog)

    def _local_records(self, records: LocalRecords, found: Resolved, q: Query, client: str, tcp: int,
                       now: float) -> bytes | Forward:
        """The operator's answer for `q`, gated as an upstream's would be: on the first name of its
        CNAME chain that the catalog matches (the question's own included), else on what its records
        lead into (cloaking.py: addresses of a vendor's ranges). A chain that leaves the local data
        goes on upstream, if this client may see where it leads."""
        catalog = self.catalog
        rule = None
        for name in found.names:
            rule = catalog.match(name)
            if rule is not None:
                break
        edns = -1 if q.edns is None else int(q.edns.do)
        if found.external is not None:
            reply = records.partial(q, found)
        else:
            reply = records.reply(q, found, self.udp_max)
            if rule is None and catalog.checks_addresses:
                rule = answer_rule(catalog, reply, len(q.question))
        if rule is not None and (cause := self.consent.blocked(client, rule.vendor, self.wall())):
            self._gated(SINKHOLED, now, client, q.question, q.qtype, tcp, -1, rule, 0.0)
            return self._limit(q, self.sinkhole.reply(q.id, q.flags, q.question, q.qtype, rule, edns, cause), tcp)
        if found.external is not None:
            self.counters.cache_misses += 1
            return Forward(q, rule, client, tcp, now, catalog, local=reply)
        reply = self._limit(q, reply, tcp)
        if rule is not None:
            self._gated(LOCAL, now, client, q.question, q.qtype, tcp, reply[3] & 0xF, rule, 0.0)
        else:
            self._plain(LOCAL, now, client, q, tcp, reply[3] & 0xF, 0.0)
        return reply

    def _answer_any(self, q: Query) -> bytes:
        """RFC 8482: one small HINFO record instead of everything (or REFUSED); nothing is cached."""
        if self.any_query == "refused":
            return error_reply(q, REFUSED_RCODE, self.udp_max)
        flags = QR | RA | (q.flags & (RD | CD))
        if q.edns is None:
            return HEADER.pack(q.id, flags, 1, 1, 0, 0) + q.question + ANY_HINFO
        return HEADER.pack(q.id, flags, 1, 1, 0, 1) + q.question + ANY_HINFO + self.opt_tail[q.edns.do]

    def _refresh(self, key: bytes, entry: Entry) -> None:
        """Ask the shell, once per entry, to fetch this popular entry again before it expires."""
        entry.refresh_at = math.inf
        if self.on_refresh is not None:
            q = _query_from_key(key)
            self.counters.prefetched += 1
            self.on_refresh(Forward(q, self.catalog.match(q.name), "", False, self.mono()))

    # ----------------------------------------------------------------------------------------
    def complete(self, fwd: Forward, entry: Entry) -> bytes:
        """Answer a forwarded query from its (fresh or coalesced) entry, gating it once more:
        the entry may have revealed a gated vendor behind a CNAME."""
        q = fwd.query
        edns = -1 if q.edns is None else int(q.edns.do)
        rule = entry.rule
        now = self.mono()
        elapsed = now - fwd.started
        self.durations.observe(elapsed)
        if rule is not None and (cause := self.consent.blocked(fwd.client, rule.vendor, self.wall())):
            self._gated(SINKHOLED, now, fwd.client, q.question, q.qtype, fwd.tcp, -1, rule, elapsed)
            return self._limit(q, self.sinkhole.reply(q.id, q.flags, q.question, q.qtype, rule, edns, cause),
                               fwd.tcp)
        # _render, _reply_limit and _plain inlined: this runs once for every client of every miss
        tcp = fwd.tcp
        qflags = q.flags
        flags = QR | RA | (qflags & (RD | CD)) | entry.flags
        if flags & AD and not (qflags & AD or edns == 1):
            flags &= ~AD  # AD only to clients that said they understand it (RFC 6840 §5.8)
        body = entry.body if now < entry.body_until else entry.body_at(now)
        if edns < 0:
            reply = ID_FLAGS.pack(q.id, flags) + entry.head + q.question + body
            limit = TCP_LIMIT if tcp else MIN_UDP
        else:
            reply = ID_FLAGS.pack(q.id, flags) + entry.head_edns + q.question + body + self.opt_tail[edns]
            limit = TCP_LIMIT if tcp else min(max(MIN_UDP, q.edns.udp_size), self.udp_max)  # type: ignore[union-attr]
        if len(reply) > limit:
            reply = self._truncated(q.id, flags, q.question, edns)
        if rule is not None:
            self._gated(FORWARDED, now, fwd.client, q.question, q.qtype, tcp, entry.flags & 0xF, rule, elapsed)
        else:
            qtype = q.qtype
            self.counts[(self.forwarded_slot[qtype] if qtype < 256 else _FORWARDED_OTHER) + tcp] += 1
            if self.log_all is not None:
                self.log_all((now, fwd.client, q.question, tcp, FORWARDED, entry.flags & 0xF, None, None, elapsed))
        return reply

    def admit(self, fwd: Forward, reply: bytes) -> Entry | Chase:
        """Build the entry for a verified upstream reply and cache it if it may be cached; or, for
        an answer whose CNAME chain stops short (dns/cname_chains.py), say which name to ask next.

        The entry is gated on the name's own rule, else on the vendor its answer leads into (CNAME
        cloaking: dns/cloaking.py), so hits are gated like this miss. Raises cache.UnusableReply for
        replies whose records cannot be walked, and for a chain that loops within the answer."""
        q = fwd.query
        if not records_well_formed(reply, 12 + len(q.question)):  # hostile data never reaches the cache
            raise UnusableReply("a record a client could not read (a name that does not decompress, a bad size)")
        entry, cacheable, kinds = self._entry(fwd, reply)
        if kinds & ALIASES and not entry.flags & 0xF and q.qtype != CNAME:
            try:
                target = chain_target(reply, 12 + len(q.question), q.name, q.qtype)
            except ChainLoop as exc:
                raise UnusableReply(str(exc)) from None
            if target is not None:
                return Chase(reply, target, target + q.key[-5:], entry)  # the same type, class, DO and CD
        if cacheable:  # (_keep, inlined: this runs for every miss)
            if self.prefetch and entry.lifetime >= PREFETCH_MIN_TTL:
                entry.refresh_at = entry.filled + PREFETCH_AT * entry.lifetime
            self.cache.put(q.key, entry)
        return entry

    def chained(self, fwd: Forward, chase: Chase, target: Entry, keep: bool = True) -> Entry:
        """The entry for `chase`'s whole answer: its chain, then `target`'s answer for the name the
        chain stopped at, each record's TTL as it stands now (never above the upstream's). Gated on
        every name and address of the whole chain, and cached (unless not `keep`) for as long as
        its shortest-lived part. Raises cache.UnusableReply if the parts cannot be joined."""
        q = fwd.query
        now = self.mono()
        flags = QR | (chase.entry.flags & target.flags & AD) | (target.flags & 0xF)
        try:
            reply = joined_reply(q.key[:-1], chase.reply, int(now - chase.entry.filled), chase.key[:-1],
                                 target.body_at(now), COUNTS.unpack(target.head)[1:], flags)
        except ValueError as exc:
            raise UnusableReply(f"a CNAME chain that cannot be joined: {exc}") from None
        entry, cacheable, _ = self._entry(fwd, reply)
        self._keep(fwd, entry, cacheable and keep and fwd.local is None)
        return entry

    def target_forward(self, fwd: Forward, chase: Chase, hop: int) -> Forward:
        """The upstream question for the name `fwd`'s chain stopped at: the same type, class, DO and
        CD, within the client query's deadline (`started`)."""
        question = chase.key[:-1]
        qtype, qclass = struct.unpack_from(">HH", question, len(question) - 4)
        bits = chase.key[-1]
        target = Query(0, RD | (CD if bits & 1 else 0), question, chase.target, qtype, qclass,
                       Edns(MIN_UDP, 0, True) if bits & 2 else None, chase.key)
        catalog = self.catalog
        return Forward(target, catalog.match(chase.target), "", False, fwd.started, catalog, hop)

    def allows(self, client: str, rule: DomainRule) -> bool:
        """Whether `client` may see an answer gated on `rule` now."""
        return self.consent.allows(client, rule.vendor, self.wall())

    def _entry(self, fwd: Forward, reply: bytes) -> tuple[Entry, bool, int]:
        catalog = self.catalog
        q = fwd.query
        qlen = len(q.question)
        # The rule found when the query came in, unless a reload has swapped the catalog since.
        rule = fwd.rule if fwd.catalog is catalog else catalog.match(q.name)
        now = self.mono()
        entry, cacheable, kinds = entry_from_reply(reply, qlen, now, self.plain_ttl if rule is None else self.gated_ttl,
                                                   rule, self.trust_ad)
        if rule is None and (kinds & ALIASES or (kinds & ADDRESSES and catalog.checks_addresses)):
            cloaked = answer_rule(catalog, reply, qlen)
            if cloaked is not None:  # gated after all, and its TTLs capped like a gated name's
                entry, cacheable, _ = entry_from_reply(reply, qlen, now, self.gated_ttl, cloaked, self.trust_ad)
        entry.count_slot = self.cached_slot[q.qtype] if q.qtype < 256 else _CACHED_OTHER
        return entry, cacheable, kinds

    def _keep(self, fwd: Forward, entry: Entry, cacheable: bool) -> None:
        if cacheable:
            if self.prefetch and entry.lifetime >= PREFETCH_MIN_TTL:
                entry.refresh_at = entry.filled + PREFETCH_AT * entry.lifetime
            self.cache.put(fwd.query.key, entry)

    def install(self, catalog: Catalog, sinkhole: Sinkhole, plain_ttl: TtlPolicy, gated_ttl: TtlPolicy, *,
                local: LocalTable | None = None, prefetch: bool | None = None, stale_ttl: int | None = None,
                records: LocalRecords | None = None) -> None:
        """Swap in reloaded rules, all in one step on the event loop (no query sees half of them),
        and empty the cache with them: its entries are gated on the old catalog's rules. A reload's
        live settings (`local` names, `prefetch`, `stale_ttl`) come with them; None keeps one. The
        operator's `records` are part of the rules: None means there are none."""
        self.catalog = catalog
        self.records = records
        self.sinkhole = sinkhole
        self.plain_ttl = plain_ttl
        self.gated_ttl = gated_ttl
        if local is not None:
            self.local = local
        if prefetch is not None:
            self.prefetch = prefetch
        if stale_ttl is not None:
            self.stale_ttl = stale_ttl
        self.cache.clear()
        self.gated.clear()
        self.sunk = 0

    def stale(self, fwd: Forward) -> bytes | None:
        """RFC 8767: every upstream failed; the expired answer, if one is within the stale window,
        with TTL `stale_ttl` and (with EDNS) an Extended DNS Error 3 "Stale Answer". Gated as ever."""
        q = fwd.query
        now = self.mono()
        entry = self.cache.get_stale(q.key, now)
        if entry is None:
            return None
        elapsed = now - fwd.started
        self.durations.observe(elapsed)
        edns = -1 if q.edns is None else int(q.edns.do)
        rule = entry.rule
        if rule is not None and (cause := self.consent.blocked(fwd.client, rule.vendor, self.wall())):
            self._gated(SINKHOLED, now, fwd.client, q.question, q.qtype, fwd.tcp, -1, rule, elapsed)
            return self._limit(q, self.sinkhole.reply(q.id, q.flags, q.question, q.qtype, rule, edns, cause),
                               fwd.tcp)
        if rule is not None:
            self._gated(STALE, now, fwd.client, q.question, q.qtype, fwd.tcp, entry.flags & 0xF, rule, elapsed)
        else:
            self._plain(STALE, now, fwd.client, q, fwd.tcp, entry.flags & 0xF, elapsed)
        flags = QR | RA | (q.flags & (RD | CD)) | self._entry_flags(entry, q.flags, edns)
        body = entry.stale_body(self.stale_ttl)
        if edns < 0:
            reply = ID_FLAGS.pack(q.id, flags) + entry.head + q.question + body
        else:
            reply = ID_FLAGS.pack(q.id, flags) + entry.head_edns + q.question + body + self.stale_tail[edns]
        if len(reply) > self._reply_limit(q, fwd.tcp):
            return self._truncated(q.id, flags, q.question, edns)
        return reply

    def servfail(self, fwd: Forward, options: bytes = b"") -> bytes:
        """SERVFAIL for a forward nothing could answer; `options` (an EDE saying why) go in its OPT."""
        q = fwd.query
        now = self.mono()
        elapsed = now - fwd.started
        self.durations.observe(elapsed)
        if fwd.rule is not None:  # nothing was resolved, but the attempt is evidence too
            self._gated(SERVFAIL, now, fwd.client, q.question, q.qtype, fwd.tcp, SERVFAIL_RCODE, fwd.rule, elapsed)
        else:
            self._plain(SERVFAIL, now, fwd.client, q, fwd.tcp, SERVFAIL_RCODE, elapsed)
        return error_reply(q, SERVFAIL_RCODE, self.udp_max, options)

    # ----------------------------------------------------------------------------------------
    # Counting and logging off the fast path

    def _gated(self, outcome: int, now: float, client: str, question: bytes, qtype: int, tcp: int, rcode: int,
               rule: DomainRule, elapsed: float) -> None:
        """Count and record a query for a gated name; an allowed one records the grant that allowed it."""
        self.counters.counts[slot(outcome, type_slot(qtype)) + tcp] += 1
        if self.log_gated is not None:
            allowed = outcome in (CACHED, FORWARDED, STALE, LOCAL)
            grant = self.consent.grant_for(client, rule.vendor, self.wall()) if allowed else None
            self.log_gated((now, client, question, tcp, outcome, rcode, rule.vendor.logged, grant, elapsed))

    def _plain(self, outcome: int, now: float, client: str, q: Query, tcp: int, rcode: int, elapsed: float) -> None:
        self.counters.counts[slot(outcome, type_slot(q.qtype)) + tcp] += 1
        if self.log_all is not None:
            self.log_all((now, client, q.question, tcp, outcome, rcode, None, None, elapsed))

    def _rejected(self, r: Rejection, data: bytes, client: str, tcp: int) -> None:
        outcome = DROPPED if r.rcode is None else NOTIMP if r.rcode == NOTIMP_RCODE else FORMERR
        self.counters.counts[slot(outcome, NONE) + tcp] += 1
        if self.log_all is not None and r.rcode is not None:
            self.log_all((self.mono(), client, None, tcp, outcome, r.rcode, None, None, 0.0))

    # ----------------------------------------------------------------------------------------
    def _render(self, entry: Entry, qid: int, qflags: int, question: bytes, edns: int, now: float,
                limit: int) -> bytes:
        flags = QR | RA | (qflags & (RD | CD)) | entry.flags
        if flags & AD and not (qflags & AD or edns == 1):
            flags &= ~AD  # AD only to clients that said they understand it (RFC 6840 §5.8)
        if edns < 0:
            reply = ID_FLAGS.pack(qid, flags) + entry.head + question + entry.body_now(now)
        else:
            reply = ID_FLAGS.pack(qid, flags) + entry.head_edns + question + entry.body_now(now) + self.opt_tail[edns]
        if len(reply) > limit:
            return self._truncated(qid, flags, question, edns)
        return reply

    def _truncated(self, qid: int, flags: int, question: bytes, edns: int) -> bytes:
        self.counters.truncated += 1
        if edns < 0:
            return HEADER.pack(qid, flags | 0x0200, 1, 0, 0, 0) + question
        return HEADER.pack(qid, flags | 0x0200, 1, 0, 0, 1) + question + self.opt_tail[edns]

    @staticmethod
    def _entry_flags(entry: Entry, qflags: int, edns: int) -> int:
        return entry.flags if qflags & AD or edns == 1 else entry.flags & 0xF

    def _reply_limit(self, q: Query, tcp: int) -> int:
        return TCP_LIMIT if tcp else min(q.udp_limit, self.udp_max) if q.edns else MIN_UDP

    def _limit(self, q: Query, reply: bytes, tcp: int) -> bytes:
        if len(reply) > self._reply_limit(q, tcp):
            edns = -1 if q.edns is None else int(q.edns.do)
            return self._truncated(q.id, struct.unpack_from(">H", reply, 2)[0], q.question, edns)
        return reply


def _query_from_key(key: bytes) -> Query:
    """The upstream query a cache key stands for (name, type, class and the DO/CD bits)."""
    end = scan_name(key, 0) + 5
    question = key[:end]
    bits = key[end] if len(key) > end else 0
    qtype, qclass = struct.unpack_from(">HH", question, end - 4)
    return Query(id=0, flags=RD | (CD if bits & 1 else 0), question=question, name=question[:-4], qtype=qtype,
                 qclass=qclass, edns=Edns(MIN_UDP, 0, True) if bits & 2 else None, key=key)


def _udp_limit(data: bytes, edns: int, udp_max: int) -> int:
    """The UDP size a query with an empty OPT record at its end accepts, capped at ours."""
    if edns < 0:
        return MIN_UDP
    return max(MIN_UDP, min((data[-8] << 8) | data[-7], udp_max))

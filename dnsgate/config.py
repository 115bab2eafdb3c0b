"""Configuration: frozen dataclasses, their embedded defaults, and parsing with errors that name the key.

Everything dnsgate can be told lives here. `config/dnsgate.toml` documents every key and parses to
exactly `Config()` (a test checks it). This module is pure: it reads no files and no environment
except through the explicit inputs of `load_config`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal

from dnsgate.addresses import is_ip
from dnsgate.wire import name_to_wire

DEFAULT_DNS_PORT: Final = 5353
PROFILE_NAMES: Final = ("opt-in", "opt-out", "kiosk", "deny", "allow")
DEFAULT_API_PORT: Final = 8053
MAX_TTL: Final = 2**31 - 1  # RFC 2181 §8
MAX_WORKERS: Final = 64
# Who may ask by default (dns.allow_clients): loopback, RFC 1918, CGNAT (RFC 6598), IPv4 and IPv6
# link-local, IPv6 ULA; and who is never rate limited (dns.rate_limit_exempt): loopback.
DEFAULT_ALLOWED: Final = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                          "100.64.0.0/10", "169.254.0.0/16", "fc00::/7", "fe80::/10")
DEFAULT_EXEMPT: Final = ("127.0.0.0/8", "::1/128")


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the key path."""

    # Found in the file as written, even where a variable or flag overrides that key (so the file,
    # not the variable, is named for it).
    in_file = False

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        """Each error on its own: this one (ConfigErrors holds several)."""
        return (self,)


class ConfigErrors(ConfigError):
    """The independent errors one reading found, in the order found, so that an operator editing a
    file sees them all in one run; the message is theirs, joined (one line, as a log wants it)."""

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self._errors = tuple(e for error in errors for e in error.errors)
        super().__init__("; ".join(str(e) for e in self._errors))

    def __reduce__(self) -> tuple[Any, ...]:
        return ConfigErrors, (self._errors,)

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return self._errors


class _Found:
    """The errors of one reading: a check that fails is kept and the checks after it still run."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def check(self, ok: bool, message: str) -> bool:
        if not ok:
            self.errors.append(ConfigError(message))
        return ok

    def add(self, message: str) -> None:
        self.errors.append(ConfigError(message))

    @contextmanager
    def each(self) -> Iterator[None]:
        """A block that stops at its first error (what follows in it would be meaningless), kept."""
        try:
            yield
        except ConfigError as exc:
            self.errors.extend(exc.errors)

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]  # one error alone reads exactly as it always has
        if self.errors:
            raise ConfigErrors(self.errors)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_api_listen(text: str, key: str = "api.listen") -> HostPort:
    """Where the API listens: `HOST:PORT` (`[V6]:PORT`), which may also be written as a URL,
    `http://HOST:PORT/`: DNSGATE_API and --api take one form everywhere, the server's and the
    commands' that call it."""
    rest = text.strip()
    if rest.lower().startswith("https://"):
        raise ConfigError(f"{key}: the API is served over plain HTTP (put a TLS proxy in front of it), "
                          f"got {text!r}")
    if rest.lower().startswith("http://"):
        rest = rest[len("http://"):].removesuffix("/")
        if "/" in rest:
            raise ConfigError(f"{key}: a listen address has no path, got {text!r}")
    return parse_host_port(rest, key=key, listen=True)


@dataclass(frozen=True, slots=True)
class UpstreamAddress:
    """One upstream resolver at one IP address: plain DNS over UDP (TCP when a reply is truncated),
    TCP only, DNS over TLS, or DNS over HTTPS (`path` on the server, HTTP/2); the certificate of the
    last two must carry `tls_name` (or, if empty, the IP address)."""

    host: str
    port: int
    transport: Literal["udp", "tcp", "tls", "https"] = "udp"
    tls_name: str = ""
    path: str = ""  # DNS over HTTPS: the URI's path, e.g. /dns-query

    def __str__(self) -> str:
        address = str(HostPort(self.host, self.port))
        if self.transport == "udp":
            return address
        return f"{self.transport}://{address}{self.path}" + (f"#{self.tls_name}" if self.tls_name else "")


UPSTREAM_SCHEMES: Final = {"udp://": ("udp", 53), "tcp://": ("tcp", 53), "tls://": ("tls", 853),
                           "https://": ("https", 443)}
UPSTREAM_FORMS: Final = ("HOST[:PORT], tcp://HOST[:PORT], tls://HOST[:PORT][#NAME], tls://NAME[:PORT] or "
                         "https://HOST-or-NAME[:PORT]/PATH")


def parse_upstream(text: str, key: str = "upstream.servers") -> UpstreamAddress:
    """One upstream at an IP address: `HOST[:PORT]`, `tcp://HOST[:PORT]`, `tls://HOST[:PORT][#NAME]`
    or `https://HOST[:PORT]/PATH[#NAME]` (IPv6 as `[V6]:PORT`). A server given by name is
    `parse_upstreams`' (it needs upstream.bootstrap)."""
    found = parse_upstreams(text, key, {})
    return found[0]


def parse_upstreams(text: str, key: str = "upstream.servers",
                    bootstrap: Mapping[str, tuple[str, ...]] | None = None) -> tuple[UpstreamAddress, ...]:
    """The servers `text` names: one, or for `tls://NAME` and `https://NAME/PATH` one per address
    `bootstrap` gives NAME (dnsgate never looks an upstream's name up in plain DNS: that query
    would say, in clear, where the encrypted ones go). `bootstrap` None: the syntax only (no address)."""
    rest = text.strip()
    transport, port = "udp", 53
    for scheme, (name, default) in UPSTREAM_SCHEMES.items():
        if rest.lower().startswith(scheme):
            transport, port, rest = name, default, rest[len(scheme):]
            break
    else:
        if "://" in rest:
            raise ConfigError(f"{key}: unknown scheme in {text!r} (use udp://, tcp://, tls:// or https://)")
    rest, _, tls_name = rest.partition("#")
    path = ""
    if transport == "https":
        rest, slash, path = rest.partition("/")
        path = slash + path
        if not path or path == "/" or any(c in path for c in " ?{}") or not path.isprintable():
            raise ConfigError(f"{key}: a DNS-over-HTTPS upstream needs its path, as in "
                              f"https://dns.example/dns-query, got {text!r}")
    if tls_name and transport not in ("tls", "https"):
        raise ConfigError(f"{key}: '#NAME' (the certificate name) is only for tls:// and https:// upstreams, "
                          f"in {text!r}")
    if tls_name:
        try:
            name_to_wire(tls_name)
        except ValueError as exc:
            raise ConfigError(f"{key}: bad certificate name in {text!r}: {exc}") from None
    tls_name = tls_name.lower().rstrip(".")
    named = _upstream_name(rest) if transport in ("tls", "https") else None
    if named is None:
        hp = parse_host_port(rest, default_port=port, key=key)
        host = str(ipaddress.ip_address(hp.host))  # canonical text: replies are matched on it
        return (UpstreamAddress(host, hp.port, transport, tls_name, path),)  # type: ignore[arg-type]
    name, port = named[0], named[1] if named[1] is not None else port
    if tls_name and tls_name != name:
        raise ConfigError(f"{key}: {text!r} names the server twice; the certificate name is the host's")
    if bootstrap is None:
        return ()
    addresses = bootstrap.get(name, ())
    if not addresses:
        raise ConfigError(f"{key}: {name} has no address in upstream.bootstrap (e.g. bootstrap = "
                          f"{{\"{name}\" = [\"192.0.2.53\"]}}): dnsgate never looks an upstream's name up in "
                          "plain DNS, which would tell the network where the encrypted queries go")
    return tuple(UpstreamAddress(str(ipaddress.ip_address(a)), port, transport, name, path)  # type: ignore[arg-type]
                 for a in addresses)


def _upstream_name(text: str) -> tuple[str, int | None] | None:
    """(name, port) for `NAME[:PORT]` with a host name; None for an address."""
    host, _, port_text = text.partition(":") if text.count(":") == 1 else (text, "", "")
    if not HOST_NAME.fullmatch(host.rstrip(".")):
        return None
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) <= 65535):
        raise ConfigError(f"upstream: bad port {port_text!r} in {text!r}")
    return host.rstrip(".").lower(), int(port_text) if port_text else None


def parse_host_port(text: str, *, default_port: int | None = None, key: str = "address",
                    listen: bool = False) -> HostPort:
    """Parse `HOST:PORT`, `[V6]:PORT`, or (with a default port) `HOST`, `V6`, `[V6]`. HOST is an IP
    address; a `listen` address says so in terms of binding when given a name."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"{key}: missing ']' in {text!r}")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ConfigError(f"{key}: expected ':PORT' after ']' in {text!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1 and default_port is None:
        raise ConfigError(f"{key}: write IPv6 addresses as [ADDR]:PORT, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if listen:
            raise ConfigError(f"{key}: dnsgate listens on an IP address, not a host name: {host!r} (in {text!r}; "
                              "e.g. 127.0.0.1, [::1], or 0.0.0.0 / [::] for every address)") from None
        raise ConfigError(f"{key}: not an IP address: {host!r} (in {text!r})") from None
    if not port_text:
        if default_port is None:
            raise ConfigError(f"{key}: missing port in {text!r} (HOST:PORT)")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: bad port {port_text!r} in {text!r}")
    return HostPort(host, int(port_text))


@dataclass(frozen=True, slots=True)
class DnsConfig:
    # Each address serves UDP and TCP.
    listen: tuple[str, ...] = (f"127.0.0.1:{DEFAULT_DNS_PORT}",)
    # Largest UDP reply we send to an EDNS client (RFC 9715 / DNS flag day 2020 value).
    udp_max_size: int = 1232
    # A TCP connection with no complete query for this long is closed (RFC 7766 §6.2.3).
    tcp_idle_timeout: float = 10.0
    # Queries of type ANY: "hinfo" answers the minimal HINFO "RFC8482" (RFC 8482 §4.2), "refused" REFUSED.
    any_query: Literal["hinfo", "refused"] = "hinfo"
    # Networks whose clients are answered (UDP and TCP); everyone else gets REFUSED. Default: loopback,
    # RFC 1918, CGNAT, IPv4/IPv6 link-local, IPv6 ULA. ["0.0.0.0/0", "::/0"] would be an open resolver.
    allow_clients: tuple[str, ...] = DEFAULT_ALLOWED
    # Response rate limiting: UDP replies per second per client prefix (0: off). Beyond it replies are
    # dropped, except every `rate_limit_slip`-th, sent truncated (TC=1) so real clients retry over TCP.
    rate_limit: int = 1000
    rate_limit_slip: int = 2
    rate_limit_ipv4_prefix: int = 24
    rate_limit_ipv6_prefix: int = 56
    # Networks never rate limited (they cannot be spoofed from outside).
    rate_limit_exempt: tuple[str, ...] = DEFAULT_EXEMPT
    # TCP: open connections in total and per client address; beyond the total, the connection idle
    # longest is closed to make room (so idle or slow clients cannot lock others out).
    tcp_max_connections: int = 512
    tcp_max_connections_per_client: int = 32
    # Seconds a client may take to send one query once it has started (slow-loris), and to read replies.
    tcp_query_timeout: float = 5.0
    # Queries read on one connection; then no more are read, and once every query read is answered
    # the connection is half-closed (the client sends the rest on a new one). Unbound and dnsdist have
    # no such cap; it only makes a busy client reconnect now and then (so SO_REUSEPORT workers share it).
    tcp_max_queries_per_connection: int = 100_000
    # Queries one connection may have outstanding upstream; beyond, reading pauses until replies go out.
    tcp_max_pipelined: int = 100
    # Processes answering DNS on the same addresses (SO_REUSEPORT), for machines with cores to spare:
    # this one (API, consent store, query log) and workers - 1 more, each with its own cache and a
    # copy of the consent table that every change reaches before the API answers.
    workers: int = 1
    # How UDP is read and written: "batched" takes the datagrams waiting in a socket with one system
    # call and sends their replies with one more (recvmmsg/sendmmsg, Linux; elsewhere it falls back);
    # "asyncio" makes both calls per datagram (the event loop's datagram endpoint).
    udp_io: Literal["batched", "asyncio"] = "batched"
    # DNS over TLS (RFC 7858) on these addresses (port 853 unless given), e.g. "0.0.0.0:853"; empty: off.
    # Its connections are TCP connections held to the tcp_* limits above, counted with them.
    tls_listen: tuple[str, ...] = ()
    # DNS over HTTPS (RFC 8484, /dns-query, HTTP/2 and HTTP/1.1) on these addresses (port 443 unless
    # given), e.g. "0.0.0.0:443"; empty: off.
    https_listen: tuple[str, ...] = ()
    # The server certificate (PEM, the chain after it) and its private key for both; re-read on SIGHUP
    # and when either file changes (`dnsgate cert init` makes a private CA and a certificate).
    tls_cert: str = ""
    tls_key: str = ""
    # Reverse proxies (IP addresses or networks) in front of DNS over HTTPS whose X-Forwarded-For
    # names the client; from anyone else the header is ignored.
    trusted_proxies: tuple[str, ...] = ()
    # The name clients reach encrypted DNS by, as the certificate has it (e.g. dns.home.arpa): DDR's
    # answers name it, and `_dns.<name>` is answered as `_dns.resolver.arpa` is. Empty: the first
    # DNS name in the certificate.
    resolver_name: str = ""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: str = f"127.0.0.1:{DEFAULT_API_PORT}"
    # Bearer token for the admin endpoints. Empty: DNSGATE_ADMIN_TOKEN, else a token generated
    # into <data_dir>/admin-token (mode 0600).
    admin_token: str = ""
    # Origins (scheme://host[:port]) besides dnsgate's own that may change consent from a browser.
    allowed_origins: tuple[str, ...] = ()
    # Names and addresses dnsgate is also reached by, besides the portal host, localhost and the
    # address a request arrives on (a proxy's name, the host's address behind a port mapping).
    # A request naming any other Host gets 421, so a DNS-rebound page reads nothing.
    hosts: tuple[str, ...] = ()
    # A separate listener for the admin endpoints (e.g. "127.0.0.1:8054"); they then answer only there.
    # Empty: on `listen`, behind the token.
    admin_listen: str = ""
    # Largest request body accepted (bytes); larger ones get 413.
    max_body_bytes: int = 16 * 1024
    # Consent changes one client address may make per minute (a burst of as many); 0: no limit.
    consent_changes_per_minute: int = 30
    # Open connections (both listeners together), in total and per client address; beyond the total,
    # the connection idle longest is closed to make room. With dns.tcp_max_connections they keep the
    # process well inside a 1 024-descriptor limit.
    max_connections: int = 128
    max_connections_per_client: int = 16
    # Seconds a connection may stay open without a request: before the first, and between requests.
    idle_timeout: float = 30.0
    # Seconds to send the request line and headers once begun (slow-loris), and then the body.
    header_timeout: float = 10.0
    body_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    # HOST[:PORT], tcp://HOST[:PORT], tls://HOST[:PORT][#NAME] or tls://NAME[:PORT], and DNS over HTTPS
    # https://NAME[:PORT]/PATH (or an address instead of NAME). Empty: the nameservers of /etc/resolv.conf.
    servers: tuple[str, ...] = ()
    # "failover": in the order given; "fastest": lowest measured round-trip time, others probed now and then.
    strategy: Literal["failover", "fastest"] = "failover"
    # Conditional forwarding: domain -> its own upstreams, e.g. {"corp.example" = ["10.0.0.53"]}.
    domains: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Overall deadline for one client query, every retry and fail-over included (seconds).
    timeout: float = 3.0
    # How long one attempt at one upstream may take before the next is tried (seconds).
    attempt_timeout: float = 1.0
    # Relay the upstream's AD bit (DNSSEC-validated) to clients that ask (DO or AD set). Off: AD is
    # always clear, because dnsgate validates nothing and a plain-DNS path can forge the bit.
    trust_ad: bool = False
    # CA certificates (PEM) for tls:// and https:// upstreams. Empty: the system's trust store.
    tls_ca_file: str = ""
    # The addresses of upstreams given by name (tls://NAME, https://NAME/PATH), e.g.
    # {"dns.quad9.net" = ["9.9.9.9", "149.112.112.112"]}: each is asked as a server of its own, and
    # the name is never looked up in plain DNS.
    bootstrap: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    # Clamp the TTLs of cached answers (seconds).
    min_ttl: int = 0
    max_ttl: int = 86_400
    # RFC 8767: when every upstream fails, answer from expired entries (TTL `stale_ttl`) up to
    # `stale_max_age` seconds past their expiry.
    serve_stale: bool = False
    stale_ttl: int = 30
    stale_max_age: int = 86_400
    # Refresh an entry that is asked for in the last tenth of its lifetime, before it expires.
    prefetch: bool = False


@dataclass(frozen=True, slots=True)
class GateConfig:
    # "nxdomain": NXDOMAIN + SOA (browsers do not cache it, so a grant applies at once);
    # "null": A 0.0.0.0 / AAAA ::, other types NODATA + SOA.
    mode: Literal["nxdomain", "null"] = "nxdomain"
    # TTL and SOA MINIMUM of sinkhole answers (seconds).
    sinkhole_ttl: int = 5
    # Cap on the TTL of real answers for gated names, so a withdrawal reaches client caches fast.
    allowed_ttl_cap: int = 10
    # Vendor catalog file. Empty: the built-in catalog (config/vendors.toml).
    catalog: str = ""
    # Catalog domain patterns this deployment does not gate, e.g. ["*.api-us1.com"].
    disabled_domains: tuple[str, ...] = ()
    # Directory of catalog drop-ins (*.toml, read in name order after the catalog). Empty: none.
    vendors_dir: str = ""
    # Catalog vendors this deployment does not gate at all, e.g. ["activecampaign"].
    disabled_vendors: tuple[str, ...] = ()


LIST_ID: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True, slots=True)
class ListSource:
    """One imported list ([[lists.sources]] in the file)."""

    # Short id ([a-z0-9_-]): named in the EDE text of blocked answers and in <data_dir>/lists.
    id: str = ""
    # Shown to people (EDE text, /v1/vendors). Empty: the id.
    name: str = ""
    # What the list blocks and why, shown on the consent portal; part of the notice (its entries are not).
    description: str = ""
    # "block": the list's names are gated on `category`; "allow": its names are never list-gated.
    kind: Literal["block", "allow"] = "block"
    # Consent category that opens the list's names (block lists only; defined in the catalog).
    category: str = ""
    # Where the list comes from: one of an http(s) URL (refreshed, kept on disk) or a local file.
    url: str = ""
    file: str = ""
    # Hosts-file and plain entries cover their subdomains too (AdBlock ||name^ always does).
    subdomains: bool = False


@dataclass(frozen=True, slots=True)
class ListsConfig:
    sources: tuple[ListSource, ...] = ()
    # Names no list gates, e.g. ["cdn.example.com"] (and its subdomains), ["*.example.org"].
    allow: tuple[str, ...] = ()
    # Seconds between conditional re-downloads of URL lists; 0: only at start and on reload.
    refresh_interval: float = 86400.0
    # Seconds one download may take.
    fetch_timeout: float = 30.0
    # A download larger than this is refused (bytes).
    max_download_bytes: int = 128 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ConsentConfig:
    # How long a choice lasts on opt-in networks unless the request asks for less (days): 6 months.
    default_days: int = 180
    # Hard maximum for any choice (days): 13 months.
    max_days: int = 395
    # Lifetime of a choice on opt-out networks (an opt-out is not re-asked for 12 months).
    opt_out_days: int = 395
    # Lifetime of a choice on kiosk networks (it also ends with the session).
    kiosk_days: int = 1
    # A kiosk client's choice resets after this many minutes without DNS queries from it.
    kiosk_idle_minutes: float = 15.0
    # Consent notice file (TOML: version, default_language, [text]). Empty: the built-in notice.
    notice: str = ""
    # Days to keep consent-log events no choice in force rests on. 0: keep them forever.
    retention_days: int = 0
    # Seconds between sweeps that record expiries and idle kiosk resets.
    sweep_interval: float = 30.0


@dataclass(frozen=True, slots=True)
class ProfilesConfig:
    # Profile of addresses in no listed network: opt-in, opt-out, kiosk, deny or allow.
    default: Literal["opt-in", "opt-out", "kiosk", "deny", "allow"] = "opt-in"
    # CIDR -> profile; the most specific network wins.
    networks: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    # Read the kernel's neighbour tables for the MAC address of on-link clients.
    neighbours: bool = True
    # Seconds between reads of the neighbour tables.
    neighbour_refresh: float = 30.0
    # Forwarders (IP addresses) whose EDNS MAC and Client Subnet options are believed.
    trusted_forwarders: tuple[str, ...] = ()
    # Seconds a pairing token stays valid.
    pairing_ttl: float = 300.0


@dataclass(frozen=True, slots=True)
class LocalConfig:
    # Names answered by dnsgate itself, never sent upstream; each can be switched off.
    # use-application-dns.net -> NXDOMAIN: Firefox keeps its automatic DNS-over-HTTPS off.
    firefox_canary: bool = True
    # mask.icloud.com, mask-h2.icloud.com -> NXDOMAIN: Apple's signal that this network filters.
    icloud_private_relay: bool = True
    # _dns.resolver.arpa (RFC 9462): SVCB records naming dnsgate's encrypted listeners when any is on,
    # else NODATA (clients find no encrypted resolver to switch to).
    ddr: bool = True
    # localhost -> 127.0.0.1 / ::1 (RFC 6761); invalid and onion -> NXDOMAIN (RFC 6761, RFC 7686).
    special_use: bool = True
    # Reverse zones of private and special ranges (10.in-addr.arpa, d.f.ip6.arpa, ...) answered
    # as empty zones (RFC 6303) unless upstream.domains forwards them.
    private_reverse: bool = True
    # A name answered without touching the upstreams, for health probes; empty: none.
    healthcheck: str = "healthcheck.dnsgate.internal"
    # The network's own names, answered authoritatively (AA) and never sent upstream: one record per
    # string, "NAME [TTL] TYPE DATA" as in a zone file, of type A, AAAA, CNAME, PTR, TXT, MX or SRV:
    # "nas.home A 192.168.1.10", "www.home CNAME nas.home", "home MX 10 mail.home",
    # "_ipp._tcp.home SRV 0 0 631 printer.home", "home TXT \"v=spf1 -all\"". Names below a
    # configured name that hold nothing are NXDOMAIN; a configured name asked for another type,
    # NODATA. A CNAME into a gated vendor's name is gated like that name.
    records: tuple[str, ...] = ()
    # A hosts-format file ("192.168.1.10 nas.home nas"): an A or AAAA record for each name, read
    # at start and at every reload. Empty: none.
    hosts_file: str = ""
    # PTR records for every A and AAAA above (the first name given for an address), unless a PTR for
    # that address is given.
    generate_ptr: bool = True
    # TTL of the records above that give none, and of their negative answers.
    ttl: int = 300


@dataclass(frozen=True, slots=True)
class PortalConfig:
    # The consent portal's host name. dnsgate's DNS answers it (A/AAAA) with the API's address, so
    # every client of the network can open http://<host>/; pairing names live under it too.
    host: str = "consent.dnsgate.internal"
    # Addresses the portal host resolves to. Empty: the API's address, or, for an API listening on a
    # wildcard (0.0.0.0, ::), the address of this host that faces the asking client.
    addresses: tuple[str, ...] = ()
    # The portal's URL as shown and handed to captive-portal clients (e.g. behind a TLS proxy).
    # Empty: http://<host>/, with the API's port unless it is 80.
    url: str = ""
    # Guest Wi-Fi: answer the RFC 8908 captive-portal API at /captive-portal/api, "captive" for a
    # device until its first choice (a refusal releases it exactly as a grant does).
    captive: bool = False
    # Web origins (scheme://host[:port], exact) whose pages may read GET /v1/consent/status
    # cross-origin (CORS, no credentials; Chrome asks the visitor for local-network permission).
    cors_origins: tuple[str, ...] = ()
    # Who runs this network and answers for the consent recorded here (GDPR Art. 13(1)(a)): shown at
    # the top of the portal, in GET /v1/notice and in every consent record. Empty: the portal says the
    # operator has not given its name (and dnsgate warns at start).
    operator: str = ""
    # How to reach the operator: an e-mail address or a URL.
    contact: str = ""
    # The operator's privacy notice (http:// or https:// URL).
    privacy_url: str = ""


@dataclass(frozen=True, slots=True)
class StorageConfig:
    # Directory for the SQLite store and the generated admin token (relative to the working dir).
    # It and its databases are private to dnsgate's user (0700/0600) ...
    data_dir: str = "data"
    # ... or readable by this group too (0750/0640; a name or a number), e.g. for a backup job.
    group: str = ""
    # SQLite's synchronous mode for consent: "full" syncs every change to disk before it is
    # acknowledged (survives power loss); "normal" survives kill -9 but may lose the last changes
    # in a power cut, and costs about half the CPU per consent change.
    synchronous: Literal["full", "normal"] = "full"
    # Where consent is kept: "sqlite" (<data_dir>/consent.sqlite3), or a Redis URL
    # (redis://[:password@]host:6379/0, rediss:// for TLS, unix:///path.sock) shared by several instances.
    store: str = "sqlite"
    # Prefix of every Redis key, so several dnsgate deployments can share one Redis.
    redis_prefix: str = "dnsgate:"
    # Seconds to wait for Redis before a change fails (503) or the connection counts as lost.
    redis_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    # debug, info, warning or error. Never one line per query at info.
    level: Literal["debug", "info", "warning", "error"] = "info"
    # "text": one key=value line per event; "json": one JSON object per line.
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True, slots=True)
class QueryLogConfig:
    # "full": every query; "anonymous": every query, client as a keyed hash; "gated-only": only
    # queries for gated names (the evidence for /v1/report); "off": nothing.
    mode: Literal["full", "anonymous", "gated-only", "off"] = "gated-only"
    # Entries waiting for the writer; beyond this they are dropped and counted.
    queue_size: int = 10_000
    # Seconds between batched writes.
    flush_interval: float = 1.0
    # Retention: entries older than this many days, and the oldest beyond max_rows, are deleted.
    max_age_days: int = 30
    max_rows: int = 1_000_000


@dataclass(frozen=True, slots=True)
class EventsConfig:
    # POST each batch of events (gated decisions, consent changes) as JSON to this URL. Empty: off.
    webhook_url: str = ""
    # Seconds one webhook POST may take.
    webhook_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Config:
    dns: DnsConfig = field(default_factory=DnsConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    consent: ConsentConfig = field(default_factory=ConsentConfig)
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    portal: PortalConfig = field(default_factory=PortalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    lists: ListsConfig = field(default_factory=ListsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    querylog: QueryLogConfig = field(default_factory=QueryLogConfig)
    events: EventsConfig = field(default_factory=EventsConfig)

    @property
    def dns_listen(self) -> tuple[HostPort, ...]:
        return tuple(parse_host_port(a, key="dns.listen", listen=True) for a in self.dns.listen)

    @property
    def tls_listen(self) -> tuple[HostPort, ...]:
        return tuple(parse_host_port(a, default_port=853, key="dns.tls_listen", listen=True)
                     for a in self.dns.tls_listen)

    @property
    def https_listen(self) -> tuple[HostPort, ...]:
        return tuple(parse_host_port(a, default_port=443, key="dns.https_listen", listen=True)
                     for a in self.dns.https_listen)

    @property
    def api_listen(self) -> HostPort:
        return parse_api_listen(self.api.listen, key="api.listen")

    @property
    def admin_listen(self) -> HostPort | None:
        return parse_api_listen(self.api.admin_listen, key="api.admin_listen") if self.api.admin_listen else None

    @property
    def upstream_bootstrap(self) -> dict[str, tuple[str, ...]]:
        return {name.lower().rstrip("."): addresses for name, addresses in self.upstream.bootstrap}

    @property
    def upstream_servers(self) -> tuple[UpstreamAddress, ...]:
        bootstrap = self.upstream_bootstrap
        return tuple(a for s in self.upstream.servers for a in parse_upstreams(s, "upstream.servers", bootstrap))

    @property
    def upstream_domains(self) -> tuple[tuple[str, tuple[UpstreamAddress, ...]], ...]:
        bootstrap = self.upstream_bootstrap
        return tuple((domain, tuple(a for s in servers
                                    for a in parse_upstreams(s, f"upstream.domains.{domain}", bootstrap)))
                     for domain, servers in self.upstream.domains)


# --------------------------------------------------------------------------------------------
# Parsing


def _convert(value: Any, annotation: str, key: str) -> Any:
    """Check one TOML value against a field's annotation (given as a string: `from __future__`)."""
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # TOML has inf and nan; no setting means either
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation == "str" or annotation.startswith("Literal["):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if annotation.startswith("Literal["):
            allowed = [a.strip().strip("\"'") for a in annotation[8:-1].split(",")]
            if value not in allowed:
                raise ConfigError(f"{key}: must be one of {', '.join(allowed)}; got {value!r}")
        return value
    if annotation == "tuple[tuple[str, tuple[str, ...]], ...]":
        # a TOML table {name = ["a", "b"]} (or name = "a"), kept as sorted pairs
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table like {{\"corp.example\" = [\"10.0.0.53\"]}}, got {value!r}")
        return tuple(sorted((str(name), _convert(v, "tuple[str, ...]", f"{key}.{name}")) for name, v in value.items()))
    if annotation == "tuple[str, ...]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(value)
    if annotation == "tuple[ListSource, ...]":
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected [[{key}]] tables, got {value!r}")
        found = _Found()
        sources = tuple(_table(ListSource, item, f"{key}[{i}]", found, set()) for i, item in enumerate(value))
        found.raise_any()  # every source's errors; a list with any is refused whole
        return sources
    if annotation == "tuple[tuple[str, str], ...]":
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{key}: expected a table of \"key\" = \"value\" strings, got {value!r}")
        return tuple((str(k), v) for k, v in value.items())
    raise AssertionError(f"unhandled annotation {annotation} for {key}")  # pragma: no cover


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """"did you mean 'x'? " for a misspelt key, or nothing when no known one is close."""
    import difflib  # only a configuration error needs it: not loaded in a server that starts

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def _checked(cls: type[Any], name: str, value: Any, key: str) -> Any:
    """One value checked against the annotation of field `name` of a config section."""
    return _convert(value, str(next(f.type for f in fields(cls) if f.name == name)), key)


def _table(cls: type[Any], data: Any, key: str, found: _Found, refused: set[str]) -> Any:
    """A section (or one [[lists.sources]] table) from its TOML table, every unknown key and bad value
    in `found`; a refused value's key (in `refused`) keeps its default, so the other tables can
    still be checked."""
    if not isinstance(data, Mapping):
        found.add(f"{key}: expected a table, got {data!r}")
        refused.add(key)
        return cls()
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for name in data:
        if name not in known:
            found.add(f"{key}.{name}: unknown key ({did_you_mean(name, known)}known: {', '.join(known)})")
            continue
        try:
            values[name] = _convert(data[name], str(known[name].type), f"{key}.{name}")
        except ConfigError as exc:
            found.errors.extend(exc.errors)
            refused.add(f"{key}.{name}")
    return cls(**values)


_SECTIONS: Final[dict[str, type[Any]]] = {
    "dns": DnsConfig,
    "api": ApiConfig,
    "upstream": UpstreamConfig,
    "cache": CacheConfig,
    "gate": GateConfig,
    "consent": ConsentConfig,
    "profiles": ProfilesConfig,
    "identity": IdentityConfig,
    "local": LocalConfig,
    "portal": PortalConfig,
    "storage": StorageConfig,
    "lists": ListsConfig,
    "log": LogConfig,
    "querylog": QueryLogConfig,
    "events": EventsConfig,
}


def _parsed(data: Mapping[str, Any], found: _Found, refused: set[str]) -> Config:
    """The types of parsed TOML checked, every table's errors in `found` (see `_table`)."""
    sections: dict[str, Any] = {}
    first = len(found.errors)
    for name, value in data.items():
        if name not in _SECTIONS:
            found.add(f"{name}: unknown section ({did_you_mean(name, _SECTIONS)}known: {', '.join(_SECTIONS)})")
            continue
        sections[name] = _table(_SECTIONS[name], value, name, found, refused)
    for error in found.errors[first:]:
        error.in_file = True
    return Config(**sections)


def parse_config(data: Mapping[str, Any], *, validated: bool = True) -> Config:
    """Build a validated Config from parsed TOML; raise ConfigError naming the bad key (ConfigErrors
    naming each, for several). Unvalidated, only the types are checked: for a file whose values the
    environment or flags still override."""
    found, refused = _Found(), set[str]()
    cfg = _parsed(data, found, refused)
    if validated:
        found.errors.extend(_validated(cfg, refused))
    found.raise_any()
    return cfg


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def parse_config_text(text: str, source: str = "config", *, validated: bool = True) -> Config:
    return parse_config(_toml(text, source), validated=validated)


def validate(cfg: Config) -> Config:
    """Check ranges and formats that the types alone do not catch; every failing check is reported."""
    found = _Found()
    found.errors.extend(_validated(cfg, ()))
    found.raise_any()
    return cfg


KEY: Final = re.compile(r"[a-z_]+\.[a-z_]+(?=: )")


def _validated(cfg: Config, refused: Iterable[str]) -> list[ConfigError]:
    """The errors of the checks, less those a check gives because a key it compares with is wrong:
    one that names a key whose value was refused (it holds its default), or that names, after its
    own key, a key that failed its own check (upstream.timeout = -1 would also fail
    attempt_timeout's "<= upstream.timeout"). The operator fixes that key, and the next run tells."""
    found = _Found()
    _validate(cfg, found)
    defaulted = set(refused)
    names = sorted({m[0] for e in found.errors if (m := KEY.match(str(e)))} | defaulted)
    if not names:
        return found.errors
    named = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in names) + r")(?!\w)")
    kept = []
    for error in found.errors:
        message = str(error)
        own = KEY.match(message)
        if own is not None and own[0] in defaulted:
            continue  # not the operator's value: theirs was refused, and said so
        if named.search(message[own.end():] if own else message) is None:
            kept.append(error)
    return kept


def _validate(cfg: Config, found: _Found) -> None:
    found.check(len(cfg.dns.listen) > 0, "dns.listen: at least one address is needed")
    listening: list[HostPort] = []  # the good ones, for the upstreams' loop check
    for text in cfg.dns.listen:
        with found.each():
            listening.append(parse_host_port(text, key="dns.listen", listen=True))
    found.check(512 <= cfg.dns.udp_max_size <= 65535,
                f"dns.udp_max_size: must be 512..65535, got {cfg.dns.udp_max_size}")
    found.check(0 < cfg.dns.tcp_idle_timeout <= 3600,
                f"dns.tcp_idle_timeout: must be > 0 and <= 3600 seconds, got {cfg.dns.tcp_idle_timeout}")
    _validate_exposure(cfg.dns, found)
    for text in cfg.dns.tls_listen:
        with found.each():
            parse_host_port(text, default_port=853, key="dns.tls_listen", listen=True)
    for text in cfg.dns.https_listen:
        with found.each():
            parse_host_port(text, default_port=443, key="dns.https_listen", listen=True)
    api: HostPort | None = None
    with found.each():
        api = cfg.api_listen
    with found.each():
        admin = cfg.admin_listen
        found.check(api is None or admin is None or admin.port == 0 or admin.port != api.port or admin.host != api.host,
                    f"api.admin_listen: must differ from api.listen, got {cfg.api.admin_listen!r}")
    found.check(1024 <= cfg.api.max_body_bytes <= 16 * 1024 * 1024,
                f"api.max_body_bytes: must be 1024..16777216, got {cfg.api.max_body_bytes}")
    found.check(cfg.api.consent_changes_per_minute >= 0,
                f"api.consent_changes_per_minute: must be >= 0 (0: no limit), got {cfg.api.consent_changes_per_minute}")
    _validate_api_limits(cfg.api, found)
    for origin in cfg.api.allowed_origins:
        found.check(
            origin.startswith(("http://", "https://")) and origin.count("/") == 2,
            f"api.allowed_origins: expected scheme://host[:port], got {origin!r}",
        )
    for host in cfg.api.hosts:
        found.check(bool(HOST_LABELS.fullmatch(host)) or is_ip(host),
                    f"api.hosts: expected a host name or an IP address, got {host!r}")
    for name, addresses in cfg.upstream.bootstrap:
        found.check(bool(HOST_NAME.fullmatch(name.rstrip("."))),
                    f"upstream.bootstrap: expected a host name such as dns.quad9.net, got {name!r}")
        found.check(bool(addresses), f"upstream.bootstrap.{name}: at least one address is needed")
        for address in addresses:
            found.check(is_ip(address), f"upstream.bootstrap.{name}: not an IP address: {address!r}")
    bootstrap = cfg.upstream_bootstrap
    for text in cfg.upstream.servers:
        with found.each():
            for server in parse_upstreams(text, "upstream.servers", bootstrap):
                found.check(not points_at(server, tuple(listening)),
                            f"upstream.servers: {server} is dnsgate's own DNS address: queries would loop")
    for domain, texts in cfg.upstream.domains:
        try:
            name_to_wire(domain)
        except ValueError as exc:
            found.add(f"upstream.domains: bad domain {domain!r}: {exc}")
        found.check(bool(texts), f"upstream.domains.{domain}: at least one server is needed")
        for text in texts:
            with found.each():
                for server in parse_upstreams(text, f"upstream.domains.{domain}", bootstrap):
                    found.check(not points_at(server, tuple(listening)),
                                f"upstream.domains.{domain}: {server} is dnsgate's own DNS address: "
                                "queries would loop")
    found.check(0 < cfg.upstream.timeout <= 60,
                f"upstream.timeout: must be > 0 and <= 60 seconds, got {cfg.upstream.timeout}")
    found.check(
        0 < cfg.upstream.attempt_timeout <= cfg.upstream.timeout,
        f"upstream.attempt_timeout: must be > 0 and <= upstream.timeout, got {cfg.upstream.attempt_timeout}",
    )
    found.check(cfg.cache.max_entries >= 0, f"cache.max_entries: must be >= 0, got {cfg.cache.max_entries}")
    found.check(cfg.cache.max_bytes >= 0, f"cache.max_bytes: must be >= 0, got {cfg.cache.max_bytes}")
    found.check(0 <= cfg.cache.min_ttl <= MAX_TTL, f"cache.min_ttl: must be 0..{MAX_TTL}, got {cfg.cache.min_ttl}")
    found.check(
        max(cfg.cache.min_ttl, 1) <= cfg.cache.max_ttl <= MAX_TTL,
        f"cache.max_ttl: must be >= 1 and >= cache.min_ttl, and at most {MAX_TTL}, got {cfg.cache.max_ttl}",
    )
    found.check(1 <= cfg.cache.stale_ttl <= 3600, f"cache.stale_ttl: must be 1..3600, got {cfg.cache.stale_ttl}")
    found.check(1 <= cfg.cache.stale_max_age <= MAX_TTL,
                f"cache.stale_max_age: must be 1..{MAX_TTL}, got {cfg.cache.stale_max_age}")
    found.check(0 <= cfg.local.ttl <= 604800, f"local.ttl: must be 0..604800 seconds, got {cfg.local.ttl}")
    if cfg.local.healthcheck:
        try:
            name_to_wire(cfg.local.healthcheck)
        except ValueError as exc:
            found.add(f"local.healthcheck: {exc}")
    found.check(1 <= cfg.gate.sinkhole_ttl <= 3600, f"gate.sinkhole_ttl: must be 1..3600, got {cfg.gate.sinkhole_ttl}")
    found.check(
        1 <= cfg.gate.allowed_ttl_cap <= 86400,
        f"gate.allowed_ttl_cap: must be 1..86400, got {cfg.gate.allowed_ttl_cap}",
    )
    found.check(
        1 <= cfg.consent.max_days <= 395,
        f"consent.max_days: must be 1..395 (13 months), got {cfg.consent.max_days}",
    )
    found.check(
        1 <= cfg.consent.default_days <= cfg.consent.max_days,
        f"consent.default_days: must be 1..consent.max_days, got {cfg.consent.default_days}",
    )
    c = cfg.consent
    for name in ("opt_out_days", "kiosk_days"):
        value = getattr(c, name)
        found.check(1 <= value <= c.max_days, f"consent.{name}: must be 1..consent.max_days, got {value}")
    found.check(c.kiosk_idle_minutes > 0, f"consent.kiosk_idle_minutes: must be > 0, got {c.kiosk_idle_minutes}")
    found.check(c.retention_days >= 0,
                f"consent.retention_days: must be >= 0 (0 keeps forever), got {c.retention_days}")
    found.check(0 < c.sweep_interval <= 3600,
                f"consent.sweep_interval: must be 0..3600 seconds, got {c.sweep_interval}")
    for cidr, profile in cfg.profiles.networks:
        try:
            ipaddress.ip_network(cidr)
        except ValueError as exc:
            found.add(f"profiles.networks.{cidr!r}: {exc}")
        found.check(profile in PROFILE_NAMES,
                    f"profiles.networks.{cidr!r}: must be one of {', '.join(PROFILE_NAMES)}; got {profile!r}")
    for address in cfg.identity.trusted_forwarders:
        found.check(is_ip(address), f"identity.trusted_forwarders: not an IP address: {address!r}")
    found.check(cfg.identity.neighbour_refresh > 0,
                f"identity.neighbour_refresh: must be > 0, got {cfg.identity.neighbour_refresh}")
    found.check(10 <= cfg.identity.pairing_ttl <= 86400,
                f"identity.pairing_ttl: must be 10..86400 seconds, got {cfg.identity.pairing_ttl}")
    _validate_portal(cfg.portal, found)
    found.check(bool(cfg.storage.data_dir), "storage.data_dir: must not be empty")
    store = cfg.storage.store
    found.check(store == "sqlite" or (store.startswith(("redis://", "rediss://", "unix://")) and len(store) > 8),
                f"storage.store: expected \"sqlite\" or a Redis URL (redis://host:6379/0, rediss://…, unix://…), "
                f"got {store!r}")
    found.check(bool(cfg.storage.redis_prefix), "storage.redis_prefix: must not be empty")
    found.check(0 < cfg.storage.redis_timeout <= 60,
                f"storage.redis_timeout: must be 0..60 seconds, got {cfg.storage.redis_timeout}")
    _validate_lists(cfg.lists, found)
    found.check(cfg.querylog.queue_size >= 1, f"querylog.queue_size: must be >= 1, got {cfg.querylog.queue_size}")
    found.check(0 < cfg.querylog.flush_interval <= 60,
                f"querylog.flush_interval: must be > 0 and <= 60, got {cfg.querylog.flush_interval}")
    found.check(cfg.querylog.max_age_days >= 1, f"querylog.max_age_days: must be >= 1, got {cfg.querylog.max_age_days}")
    found.check(cfg.querylog.max_rows >= 1, f"querylog.max_rows: must be >= 1, got {cfg.querylog.max_rows}")
    found.check(cfg.events.webhook_url == "" or cfg.events.webhook_url.startswith(("http://", "https://")),
                f"events.webhook_url: expected an http:// or https:// URL, got {cfg.events.webhook_url!r}")
    found.check(cfg.events.webhook_timeout > 0,
                f"events.webhook_timeout: must be > 0, got {cfg.events.webhook_timeout}")


HOST_LABELS: Final = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                                r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


HOST_NAME: Final = re.compile(r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                              r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _validate_portal(portal: PortalConfig, found: _Found) -> None:
    found.check(bool(HOST_NAME.fullmatch(portal.host)),
                f"portal.host: expected a host name of two or more labels, such as consent.dnsgate.internal, "
                f"got {portal.host!r}")
    for address in portal.addresses:
        found.check(is_ip(address), f"portal.addresses: not an IP address: {address!r}")
    found.check(portal.url == "" or (portal.url.startswith(("http://", "https://")) and portal.url.count("/") >= 2
                                and portal.url.split("/")[2] != ""),
                f"portal.url: expected an http:// or https:// URL, got {portal.url!r}")
    found.check(portal.privacy_url == "" or portal.privacy_url.startswith(("http://", "https://")),
                f"portal.privacy_url: expected an http:// or https:// URL, got {portal.privacy_url!r}")
    for key, value in (("operator", portal.operator), ("contact", portal.contact),
                       ("privacy_url", portal.privacy_url)):
        found.check(len(value) <= 300 and value.isprintable(),
                    f"portal.{key}: expected one printable line of at most 300 characters")
    for origin in portal.cors_origins:
        found.check(origin.startswith(("http://", "https://")) and origin.count("/") == 2
                    and origin.split("/")[2] != "",
                    f"portal.cors_origins: expected scheme://host[:port], got {origin!r}")


def _networks(key: str, values: tuple[str, ...], found: _Found) -> None:
    for i, text in enumerate(values):
        try:
            ipaddress.ip_network(text)
        except ValueError as exc:
            found.add(f"{key}[{i}]: expected a network such as '192.168.0.0/16': {exc}")


def _validate_exposure(d: DnsConfig, found: _Found) -> None:
    _networks("dns.allow_clients", d.allow_clients, found)
    _networks("dns.rate_limit_exempt", d.rate_limit_exempt, found)
    found.check(d.rate_limit >= 0, f"dns.rate_limit: must be >= 0 (0: off), got {d.rate_limit}")
    found.check(0 <= d.rate_limit_slip <= 10, f"dns.rate_limit_slip: must be 0..10, got {d.rate_limit_slip}")
    found.check(8 <= d.rate_limit_ipv4_prefix <= 32,
                f"dns.rate_limit_ipv4_prefix: must be 8..32, got {d.rate_limit_ipv4_prefix}")
    found.check(16 <= d.rate_limit_ipv6_prefix <= 128,
                f"dns.rate_limit_ipv6_prefix: must be 16..128, got {d.rate_limit_ipv6_prefix}")
    found.check(d.tcp_max_connections >= 1, f"dns.tcp_max_connections: must be >= 1, got {d.tcp_max_connections}")
    found.check(1 <= d.tcp_max_connections_per_client <= d.tcp_max_connections,
                f"dns.tcp_max_connections_per_client: must be 1..dns.tcp_max_connections, "
                f"got {d.tcp_max_connections_per_client}")
    found.check(0 < d.tcp_query_timeout <= 600,
                f"dns.tcp_query_timeout: must be > 0 and <= 600, got {d.tcp_query_timeout}")
    found.check(d.tcp_max_queries_per_connection >= 1,
                f"dns.tcp_max_queries_per_connection: must be >= 1, got {d.tcp_max_queries_per_connection}")
    found.check(d.tcp_max_pipelined >= 1, f"dns.tcp_max_pipelined: must be >= 1, got {d.tcp_max_pipelined}")
    found.check(1 <= d.workers <= MAX_WORKERS, f"dns.workers: must be 1..{MAX_WORKERS}, got {d.workers}")
    _networks("dns.trusted_proxies", d.trusted_proxies, found)
    found.check(not d.resolver_name or bool(HOST_NAME.fullmatch(d.resolver_name.rstrip("."))),
                f"dns.resolver_name: expected a host name such as dns.home.arpa, got {d.resolver_name!r}")
    if d.tls_listen or d.https_listen:
        found.check(bool(d.tls_cert) and bool(d.tls_key),
                    "dns.tls_cert and dns.tls_key: DNS over TLS and over HTTPS need a certificate and its key "
                    "(PEM files; `dnsgate cert init` makes them)")


def _validate_api_limits(a: ApiConfig, found: _Found) -> None:
    found.check(a.max_connections >= 1, f"api.max_connections: must be >= 1, got {a.max_connections}")
    found.check(1 <= a.max_connections_per_client <= a.max_connections,
                f"api.max_connections_per_client: must be 1..api.max_connections, got {a.max_connections_per_client}")
    for name in ("idle_timeout", "header_timeout", "body_timeout"):
        value = getattr(a, name)
        found.check(0 < value <= 3600, f"api.{name}: must be > 0 and <= 3600 seconds, got {value}")


def _validate_lists(lists: ListsConfig, found: _Found) -> None:
    seen: set[str] = set()
    for i, src in enumerate(lists.sources):
        key = f"lists.sources[{i}]"
        found.check(bool(LIST_ID.fullmatch(src.id)),
                    f"{key}.id: expected 1-63 of a-z 0-9 _ - (not first), got {src.id!r}")
        found.check(src.id not in seen, f"{key}.id: {src.id!r} is used twice")
        seen.add(src.id)
        found.check(bool(src.url) != bool(src.file), f"{key}: give exactly one of url and file ({src.id})")
        found.check(not src.url or src.url.startswith(("http://", "https://")),
                    f"{key}.url: expected an http:// or https:// URL, got {src.url!r}")
        if src.kind == "block":
            found.check(bool(src.category), f"{key}.category: a block list needs the consent category that opens it")
        else:
            found.check(not src.category, f"{key}.category: an allow list has no category ({src.id})")
    for pattern in lists.allow:
        bare = pattern[2:] if pattern.startswith("*.") else pattern
        try:
            wire = name_to_wire(bare)
        except ValueError as exc:
            found.add(f"lists.allow: {exc}")
            continue
        found.check(wire != b"\x00" and "*" not in bare,
                    f"lists.allow: use 'example.com' or '*.example.com', got {pattern!r}")
    found.check(lists.refresh_interval >= 0, f"lists.refresh_interval: must be >= 0, got {lists.refresh_interval}")
    found.check(lists.fetch_timeout > 0, f"lists.fetch_timeout: must be > 0, got {lists.fetch_timeout}")
    found.check(lists.max_download_bytes >= 1024,
                f"lists.max_download_bytes: must be >= 1024, got {lists.max_download_bytes}")


# --------------------------------------------------------------------------------------------
# Layering: defaults < file < environment < command line


@dataclass(frozen=True, slots=True)
class Overrides:
    """Values given on the command line or in DNSGATE_* variables; None means "not given"."""

    dns: tuple[str, ...] | None = None
    api: str | None = None
    upstream: tuple[str, ...] | None = None
    data_dir: str | None = None
    store: str | None = None
    admin_token: str | None = None
    log_level: str | None = None
    log_format: str | None = None
    workers: str | None = None
    # Keys set by DNSGATE_<SECTION>_<KEY> variables: (variable, section, key, checked value).
    settings: tuple[tuple[str, str, str, Any], ...] | None = None
    # What the variables could not set: their errors (load_config reports them with the file's) and
    # the keys their values were meant for (each left at the file's value or its default, and not
    # checked until the variable is fixed).
    errors: tuple[ConfigError, ...] | None = None
    refused: tuple[str, ...] | None = None


ENV_PREFIX: Final = "DNSGATE_"
# Older short names, each for one key; they read as before. DNSGATE_LOG_LEVEL and DNSGATE_LOG_FORMAT
# are the rule's own names (and the flags').
ENV_SHORTHANDS: Final = {"DNSGATE_DNS": "dns.listen", "DNSGATE_API": "api.listen",
                         "DNSGATE_UPSTREAM": "upstream.servers", "DNSGATE_DATA_DIR": "storage.data_dir",
                         "DNSGATE_STORE": "storage.store", "DNSGATE_ADMIN_TOKEN": "api.admin_token",
                         "DNSGATE_WORKERS": "dns.workers", "DNSGATE_LOG_LEVEL": "log.level",
                         "DNSGATE_LOG_FORMAT": "log.format"}
ENV_TRUE: Final = ("true", "1", "yes", "on")
ENV_FALSE: Final = ("false", "0", "no", "off")


def env_variable(section: str, key: str) -> str:
    """Every key's variable, by one rule: DNSGATE_<SECTION>_<KEY> (dns.udp_max_size: DNSGATE_DNS_UDP_MAX_SIZE)."""
    return f"{ENV_PREFIX}{section}_{key}".upper()


def env_value(text: str, annotation: str, variable: str) -> Any:
    """A variable's text as the key's value: true/false (also 1/0, yes/no, on/off), numbers, strings;
    a list as JSON (["a", "b"]) or comma-separated; a table or [[lists.sources]] as JSON."""
    text = text.strip()
    value: Any = text
    if annotation == "bool":
        if text.lower() not in ENV_TRUE + ENV_FALSE:
            raise ConfigError(f"{variable}: expected true or false, got {text!r}")
        value = text.lower() in ENV_TRUE
    elif annotation == "int":
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{variable}: expected an integer, got {text!r}") from None
    elif annotation == "float":
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{variable}: expected a number, got {text!r}") from None
    elif annotation == "tuple[str, ...]" and not text.startswith("["):
        value = [part.strip() for part in text.split(",") if part.strip()]
    elif annotation.startswith("tuple["):
        try:
            value = json.loads(text)
        except ValueError as exc:
            example = '["a", "b"]' if annotation == "tuple[str, ...]" else (
                '[{"id": "ads", "url": "https://…", "category": "marketing"}]' if "ListSource" in annotation
                else '{"name": "value"}')
            raise ConfigError(f"{variable}: expected JSON such as {example}: {exc}") from None
    return _convert(value, annotation, variable)


def env_settings(env: Mapping[str, str]) -> tuple[tuple[str, str, str, Any], ...]:
    """The keys DNSGATE_<SECTION>_<KEY> variables set, checked; an empty variable counts as unset. A
    variable that names a section but no key of it is an error ("did you mean"); other DNSGATE_*
    names are not configuration (the short names are read by overrides_from_env)."""
    errors = _Found()
    found = _env_settings(env, errors, set())
    errors.raise_any()
    return found


def _env_settings(env: Mapping[str, str], errors: _Found, refused: set[str]) -> tuple[tuple[str, str, str, Any], ...]:
    """`env_settings`, its errors in `errors` and the keys of refused values in `refused`."""
    found: list[tuple[str, str, str, Any]] = []
    for variable, text in sorted(env.items()):
        if not variable.startswith(ENV_PREFIX) or variable in ENV_SHORTHANDS or not text.strip():
            continue
        section, _, rest = variable[len(ENV_PREFIX):].lower().partition("_")
        if section not in _SECTIONS or not rest:
            continue
        known = {f.name: str(f.type) for f in fields(_SECTIONS[section])}
        if rest not in known:
            names = {env_variable(section, name): name for name in known}
            errors.add(f"{variable}: [{section}] has no key {rest!r} ({did_you_mean(variable, names)}known: "
                       f"{', '.join(names)})")
            continue
        try:
            found.append((variable, section, rest, env_value(text, known[rest], variable)))
        except ConfigError as exc:
            errors.errors.extend(exc.errors)
            refused.add(f"{section}.{rest}")
    by_key = {f"{section}.{key}": variable for variable, section, key, _ in found}
    for short, key in ENV_SHORTHANDS.items():
        errors.check(not (env.get(short, "").strip() and key in by_key and short != by_key[key]),
                     f"{short} and {by_key.get(key)} both set {key}: keep one")
    return tuple(found)


def overrides_from_env(env: Mapping[str, str]) -> tuple[str | None, Overrides]:
    """Read DNSGATE_CONFIG, the DNSGATE_<SECTION>_<KEY> variables and the short names (lists are
    comma-separated). A bad variable does not raise here: its error travels in the overrides, so
    that load_config reports it together with the file's."""
    errors, refused = _Found(), set[str]()
    settings = _env_settings(env, errors, refused)

    def listed(name: str) -> tuple[str, ...] | None:
        raw = env.get(ENV_PREFIX + name)
        return None if raw is None else tuple(p.strip() for p in raw.split(",") if p.strip())

    return env.get(ENV_PREFIX + "CONFIG") or None, Overrides(
        settings=settings or None,
        errors=tuple(errors.errors) or None,
        refused=tuple(sorted(refused)) or None,
        dns=listed("DNS"),
        api=env.get(ENV_PREFIX + "API") or None,
        upstream=listed("UPSTREAM"),
        data_dir=env.get(ENV_PREFIX + "DATA_DIR") or None,
        store=env.get(ENV_PREFIX + "STORE") or None,
        admin_token=env.get(ENV_PREFIX + "ADMIN_TOKEN") or None,
        log_level=env.get(ENV_PREFIX + "LOG_LEVEL") or None,
        log_format=env.get(ENV_PREFIX + "LOG_FORMAT") or None,
        workers=env.get(ENV_PREFIX + "WORKERS") or None,
    )


def merge_overrides(first: Overrides, then: Overrides) -> Overrides:
    """`then` wins wherever it gives a value."""
    return Overrides(
        **{f.name: getattr(then, f.name) if getattr(then, f.name) is not None else getattr(first, f.name)
           for f in fields(Overrides)}
    )


def apply_overrides(cfg: Config, o: Overrides) -> Config:
    found = _Found()
    cfg = _overridden(cfg, o, found)
    found.errors.extend(_validated(cfg, ()))
    found.raise_any()
    return cfg


def _overridden(cfg: Config, o: Overrides, found: _Found) -> Config:
    for _, section, key, value in o.settings or ():
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{key: value})})
    if o.dns is not None:
        cfg = replace(cfg, dns=replace(cfg.dns, listen=o.dns))
    if o.api is not None:
        cfg = replace(cfg, api=replace(cfg.api, listen=o.api))
    if o.upstream is not None:
        cfg = replace(cfg, upstream=replace(cfg.upstream, servers=o.upstream))
    if o.data_dir is not None:
        cfg = replace(cfg, storage=replace(cfg.storage, data_dir=o.data_dir))
    if o.store is not None:
        cfg = replace(cfg, storage=replace(cfg.storage, store=o.store))
    if o.admin_token is not None:
        cfg = replace(cfg, api=replace(cfg.api, admin_token=o.admin_token))
    if o.log_level is not None:
        with found.each():
            level = _checked(LogConfig, "level", o.log_level.lower(), "log.level")
            cfg = replace(cfg, log=replace(cfg.log, level=level))
    if o.log_format is not None:
        with found.each():
            log_format = _checked(LogConfig, "format", o.log_format.lower(), "log.format")
            cfg = replace(cfg, log=replace(cfg.log, format=log_format))
    if o.workers is not None:
        with found.each():
            cfg = replace(cfg, dns=replace(cfg.dns, workers=_whole(o.workers, "dns.workers")))  # validate: the range
    return cfg


def _whole(text: str, key: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{key}: expected a whole number, got {text!r}") from None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None


def load_config(path: str | None, overrides: Overrides) -> Config:
    """Defaults, then the file at `path` (if any), then the overrides; every independent error of
    the variables, the file and the flags is raised together (ConfigErrors), one alone as itself."""
    cfg, found, refused = Config(), _Found(), set(overrides.refused or ())
    found.errors.extend(overrides.errors or ())
    if path is not None:
        try:
            data = _toml(_read(path), path)
        except ConfigError as exc:  # no file to check: this, and what the variables said
            raise (ConfigErrors([*found.errors, exc]) if found.errors else exc) from None
        cfg = _parsed(data, found, refused)  # types only: the environment and flags may override
    cfg = _overridden(cfg, overrides, found)
    found.errors.extend(_validated(cfg, refused))  # the result, as it would run
    found.raise_any()
    return cfg


def points_at(server: HostPort | UpstreamAddress, listening: tuple[HostPort, ...]) -> bool:
    """Whether a query sent to `server` would reach one of our own listeners."""
    for ours in listening:
        if server.port != ours.port:
            continue
        if server.host == ours.host:
            return True
        if ours.host in ("0.0.0.0", "::") and ipaddress.ip_address(server.host).is_loopback:
            return True
    return False


def resolv_conf_servers(text: str) -> tuple[str, ...]:
    """The `nameserver` addresses of a resolv.conf, in order (scoped IPv6 entries skipped)."""
    servers: list[str] = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver" and "%" not in parts[1]:
            try:
                ipaddress.ip_address(parts[1])
            except ValueError:
                continue
            servers.append(f"[{parts[1]}]" if ":" in parts[1] else parts[1])
    return tuple(servers)

"""A ruleset: everything a reload replaces, built from a Config and the files it names.
(The consent text and the operator, which a reload replaces too, are read here: `read_notice`.)

The catalog (base file, drop-ins, switched-off vendors and domains) with the imported lists
attached, the sinkhole, the TTL policies and the cache bounds. Building reads files and parses
lists, so the reloader runs it on a worker thread; nothing here touches the running resolver.
`ListCache` keeps parsed lists and the last index, so a reload that does not change a list neither
parses it again nor holds two copies of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dnsgate.config import Config, ListSource
from dnsgate.consent.notice import Notice, NoticeError, Operator, builtin_notice_text, parse_notice_text
from dnsgate.dns.cache import TtlPolicy
from dnsgate.dns.local_answers import DNSGATE_ZONE
from dnsgate.dns.local_records import LocalRecords, RecordError, parse_hosts, parse_records
from dnsgate.dns.local_records import build as build_records
from dnsgate.dns.sinkhole import Sinkhole
from dnsgate.rules.blocklists import ListIndex, ParsedList, build_index, parse_list
from dnsgate.rules.catalog import Catalog, CatalogError, DomainRule, Vendor, builtin_catalog_text, parse_catalog_files
from dnsgate.rules.list_sources import ListError, Stamp, read_chunks, stamp_of


@dataclass(frozen=True, slots=True)
class Ruleset:
    catalog: Catalog
    sinkhole: Sinkhole
    plain_ttl: TtlPolicy
    gated_ttl: TtlPolicy
    cache_max_entries: int
    cache_max_bytes: int
    local: LocalRecords | None = None  # the operator's own names ([local] records, hosts_file)


@dataclass(slots=True)
class ListStatus:
    """What GET /v1/lists and reload reports say about one list."""

    id: str
    name: str
    kind: str
    category: str
    source: str
    format: str = ""
    entries: int = 0
    skipped: int = 0
    loaded: bool = False
    fetched_at: float | None = None
    checked_at: float | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_catalog(cfg: Config) -> Catalog:
    """The base catalog, grown by the drop-ins of gate.vendors_dir, minus what is switched off."""
    if cfg.gate.catalog:
        base = (cfg.gate.catalog, _read_text(cfg.gate.catalog, "gate.catalog"))
    else:
        base = ("built-in catalog", builtin_catalog_text())
    dropins: list[tuple[str, str]] = []
    if cfg.gate.vendors_dir:
        directory = Path(cfg.gate.vendors_dir)
        if not directory.is_dir():
            raise CatalogError(f"gate.vendors_dir: {directory} is not a directory")
        dropins = [(str(p), _read_text(str(p), "gate.vendors_dir")) for p in sorted(directory.glob("*.toml"))]
    catalog = parse_catalog_files(base, dropins)
    return catalog.without_vendors(cfg.gate.disabled_vendors).without(cfg.gate.disabled_domains)


def read_notice(cfg: Config) -> Notice:
    """The consent text: the file consent.notice names, else the built-in one. Raises NoticeError."""
    if not cfg.consent.notice:
        return parse_notice_text(builtin_notice_text(), "built-in notice")
    try:
        text = Path(cfg.consent.notice).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise NoticeError(f"consent.notice: cannot read {cfg.consent.notice}: {reason}") from None
    return parse_notice_text(text, f"consent.notice: {cfg.consent.notice}")


def operator_of(cfg: Config) -> Operator:
    """Who runs the network, as [portal] names them."""
    return Operator(cfg.portal.operator, cfg.portal.contact, cfg.portal.privacy_url)


def _read_text(path: str, key: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise CatalogError(f"{key}: cannot read {path}: {reason}") from None


def list_rule(src: ListSource) -> DomainRule:
    """The one rule every name of a block list is gated on: a vendor-less gate on its category."""
    vendor = Vendor(id=src.id, name=src.name or src.id, category=src.category, tcf_purposes=(), summary=src.description,
                    recipients="", privacy_policy="", data_collected=(), cookies=(),
                    sources=(src.url or src.file,), ccpa_sale_or_share=False, kind="list")
    return DomainRule(pattern=f"list {src.id}", vendor=vendor, apex=b"", subdomains_only=False, serves="",
                      source=src.url or src.file)


@dataclass(slots=True)
class _Parsed:
    stamp: Stamp
    parsed: ParsedList


@dataclass(slots=True)
class ListCache:
    """Parsed lists and the last index, reused while their inputs are unchanged (a reload that does
    not touch the lists costs nothing, and memory is not doubled while the old index serves)."""

    parsed: dict[ListSource, _Parsed] = field(default_factory=dict)
    rules: dict[ListSource, DomainRule] = field(default_factory=dict)
    index_key: object = None
    index: ListIndex | None = None


def build_lists(cfg: Config, catalog: Catalog, paths: dict[str, Path], cache: ListCache,
                statuses: dict[str, ListStatus]) -> ListIndex | None:
    """The index of every list that has a copy (`paths`: id -> file); raises ListError/CatalogError."""
    categories = {c.id for c in catalog.categories}
    blocks: list[tuple[DomainRule, ParsedList]] = []
    allows: list[ParsedList] = []
    used: dict[ListSource, _Parsed] = {}
    key: list[object] = [cfg.lists.allow]
    for i, src in enumerate(cfg.lists.sources):
        if src.kind == "block" and src.category not in categories:
            raise CatalogError(f"lists.sources[{i}].category: {src.category!r} is not a category of the catalog "
                               f"(known: {', '.join(sorted(categories))})")
        path = paths.get(src.id)
        if path is None:
            continue  # a URL list not downloaded yet: the status says why
        try:
            stamp = stamp_of(path)
            entry = cache.parsed.get(src)
            if entry is None or entry.stamp != stamp:
                entry = _Parsed(stamp, parse_list(read_chunks(path), subdomains=src.subdomains))
        except OSError as exc:
            raise ListError(f"lists.sources[{i}] ({src.id}): cannot read {path}: {exc.strerror}") from None
        if not entry.parsed.entries:
            raise ListError(f"lists.sources[{i}] ({src.id}): {path} holds no usable entries "
                            f"({entry.parsed.skipped} lines skipped)")
        used[src] = entry
        key.append((src, stamp))
        status = statuses[src.id]
        status.format, status.entries, status.skipped = entry.parsed.format, entry.parsed.entries, entry.parsed.skipped
        if src.kind == "block":
            blocks.append((cache.rules.setdefault(src, list_rule(src)), entry.parsed))
        else:
            allows.append(entry.parsed)
    cache.parsed = used  # lists no longer configured are forgotten
    cache.rules = {src: rule for src, rule in cache.rules.items() if src in used}
    if not blocks:
        cache.index_key, cache.index = None, None
        return None
    index_key = tuple(key)
    if cache.index is None or cache.index_key != index_key:
        cache.index = build_index(blocks, allows, cfg.lists.allow)
        cache.index_key = index_key
    return cache.index


def read_local_records(cfg: Config) -> LocalRecords | None:
    """The operator's records: `local.records`, then `local.hosts_file` (read here, on the reloader's
    thread). Raises RecordError naming the key and the entry."""
    c = cfg.local
    records = parse_records(c.records, c.ttl)
    if c.hosts_file:
        try:
            text = Path(c.hosts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise RecordError(f"local.hosts_file: cannot read {c.hosts_file}: {reason}") from None
        records += parse_hosts(text, c.ttl, f"local.hosts_file {c.hosts_file}")
    if not records:
        return None
    return build_records(records, c.generate_ptr, c.ttl, reserved=(DNSGATE_ZONE, cfg.portal.host))


def ruleset_for(cfg: Config, catalog: Catalog, local: LocalRecords | None = None) -> Ruleset:
    return Ruleset(
        catalog=catalog,
        sinkhole=Sinkhole(cfg.gate.mode, cfg.gate.sinkhole_ttl, cfg.dns.udp_max_size),
        plain_ttl=TtlPolicy(cfg.cache.min_ttl, cfg.cache.max_ttl, None),
        gated_ttl=TtlPolicy(cfg.cache.min_ttl, cfg.cache.max_ttl, cfg.gate.allowed_ttl_cap),
        cache_max_entries=cfg.cache.max_entries,
        cache_max_bytes=cfg.cache.max_bytes,
        local=local,
    )

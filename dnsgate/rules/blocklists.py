"""Imported block and allow lists: standard formats parsed into one index, matched in O(labels).

Formats (detected per list from its first lines):
  hosts     `0.0.0.0 ads.example.com [more names]`   the names themselves
  adblock   `||ads.example.com^` (optionally `$important`)   the name and every subdomain;
            `@@||ok.example.com^` is an exception: an allow entry for every list
  domains   `ads.example.com`   the name itself;  `*.example.com`   every subdomain, not the apex
A list's `subdomains` option makes hosts and plain entries cover subdomains too. Rules a DNS server
cannot honour (URL paths, cosmetic rules, other `$` options) are counted as skipped, as are names
that are not valid host names and one-label names that would cover a whole TLD.

The index is one dict from lower-case dotted names to a shared (apex, subdomains) slot of rules:
a million names cost about 100 MB, and bytes stay bytes from the file to the dict (no per-name
conversion at load). Lookups convert the wire name once and try each label suffix. Precedence:
an allow entry anywhere above or at the name wins over every list; otherwise the most specific
listed name decides, and of two lists listing the same name the first configured one.
Pure: parsing takes chunks of bytes, never files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from dnsgate.rules.catalog import DomainRule
from dnsgate.wire import name_to_wire

EXACT: Final = 1  # the name itself
SUBS: Final = 2  # every subdomain of the name
TREE: Final = EXACT | SUBS

Format = Literal["hosts", "adblock", "domains"]

# Possessive quantifiers (Python 3.11+) keep these linear: a million lines take well under a second.
_LABEL: Final = rb"[a-z0-9_-]{1,63}+"
_NAME: Final = _LABEL + rb"(?:\." + _LABEL + rb")*+"
_WIDE: Final = _LABEL + rb"(?:\." + _LABEL + rb")++"  # two labels at least: `||com^` must not gate a TLD
_END: Final = rb"\.?[ \t]*+(?:#.*)?\r?$"
_IP: Final = rb"(?:[0-9]{1,3}+(?:\.[0-9]{1,3}+){3}+|[0-9a-f]*+:[0-9a-f:.]*+)"  # IPv4, or IPv6 (has a colon)
_HOSTS: Final = re.compile(rb"^[ \t]*+" + _IP + rb"[ \t]++(" + _NAME + rb")\.?(?=[ \t\r#]|$)", re.M)
_HOSTS_MORE: Final = re.compile(rb"^[ \t]*+" + _IP + rb"[ \t]++[^\s#]++[ \t]++([^\s#][^#\r\n]*)", re.M)
_ADBLOCK: Final = re.compile(rb"^[ \t]*+\|\|(" + _WIDE + rb")\.?\^(?:\$important)?[ \t]*+\r?$", re.M)
_ADBLOCK_ALLOW: Final = re.compile(rb"^[ \t]*+@@\|\|(" + _WIDE + rb")\.?\^(?:\$important)?[ \t]*+\r?$", re.M)
_PLAIN: Final = re.compile(rb"^[ \t]*+(" + _NAME + rb")" + _END, re.M)
_WILDCARD: Final = re.compile(rb"^[ \t]*+\*\.(" + _WIDE + rb")" + _END, re.M)
# The start of a blank or comment line: a newline the regex engine finds fast, then a short look.
_INSIGNIFICANT: Final = re.compile(rb"\n[ \t]*+(?:[#!\[]|\r?(?=\n))")
_VALID_NAME: Final = re.compile(_NAME)
_ADDRESS: Final = re.compile(_IP)
_HOSTS_IGNORED: Final = frozenset({
    b"localhost", b"localhost.localdomain", b"local", b"broadcasthost", b"ip6-localhost", b"ip6-loopback",
    b"ip6-localnet", b"ip6-mcastprefix", b"ip6-allnodes", b"ip6-allrouters", b"ip6-allhosts", b"0.0.0.0",
})
_SAMPLE_LINES: Final = 500
BLOCK: Final = 1 << 20  # bytes per regex pass
MAX_NAME: Final = 253


@dataclass(slots=True)
class ParsedList:
    """One list's names (lower-case dotted bytes) by reach, plus its `@@` exceptions."""

    format: Format
    names: dict[int, list[bytes]] = field(default_factory=dict)  # EXACT / SUBS / TREE -> names
    exceptions: list[bytes] = field(default_factory=list)  # `@@||name^`: allowed with subdomains
    skipped: int = 0

    @property
    def entries(self) -> int:
        return sum(len(n) for n in self.names.values()) + len(self.exceptions)


def detect_format(sample: bytes) -> Format:
    """The format most of the first significant lines are written in."""
    votes: dict[Format, int] = {"domains": 0, "hosts": 0, "adblock": 0}
    seen = 0
    for line in sample.lower().split(b"\n"):
        line = line.strip()
        if line.startswith(b"[adblock"):
            votes["adblock"] += _SAMPLE_LINES  # an AdBlock header settles it
        if not line or line.startswith((b"#", b"!", b"[")):
            continue
        words = line.split()
        if line.startswith((b"||", b"@@")):
            votes["adblock"] += 1
        elif len(words) >= 2 and _ADDRESS.fullmatch(words[0]):
            votes["hosts"] += 1
        else:
            votes["domains"] += 1
        seen += 1
        if seen >= _SAMPLE_LINES:
            break
    return max(votes, key=lambda f: votes[f])  # ties go to the first: domains


def lines_in_chunks(chunks: Iterable[bytes], min_size: int = BLOCK) -> Iterator[bytes]:
    """Re-cut arbitrary chunks into lower-cased blocks of whole lines, `min_size` bytes at least
    (but the last): a regex pass never splits a line, and the first block is a fair sample."""
    pending: list[bytes] = []
    size = 0
    for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        if size < min_size:
            continue
        data = b"".join(pending)
        cut = data.rfind(b"\n") + 1
        if cut:
            yield data[:cut].lower()
            pending, size = [data[cut:]], len(data) - cut
        else:
            pending = [data]
    rest = b"".join(pending)
    if rest:
        yield rest.lower() + b"\n"


def parse_list(chunks: Iterable[bytes], *, subdomains: bool = False, fmt: Format | None = None) -> ParsedList:
    """Parse a list given as chunks of bytes (any split). `subdomains`: bare names cover subdomains."""
    bare = TREE if subdomains else EXACT
    parsed: ParsedList | None = None
    for block in lines_in_chunks(chunks):
        if parsed is None:
            parsed = ParsedList(fmt or detect_format(block[:65536]))
        significant = _significant_lines(block)
        matched = 0
        if parsed.format == "hosts":
            names = _HOSTS.findall(block)
            matched = len(names)
            for more in _HOSTS_MORE.findall(block):
                extra = [n.rstrip(b".") for n in more.split()]
                good = [n for n in extra if _VALID_NAME.fullmatch(n)]
                parsed.skipped += len(extra) - len(good)
                names.extend(good)
            names = [n for n in names if n not in _HOSTS_IGNORED]
            _add(parsed, bare, names)
        elif parsed.format == "adblock":
            blocked = _ADBLOCK.findall(block)
            allowed = _ADBLOCK_ALLOW.findall(block)
            matched = len(blocked) + len(allowed)
            _add(parsed, TREE, blocked, wide_checked=True)
            parsed.exceptions.extend(allowed)
        else:
            plain = _PLAIN.findall(block)
            wild = _WILDCARD.findall(block)
            matched = len(plain) + len(wild)
            _add(parsed, bare, plain)
            _add(parsed, SUBS, wild, wide_checked=True)
        parsed.skipped += significant - matched
    return parsed if parsed is not None else ParsedList(fmt or "domains")


def _significant_lines(block: bytes) -> int:
    """Lines that are neither blank nor comments (`#`, `!`, `[Adblock ...]`)."""
    return block.count(b"\n") - len(_INSIGNIFICANT.findall(b"\n" + block))


def _add(parsed: ParsedList, reach: int, names: list[bytes], wide_checked: bool = False) -> None:
    if reach & SUBS and not wide_checked:
        names = _wide_only(names, parsed)
    good = [n for n in names if len(n) <= MAX_NAME]  # the regexes checked every label, not the total
    parsed.skipped += len(names) - len(good)
    parsed.names.setdefault(reach, []).extend(good)


def _wide_only(names: list[bytes], parsed: ParsedList) -> list[bytes]:
    """Names whose reach covers subdomains must have two labels at least: `||com^` would gate a TLD."""
    wide = [n for n in names if b"." in n]
    parsed.skipped += len(names) - len(wide)
    return wide


# --------------------------------------------------------------------------------------------
# The index


class _Allow:
    """The slot value meaning "allow-listed here"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ALLOW"


ALLOW: Final = _Allow()
Gate = DomainRule | _Allow | None
Slot = tuple[Gate, Gate]  # (for the name itself, for its subdomains)


@dataclass(frozen=True, slots=True)
class ListStats:
    entries: int
    skipped: int
    format: str


class ListIndex:
    """Every imported list in one dict: dotted name -> (apex gate, subdomain gate). Immutable."""

    __slots__ = ("_slots",)

    def __init__(self, slots: dict[bytes, Slot]) -> None:
        self._slots = slots

    def match(self, name: bytes, offsets: list[int]) -> DomainRule | None:
        """The list rule for the lower-case wire `name` (label `offsets` given), or None."""
        # The dotted form: drop the first length byte and the root, turn the other length bytes
        # into dots; the label at wire offset i then starts at dotted offset i. (A label holding a
        # literal dot can only make a bogus name match more, never a real name less.)
        dotted = bytearray(name[1:-1])
        for i in offsets[1:]:
            dotted[i - 1] = 46
        text = bytes(dotted)
        slots = self._slots
        found: Gate = None
        for i in offsets:
            slot = slots.get(text[i:] if i else text)
            if slot is not None:
                gate = slot[1] if i else slot[0]
                if gate is ALLOW:
                    return None  # an allow entry wins over every list, however specific the block
                if found is None:
                    found = gate
        return found if isinstance(found, DomainRule) else None

    def __len__(self) -> int:
        return len(self._slots)


def build_index(blocks: Sequence[tuple[DomainRule, ParsedList]], allows: Sequence[ParsedList],
                allow_patterns: Sequence[str] = ()) -> ListIndex:
    """One index from block lists (in precedence order) and allow lists / patterns."""
    slots: dict[bytes, Slot] = {}
    canon: dict[Slot, Slot] = {}

    def shared(slot: Slot) -> Slot:
        return canon.setdefault(slot, slot)  # one tuple object per distinct slot, not per name

    merged: dict[tuple[Slot, Slot], Slot] = {}
    for rule, parsed in blocks:
        for reach, names in parsed.names.items():
            new = shared((rule if reach & EXACT else None, rule if reach & SUBS else None))
            if not slots:
                slots = dict.fromkeys(names, new)
                continue
            get = slots.get
            for name in names:
                old = get(name)
                if old is None:
                    slots[name] = new
                elif old is not new:
                    both = merged.get((old, new))
                    if both is None:
                        # the first list keeps what it has; the new one fills what is empty
                        both = merged[(old, new)] = shared((old[0] if old[0] is not None else new[0],
                                                            old[1] if old[1] is not None else new[1]))
                    slots[name] = both

    def allow(names: Iterable[bytes], reach: int) -> None:
        empty: Slot = (None, None)
        for name in names:
            old = slots.get(name, empty)
            slots[name] = shared((ALLOW if reach & EXACT else old[0], ALLOW if reach & SUBS else old[1]))

    for _rule, parsed in blocks:
        allow(parsed.exceptions, TREE)
    for parsed in allows:
        for reach, names in parsed.names.items():
            allow(names, reach)
        allow(parsed.exceptions, TREE)
    for pattern in allow_patterns:
        reach, name = pattern_reach(pattern)
        allow([name], reach)
    return ListIndex(slots)


def pattern_reach(pattern: str) -> tuple[int, bytes]:
    """A catalog-style pattern as (reach, dotted name): `x.com` the name and its subdomains,
    `*.x.com` subdomains only. Raises ValueError for anything else."""
    subdomains_only = pattern.startswith("*.")
    wire = name_to_wire(pattern[2:] if subdomains_only else pattern)
    if wire == b"\x00" or "*" in (pattern[2:] if subdomains_only else pattern):
        raise ValueError(f"use 'example.com' or '*.example.com', got {pattern!r}")
    return (SUBS if subdomains_only else TREE), wire_to_dotted(wire)


def wire_to_dotted(wire: bytes) -> bytes:
    labels = []
    i = 0
    while wire[i]:
        labels.append(wire[i + 1 : i + 1 + wire[i]])
        i += wire[i] + 1
    return b".".join(labels)

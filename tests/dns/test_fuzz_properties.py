"""Property tests (hypothesis) over the wire parser, the whole query handler and upstream replies:
see tests/fuzz/checks.py for what must hold. The corpus and crash reproducers of the fuzzer
(tests/fuzz/corpus, tests/fuzz/crashes) are replayed here too, as regression tests."""

from __future__ import annotations

import struct
from pathlib import Path

import dns.message
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import checks

FUZZ = Path(__file__).parents[1] / "fuzz"
SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

labels = st.lists(st.binary(min_size=0, max_size=70), max_size=6)


@st.composite
def dns_packets(draw: st.DrawFn) -> bytes:
    """Packets shaped like queries, with every field free: header bits, counts, odd names, types, OPT."""
    qid = draw(st.integers(0, 0xFFFF))
    flags = draw(st.sampled_from([0x0100, 0x0000, 0x0110, 0x8100, 0x2900, 0x0120])) | draw(st.integers(0, 0xF))
    counts = draw(st.tuples(st.integers(0, 2), st.integers(0, 1), st.integers(0, 1), st.integers(0, 2)))
    name = b"".join(bytes([min(len(label), 255) & 0xFF]) + label for label in draw(labels)) + b"\x00"
    if draw(st.booleans()):
        name = draw(st.sampled_from([b"\xc0\x0c", b"\x07trackcmp\x03net\x00", b"\x04HOST\x07example\x04test\x00",
                                     b"\x01\xff\x00", b"\x3f" + b"a" * 63 + b"\x00"]))
    qtype = draw(st.sampled_from([1, 28, 65, 255, 252, 251, 16, 41, 0, 0xFFFF, 6]))
    body = name + struct.pack(">HH", qtype, draw(st.sampled_from([1, 3, 255, 0x4100])))
    if draw(st.booleans()):
        options = draw(st.binary(max_size=40))
        body += b"\x00\x00\x29" + struct.pack(">HIH", draw(st.integers(0, 0xFFFF)),
                                              draw(st.integers(0, 0xFFFFFFFF)), len(options)) + options
    return struct.pack(">HHHHHH", qid, flags, *counts) + body + draw(st.binary(max_size=8))


@given(st.binary(max_size=600))
@SETTINGS
def test_parser_never_raises_on_any_bytes(data: bytes) -> None:
    checks.check_parse(data)


@given(st.one_of(dns_packets(), st.binary(max_size=300)))
@SETTINGS
def test_answer_holds_for_any_packet(data: bytes) -> None:
    checks.check_answer(checks.pipeline(), data)


@st.composite
def upstream_replies(draw: st.DrawFn) -> bytes:
    """A genuine reply's records, then damaged: bytes flipped, cut, or counts that lie."""
    q = dns.message.make_query("host.example.test", "A")
    r = dns.message.make_response(q)
    for text in draw(st.lists(st.sampled_from([
            "host.example.test. 60 IN A 192.0.2.1", "host.example.test. 60 IN CNAME x.trackcmp.net.",
            "host.example.test. 60 IN MX 10 mail.example.test.", "host.example.test. 60 IN TXT \"hello\"",
            "host.example.test. 60 IN SOA ns.example.test. h.example.test. 1 2 3 4 5"]), max_size=4)):
        name, ttl, _, rdtype, rdata = text.split(None, 4)
        r.answer.append(dns.rrset.from_text(name, int(ttl), "IN", rdtype, rdata))
    data = bytearray(r.to_wire())
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if data:
            data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(12, max(12, len(data))))]
    return bytes(data)


@given(st.one_of(upstream_replies(), st.binary(max_size=400)), st.integers(0, 2))
@SETTINGS
def test_hostile_upstream_replies_never_crash_or_poison(reply: bytes, which: int) -> None:
    checks.check_upstream(checks.pipeline(), reply, which)


def _saved() -> list[Path]:
    return sorted(p for d in ("corpus", "crashes") for p in (FUZZ / d).glob("*") if p.is_file())


@pytest.mark.parametrize("path", _saved(), ids=lambda p: f"{p.parent.name}/{p.name[:12]}")
def test_fuzz_corpus_and_crash_reproducers_replay(path: Path) -> None:
    checks.run_one(checks.pipeline(), path.read_bytes())


def test_fast_path_short_question_before_an_empty_opt() -> None:
    """Found by the fuzzer: arcount 1, the last 11 bytes an empty OPT, fewer than 5 before it."""
    data = bytes.fromhex("9cd801000001000000000001037700002904d000000000000000")[:25]
    checks.check_answer(checks.pipeline(), data)


@pytest.mark.parametrize("flags", [0x0110, 0x0100], ids=["CD", "DO"])
def test_junk_after_the_question_never_hits_a_flagged_key(flags: int) -> None:
    """Found by the fuzzer: a question of a gated name asked with CD (or DO) is memoized under its
    key, which had one flag byte more than the question; the same question with that byte as junk
    after the class, asked without flags, hit that key and was echoed, junk and all."""
    p = checks.pipeline()
    question = b"\x08trackcmp\x03net\x00\x00\x01\x00\x01"
    flagged = struct.pack(">HHHHHH", 1, flags, 1, 0, 0, 0 if flags & 0x10 else 1) + question
    if not flags & 0x10:
        flagged += b"\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00"  # an empty OPT with DO
    checks.check_answer(p, flagged)  # sinkholed for the client without consent, and memoized
    junk = struct.pack(">HHHHHH", 2, 0x0100, 1, 0, 0, 0) + question + (b"\x01" if flags & 0x10 else b"\x02")
    checks.check_answer(p, junk)
    for client in checks.CLIENTS[:2]:
        reply = p.answer(junk, client, False)
        if isinstance(reply, bytes):
            assert dns.message.from_wire(reply).question[0].name.to_text() == "trackcmp.net."

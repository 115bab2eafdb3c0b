"""Imported lists at scale: load time, memory and lookup cost for generated lists.

    .venv/bin/python tests/bench/lists_scale.py [--sizes 10000,100000,1000000] [--format hosts]

For each size it writes a list (hosts, adblock or domains format) into a temporary directory, then
measures in a fresh child process, through the code dnsgate runs (ruleset.build_lists: read,
parse, index; the parsed list stays cached for later reloads, as in dnsgate):
  - load: seconds from opening the file to the index being ready (and a reload that finds the
    list unchanged: it hashes the file and reuses the index);
  - RSS: resident memory after the load minus before it (and the peak while loading);
  - lookup: ns per `Catalog.match` on a memo miss, for names of 2..6 labels, listed and not
    (the cost must not grow with the list, only with the labels), and on a memo hit;
  - handler: ns per `Pipeline.answer` for a cached query and a list-blocked query with the list
    loaded (tests/bench/handler_cost.py has the same loop without lists).
Targets: a million names load in <= 5 s and add <= 150 MB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dnsgate.rules.catalog import Catalog

TLDS = ["com", "net", "org", "io", "de", "co.uk", "info", "xyz"]
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def generate(path: Path, size: int, fmt: str, seed: int = 9) -> list[str]:
    """A list of `size` distinct tracker-like names (average about 20 characters)."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(ALPHABET[:26], k=rng.randint(4, 10))) for _ in range(5000)]
    names = []
    for i in range(size):
        prefix = "".join(rng.choices(ALPHABET, k=rng.randint(2, 6))) + _base36(i)
        middle = rng.choice(words) if rng.random() < 0.6 else f"{rng.choice(words)}.{rng.choice(words)}"
        names.append(f"{prefix}.{middle}.{rng.choice(TLDS)}")
    line = {"hosts": "0.0.0.0 {}", "adblock": "||{}^", "domains": "{}"}[fmt]
    header = {"hosts": "# generated\n127.0.0.1 localhost\n", "adblock": "[Adblock Plus 2.0]\n! generated\n",
              "domains": "# generated\n"}[fmt]
    path.write_text(header + "\n".join(line.format(n) for n in names) + "\n")
    return rng.sample(names, min(2000, size))


def _base36(i: int) -> str:
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = ALPHABET[r] + out
        if not i:
            return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    """The process's high-water resident memory (VmHWM)."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1e3


def measure(path: Path, fmt: str, sample: list[str]) -> dict[str, object]:
    """Runs in a fresh process, so memory numbers are this list's alone."""
    from dataclasses import replace

    from dnsgate.config import Config, ListsConfig, ListSource
    from dnsgate.rules.catalog import builtin_catalog_text, parse_catalog_text
    from dnsgate.rules.ruleset import ListCache, ListStatus, build_lists
    from dnsgate.wire import name_to_wire

    catalog = parse_catalog_text(builtin_catalog_text())
    src = ListSource(id="bench", category="analytics", file=str(path))
    cfg = replace(Config(), lists=ListsConfig(sources=(src,)))
    statuses = {src.id: ListStatus(src.id, src.id, src.kind, src.category, src.file)}
    cache = ListCache()  # kept, as dnsgate keeps it: parsed lists are reused by later reloads
    gc.collect()
    before = rss_mb()
    peak_before = peak_mb()
    started = time.perf_counter()
    index = build_lists(cfg, catalog, {src.id: path}, cache, statuses)
    assert index is not None
    gated = catalog.with_lists(index)
    load = time.perf_counter() - started
    entries, skipped = statuses[src.id].entries, statuses[src.id].skipped
    gc.collect()
    after = rss_mb()
    peak = peak_mb()
    started = time.perf_counter()
    assert build_lists(cfg, catalog, {src.id: path}, cache, statuses) is index  # a reload, list unchanged
    reload_unchanged = time.perf_counter() - started

    rng = random.Random(1)
    lookups: dict[str, float] = {}
    for labels in range(2, 7):
        unlisted = [name_to_wire(".".join(["".join(rng.choices(ALPHABET, k=8)) for _ in range(labels - 1)] + ["com"]))
                    for _ in sample]
        lookups[f"{labels} labels, not listed"] = _per_call(gated._lookup, unlisted)
    lookups["a listed name (3-4 labels)"] = _per_call(gated._lookup, [name_to_wire(n) for n in sample])
    lookups["2 labels under a listed name"] = _per_call(gated._lookup, [name_to_wire(f"a.b.{n}") for n in sample])
    hit_names = [name_to_wire(n) for n in sample]
    for n in hit_names:
        gated.match(n)
    lookups["memo hit"] = _per_call(gated.match, hit_names)
    lookups["no lists, 4 labels (catalog only)"] = _per_call(
        catalog._lookup, [name_to_wire(f"a.b.{n}") for n in sample])
    return {"format": fmt, "entries": entries, "skipped": skipped, "index_names": len(index),
            "load_s": round(load, 2), "reload_unchanged_s": round(reload_unchanged, 2),
            "rss_delta_mb": round(after - before, 1),
            "peak_delta_mb": round(peak - peak_before, 1), "lookup_ns": {k: round(v) for k, v in lookups.items()},
            "handler_ns": _handler(gated, sample[0])}


def _per_call(fn: object, names: list[bytes], rounds: int = 5) -> float:
    call = fn  # a bound method
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for n in names:
            call(n)  # type: ignore[operator]
        best = min(best, (time.perf_counter() - started) / len(names))
    return best * 1e9


def _handler(catalog: Catalog, listed: str) -> dict[str, int]:
    sys.path.insert(0, str(Path(__file__).parent))
    import dns.message
    from handler_cost import build, fill, per_call  # type: ignore[import-not-found]

    p = build()
    p.install(catalog, p.sinkhole, p.plain_ttl, p.gated_ttl)
    cached = fill(p, "host.example.test", "host.example.test. 3600 IN A 192.0.2.10")
    blocked = dns.message.make_query(listed, "A").to_wire()
    p.answer(blocked, "127.0.0.1", False)
    return {"cached": round(per_call(p, cached, 100_000, 5)), "list-blocked": round(per_call(p, blocked, 100_000, 5))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--format", default="hosts", choices=["hosts", "adblock", "domains"])
    parser.add_argument("--measure", nargs=2, metavar=("FILE", "SAMPLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.format, json.loads(Path(args.measure[1]).read_text()))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"list-{size}.txt"
            sample = generate(path, size, args.format)
            sample_file = Path(tmp) / "sample.json"
            sample_file.write_text(json.dumps(sample))
            out = subprocess.run([sys.executable, __file__, "--format", args.format, "--measure", str(path),
                                  str(sample_file)], check=True, capture_output=True, text=True).stdout
            result = json.loads(out)
            mb = path.stat().st_size / 1e6
            print(f"{size:>9,} names ({args.format}, {mb:.1f} MB file): load {result['load_s']} s, "
                  f"RSS +{result['rss_delta_mb']} MB (peak +{result['peak_delta_mb']} MB), "
                  f"{result['entries']:,} entries, {result['skipped']} skipped; "
                  f"a reload with the list unchanged {result['reload_unchanged_s']} s")
            for label, ns in result["lookup_ns"].items():
                print(f"    lookup {label:36s} {ns:6d} ns")
            print(f"    handler (Pipeline.answer)             cached {result['handler_ns']['cached']} ns, "
                  f"list-blocked {result['handler_ns']['list-blocked']} ns")


if __name__ == "__main__":
    main()

"""The consent store's fault-injection suite, run again and again: how many runs pass, and the
figures of the ones that did.

    .venv/bin/python -m tests.reliability.store_faults [--runs 10] [-k EXPRESSION]

Each run is one pytest session over tests/consent/test_redis_faults.py and
tests/consent/test_sqlite_faults.py (every fault: Redis SIGKILL, SIGSTOP, restarted empty, emptied
while no instance ran, restored from an older copy, an instance partitioned, an empty restart it
missed, a lost reply and a lost undo; SQLite disk full, read-only at start, damaged pages). Every
test that passes appends its ledger's figures to a file (tests/support/consent_ledger.py `record`);
this sums them per fault: runs passed, changes answered 200, 202 and 503 (during the fault, where
it has a during), the slowest answer, the DNS answers compared with the ledger (a stale one fails
the run), and how long the instances took to settle once the store was back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.support.consent_ledger import FIGURES

SUITES = ("tests/consent/test_redis_faults.py", "tests/consent/test_sqlite_faults.py")


def run(runs: int, select: str | None) -> tuple[int, list[str], list[dict[str, Any]]]:
    """(runs whose every test passed, the failures' summaries, every passed test's figures)."""
    passed = 0
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dnsgate-store-faults-") as tmp:
        figures = Path(tmp) / "figures.jsonl"
        for n in range(1, runs + 1):
            args = [sys.executable, "-m", "pytest", *SUITES, "-q", "-p", "no:cacheprovider", "-rf"]
            if select:
                args += ["-k", select]
            done = subprocess.run(args, env={**os.environ, FIGURES: str(figures)}, capture_output=True, text=True,
                                  timeout=1800)
            tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
            print(f"run {n}/{runs}: {tail}", flush=True)
            if done.returncode == 0:
                passed += 1
            else:
                lines = done.stdout.splitlines()
                failures += [line for line in lines if line.startswith("FAILED")]
                failures += [f"  {line[:400]}" for line in lines if line.startswith("E   ")][:8]
        lines = figures.read_text().splitlines() if figures.exists() else []
    return passed, failures, [json.loads(line) for line in lines]


def report(runs: int, passed: int, failures: list[str], figures: list[dict[str, Any]]) -> str:
    by_test: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in figures:
        by_test[f["test"]].append(f)
    out = [f"{passed} of {runs} runs passed every test"]
    for test, rows in sorted(by_test.items()):
        total = {k: sum(r[k] for r in rows) for k in ("changes", "200", "202", "503")}
        during = {k: sum(r["during"][k] for r in rows) for k in ("200", "202", "503")}
        slowest = max(r["slowest"] for r in rows)
        checked = sum(r.get("dns_checked", 0) for r in rows)
        recovered = [r["recovered"] for r in rows if "recovered" in r]
        settle = f"; settled {min(recovered):.2f}-{max(recovered):.2f} s after the store was back" if recovered else ""
        fault = (f" ({during['200']} x 200, {during['202']} x 202, {during['503']} x 503 during the fault)"
                 if any(during.values()) else "")
        lates = [r["late"] for r in rows if "late" in r]
        late = (f" ({max(lates):+.2f} s past the 2 s deadline once the thread's waits for a CPU are taken off)"
                if lates else "")
        out.append(f"{test}: passed {len(rows)} times; {total['changes']} changes{fault}; slowest answer "
                   f"{slowest:.2f} s{late}; {checked} DNS answers checked against the answers given, 0 stale{settle}")
    out += failures
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("-k", dest="select", help="only the tests pytest -k selects")
    args = parser.parse_args()
    passed, failures, figures = run(args.runs, args.select)
    print(report(args.runs, passed, failures, figures))
    sys.exit(0 if passed == args.runs else 1)


if __name__ == "__main__":
    main()

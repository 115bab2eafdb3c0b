"""A short coverage-guided fuzz run (atheris) as part of the suite; longer runs on demand (see
tests/fuzz/fuzz_dns.py). Any crash fails the test and leaves its input in the temporary dir."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parents[1] / "fuzz"
RUNS = 20_000


def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris has wheels for Linux x86_64 CPython only")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_dns", f"-runs={RUNS}", "-max_total_time=120",
         f"-artifact_prefix={tmp_path}/", str(corpus), str(FUZZ / "corpus")],
        capture_output=True, text=True, timeout=180, cwd=FUZZ.parent.parent, check=False)
    crashes = list(tmp_path.glob("crash-*")) + list(tmp_path.glob("timeout-*"))
    assert done.returncode == 0 and not crashes, done.stderr[-3000:]
    match = re.search(r"Done (\d+) runs", done.stderr)
    assert match and int(match[1]) >= RUNS // 2, done.stderr[-1000:]
    print(f"packets fuzzed: {match[1]}")

"""Coverage-guided fuzzing (atheris, libFuzzer) of the wire parser, Pipeline.answer and the admission
of upstream replies; tests/fuzz/checks.py says what must hold and how the first byte picks the target.

    .venv/bin/python -m tests.fuzz.fuzz_dns -max_total_time=600 /tmp/corpus tests/fuzz/corpus

libFuzzer writes the inputs that reach new code to the first directory (keep the repository's
corpus second, read-only; copy new inputs worth keeping into tests/fuzz/corpus) and a failing input
to ./crash-<sha1>: copy that to tests/fuzz/crashes/. tests/dns/test_fuzz_properties.py replays both
directories on every test run. A short run is
part of the test suite (tests/dns/test_fuzz_atheris.py).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["dnsgate"]):
    from tests.fuzz import checks

PIPELINE = checks.pipeline()
RUNS = [0]


def test_one_input(data: bytes) -> None:
    global PIPELINE
    RUNS[0] += 1
    if RUNS[0] % 5000 == 0:
        PIPELINE = checks.pipeline()  # a fresh cache and consent memo now and then
    checks.run_one(PIPELINE, data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

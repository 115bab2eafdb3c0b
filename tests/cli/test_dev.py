"""`./dev`, the checkout's one entry point: it passes every dnsgate command through (so the README's
`./dev consent list` works as typed), and says "unknown command" for anything else."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from dnsgate.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]


def dev(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / "dev"), *args], capture_output=True, text=True, timeout=120, check=False)


def test_dev_passes_through_exactly_dnsgates_commands() -> None:
    listed = re.search(r'^passthrough="([^"]*)"$', (ROOT / "dev").read_text(), re.M)
    assert listed is not None
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(listed[1].split()) == set(commands.choices) - {"serve"}


def test_a_passed_through_command_is_dnsgates() -> None:
    result = dev("consent", "list", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: dnsgate consent list"), result.stderr
    result = dev("report", "--since", "yesterday")
    assert result.returncode == 2 and "argument --since: expected ISO 8601" in result.stderr


def test_an_unknown_command_says_so() -> None:
    result = dev("frobnicate")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("dev: unknown command 'frobnicate'\n")
    assert "./dev serve" in result.stderr  # and what it knows
    result = dev()
    assert result.returncode == 0 and "./dev COMMAND [args]" in result.stdout

"""The manual stays true to the repository: every relative link and `#anchor` in README.md and
docs/*.md reaches a file and a heading, and every repository path, module (`python -m …`) and
Python file the pages name exists, so a module that moves shows up here instead of in a reader's
dead end. The README stays a front door (never over 300 lines), and its tour runs as written
against `dnsgate serve` started as `./dev serve` starts it."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import zone_for_tests
from tests.reliability.process import READY
from tests.support.stub_upstream import StubUpstream

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# A repository path: starts at a top-level folder of the project, not in the middle of another path.
REPO_PATH = re.compile(r"(?<![\w./<>-])((?:dnsgate|tests|config|docs)/[\w./*<>-]*)")
MODULE = re.compile(r"-m ((?:dnsgate|tests)(?:\.\w+)+)")
PY_FILE = re.compile(r"(?<![\w./<>-])(\w+\.py)\b")
# Produced by runs on the machine that measured them (git-ignored), named as evidence of a figure.
GENERATED = ("tests/bench/results/",)
# Pages linked before they land (none now: docs/architecture.md came with the move into subpackages).
PENDING: frozenset[str] = frozenset()


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, fenced code lines), each with its line number."""
    prose: list[tuple[int, str]] = []
    code: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced else prose).append((number, line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    prose, _ = split_fences(page.read_text())
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose:
        match = re.match(r"^#{1,6} +(.*?) *#*$", line)
        if not match:
            continue
        base = slug(match[1])
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative(page: Path, root: Path = ROOT) -> str:
    return str(page.relative_to(root))


def links(page: Path) -> Iterator[tuple[int, str]]:
    prose, _ = split_fences(page.read_text())
    for number, line in prose:
        for match in LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            yield number, match[1]


def link_error(page: Path, target: str, root: Path = ROOT) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return None  # http:, https:, mailto: — outside the repository
    path, _, anchor = target.partition("#")
    destination = (page.parent / path).resolve() if path else page
    if root not in destination.parents and destination != root:
        return f"{target}: leaves the repository"
    if not destination.exists():
        pending = destination.relative_to(root).as_posix() in PENDING
        return None if pending and root == ROOT else f"{target}: no such file"
    if anchor:
        if destination.suffix != ".md":
            return f"{target}: an anchor into a file that is not a page"
        if anchor not in anchors(destination):
            return f"{target}: no heading #{anchor} in {relative(destination, root)}"
    return None


def code_spans(page: Path) -> Iterator[tuple[int, str]]:
    """Inline code in prose, and whole lines of fenced code (commands, the source tree)."""
    prose, code = split_fences(page.read_text())
    for number, line in prose:
        for span in re.findall(r"`([^`]+)`", line):
            yield number, span
        for match in LINK.finditer(line):
            yield number, match[1]
    yield from code


def repo_path_error(token: str, root: Path = ROOT) -> str | None:
    token = token.rstrip(".,;:")
    if token.startswith(GENERATED):
        return None
    parts = token.split("/")
    if any("<" in part for part in parts):  # `dnsgate/data/portal/lang/<lang>.json`: the folder
        parts = parts[: next(i for i, part in enumerate(parts) if "<" in part)]
    path = "/".join(parts)
    if path in PENDING and root == ROOT:
        return None
    if any(ch in path for ch in "*?["):
        return None if any(root.glob(path)) else f"{token}: matches no file"
    return None if (root / path).exists() else f"{token}: no such file"


def python_files(root: Path = ROOT) -> set[str]:
    return {p.name for folder in ("dnsgate", "tests") for p in (root / folder).rglob("*.py")}


def stale_names(page: Path, root: Path = ROOT) -> list[str]:
    known = python_files(root)
    errors: list[str] = []
    for number, text in code_spans(page):
        where = f"{relative(page, root)}:{number}"
        for match in REPO_PATH.finditer(text):
            if (error := repo_path_error(match[1], root)) is not None:
                errors.append(f"{where}: {error}")
        for match in MODULE.finditer(text):
            module = root / match[1].replace(".", "/")
            if not (module.with_suffix(".py").exists() or (module / "__init__.py").exists()):
                errors.append(f"{where}: -m {match[1]}: no such module")
        for match in PY_FILE.finditer(text):
            if match[1] not in known:
                errors.append(f"{where}: {match[1]}: no such Python file in dnsgate/ or tests/")
    return errors


@pytest.mark.parametrize("page", pages(), ids=relative)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    errors = [f"{relative(page)}:{number}: {error}" for number, target in links(page)
              if (error := link_error(page, target)) is not None]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("page", pages(), ids=relative)
def test_every_repository_path_module_and_python_file_named_exists(page: Path) -> None:
    errors = stale_names(page)
    assert not errors, "\n".join(errors)


def test_the_readme_is_a_front_door_and_every_page_is_linked_from_it() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    linked = {(readme.parent / target.partition("#")[0]).resolve() for _, target in links(readme)}
    unlinked = [relative(page) for page in pages()[1:] if page.resolve() not in linked]
    assert not unlinked, f"pages the README does not link: {unlinked}"


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    # The checker against a small repository broken on purpose: each kind of stale reference is reported.
    (tmp_path / "dnsgate").mkdir()
    (tmp_path / "dnsgate" / "wire.py").write_text("")
    (tmp_path / "README.md").write_text("# Read me\n")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Title\n\n[a](#title) [b](#no-such-heading) [c](no-such-file.md) [d](../README.md#nope)\n"
                    "[e](../README.md#read-me) [f](https://example.com/#x)\n"
                    "`dnsgate/no_such_module.py` `tests/bench/results/x` `-m dnsgate.wire` `-m tests.no_such`\n"
                    "`gone_module.py` `wire.py`\n"
                    "```\n# not a heading\ndnsgate/wire.py  dnsgate/also_gone.py\n```\n")
    errors = [error for _, target in links(page) if (error := link_error(page, target, tmp_path)) is not None]
    assert errors == ["#no-such-heading: no heading #no-such-heading in docs/page.md",
                      "no-such-file.md: no such file",
                      "../README.md#nope: no heading #nope in README.md"]
    assert stale_names(page, tmp_path) == [
        "docs/page.md:5: dnsgate/no_such_module.py: no such file",
        "docs/page.md:5: -m tests.no_such: no such module",
        "docs/page.md:6: gone_module.py: no such Python file in dnsgate/ or tests/",
        "docs/page.md:9: dnsgate/also_gone.py: no such file",
    ]
    assert anchors(page) == {"title"}


# A row of docs/architecture.md's step tables: | step | `dnsgate.module` | `Name` or `Name.method` |
STEP_ROW = re.compile(r"^\| *[^|`]+? *\| *`(dnsgate(?:\.\w+)*)` *\| *`(\w+(?:\.\w+)*)` *\|$")
STEP_TABLES = ("A query, step by step", "A consent change, step by step")


def architecture_errors(page: Path) -> tuple[dict[str, int], list[str]]:
    """(rows read per step table, what they name that does not exist): each module is imported and
    each name looked up in it."""
    rows: dict[str, int] = {}
    errors: list[str] = []
    section = ""
    for number, line in split_fences(page.read_text())[0]:
        if line.startswith("## "):
            section = line[3:].strip()
            continue
        match = STEP_ROW.match(line)
        if section not in STEP_TABLES or match is None:
            continue
        rows[section] = rows.get(section, 0) + 1
        module, name = match[1], match[2]
        try:
            found: object = importlib.import_module(module)
        except ImportError:
            errors.append(f"{page.name}:{number}: no module {module}")
            continue
        for part in name.split("."):
            found = getattr(found, part, None)
            if found is None:
                errors.append(f"{page.name}:{number}: {module} has no {name}")
                break
    return rows, errors


def test_the_architecture_names_a_module_that_exists_for_every_step() -> None:
    rows, errors = architecture_errors(ROOT / "docs" / "architecture.md")
    assert not errors, "\n".join(errors)
    # both tables were read, row by row (a table the pattern no longer matches would check nothing)
    assert rows.keys() == set(STEP_TABLES) and min(rows.values()) >= 10, rows


def test_the_architecture_check_catches_a_module_or_name_that_is_gone(tmp_path: Path) -> None:
    page = tmp_path / "architecture.md"
    page.write_text("## A query, step by step\n\n| step | module | where |\n|---|---|---|\n"
                    "| parse | `dnsgate.wire` | `parse_query` |\n| gone | `dnsgate.no_such_module` | `X` |\n"
                    "| renamed | `dnsgate.dns.pipeline` | `Pipeline.no_such_method` |\n\n"
                    "## A consent change, step by step\n\n| store | `dnsgate.consent.model` | `NoSuchTable` |\n")
    rows, errors = architecture_errors(page)
    assert rows == {STEP_TABLES[0]: 3, STEP_TABLES[1]: 1}
    assert errors == ["architecture.md:6: no module dnsgate.no_such_module",
                      "architecture.md:7: dnsgate.dns.pipeline has no Pipeline.no_such_method",
                      "architecture.md:11: dnsgate.consent.model has no NoSuchTable"]


def tour() -> list[tuple[str, list[str]]]:
    """The README tour's commands (`$ …` lines of its shell blocks), each with the output shown."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## A tour\n", 1)[1].split("\n## ", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
    return steps


def shown(expected: str) -> re.Pattern[str]:
    """A line of output as the README shows it: `…` stands for what differs run to run (times, the
    rest of a long line), `id: 4242` for any query ID, runs of blanks for any blanks."""
    parts = [".*" if "…" in part else r"\s+" if part.isspace() else re.escape(part)
             for part in re.split(r"(\s*…\s*|\s+)", expected.strip()) if part]
    return re.compile(re.sub(r"id:\\s\+\d+", r"id:\\s+\\d+", "".join(parts)))


def matches(output: str, expected: list[str]) -> bool:
    lines = [line for line in expected if line.strip() not in ("", "…")]
    if not lines:
        return output.strip() == ""
    if len(lines) == 1 and re.fullmatch(r"\(.*\)", lines[0].strip()):  # a placeholder: "(real addresses)"
        return output.strip() != ""
    remaining = output.splitlines()
    for line in lines:  # in the order shown
        pattern = shown(line)
        while remaining and not pattern.search(remaining[0]):
            remaining.pop(0)
        if not remaining:
            return False
        remaining.pop(0)
    return True


def test_the_tour_parser_and_matcher() -> None:
    steps = tour()
    assert [command.split()[0] for command, _ in steps][:2] == ["dig", "./dev"]
    assert any("-X DELETE" in command for command, _ in steps)
    assert matches(";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 17\n",
                   [";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 4242"])
    assert not matches(";; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 17\n",
                       [";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 4242"])
    assert matches('{"a": 1, "allowed": true, "b": 2}', ['{"a": 1, … "allowed": true, …'])
    assert not matches('{"a": 1, "allowed": false}', ['{"a": 1, … "allowed": true, …'])
    assert not matches("x\n", []) and matches("", [])
    assert not matches("", ["(real addresses)"]) and matches("198.51.100.1\n", ["(real addresses)"])
    assert not matches("b\na\n", ["a", "b"])  # in the order shown


@pytest.mark.skipif(shutil.which("dig") is None or shutil.which("curl") is None,
                    reason="dig or curl not installed (apt install bind9-dnsutils curl)")
async def test_the_readme_tour_works_as_written(tmp_path: Path) -> None:
    stub = await zone_for_tests(StubUpstream()).start()  # an upstream that knows trackcmp.net
    env = {k: v for k, v in os.environ.items() if not k.startswith("DNSGATE_")}
    # As `./dev serve` runs it: no configuration, data in ./data, only the upstream named.
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dnsgate", "serve", "--dns", "127.0.0.1:0", "--api", "127.0.0.1:0",
        "--upstream", stub.address, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert server.stdout is not None
        ready = (await asyncio.wait_for(server.stdout.readline(), 20)).decode()
        started = READY.match(ready)
        assert started, ready
        dns_port, api_port = started[1], started[2]
        scripts = Path(sys.executable).parent
        commands_env = env | {"DNSGATE_API": f"127.0.0.1:{api_port}"}  # the CLI's way to the API
        for command, expected in tour():
            assert "-p 5353" in command or "127.0.0.1:8053" in command or command.startswith("./dev "), \
                f"the tour talks to ./dev serve's default addresses: {command}"
            # `./dev COMMAND` is the checkout's dnsgate run in the checkout, as the server here runs in tmp_path
            local = (command.replace("-p 5353", f"-p {dns_port}").replace("127.0.0.1:8053", f"127.0.0.1:{api_port}")
                     .replace("./dev ", f"{scripts}/dnsgate "))
            changes = re.search(r"-X (PUT|DELETE|POST)", command) is not None
            deadline = time.monotonic() + 5  # the query log is written every second: a report may wait
            while True:
                run = await asyncio.create_subprocess_exec(
                    "bash", "-c", local, cwd=tmp_path, env=commands_env, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL)
                out = (await asyncio.wait_for(run.communicate(), 20))[0].decode()
                if matches(out, expected) or changes or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert matches(out, expected), f"$ {command}\n{out}\n--- the README shows ---\n" + "\n".join(expected)
    finally:
        if server.returncode is None:
            server.terminate()
        await asyncio.wait_for(server.wait(), 20)
        await stub.stop()

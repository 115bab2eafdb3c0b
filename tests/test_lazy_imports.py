"""`defer`: a module a library imports at start runs its code only when something reads it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dnsgate.lazy_imports import defer


@pytest.fixture
def package(tmp_path: Path) -> Iterator[Path]:
    """A package `lazypkg` whose submodule `parts` records in a file each time its code runs."""
    root = tmp_path / "lazypkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    ran = tmp_path / "ran"
    (root / "parts.py").write_text(f"with open({str(ran)!r}, 'a') as f:\n    f.write('x')\nVALUE = 42\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield ran
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("lazypkg", "lazypkg.parts"):
            sys.modules.pop(name, None)


def test_a_deferred_module_runs_on_first_use_and_once(package: Path) -> None:
    defer("lazypkg.parts")
    import lazypkg  # type: ignore[import-not-found]

    # what a library's own import does: it must not load it yet
    from lazypkg import parts

    assert not package.exists()
    assert lazypkg.parts is parts
    assert parts.VALUE == 42  # the first read loads it
    assert package.read_text() == "x"
    import lazypkg.parts as again  # type: ignore[import-not-found]

    assert again.VALUE == 42
    assert package.read_text() == "x"


def test_an_imported_or_missing_module_is_left_alone(package: Path) -> None:
    import lazypkg.parts

    assert package.read_text() == "x"
    defer("lazypkg.parts")
    assert sys.modules["lazypkg.parts"] is lazypkg.parts
    defer("lazypkg.absent")
    assert "lazypkg.absent" not in sys.modules

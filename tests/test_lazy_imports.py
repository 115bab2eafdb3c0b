"""`defer`: a module a library imports at start runs its code only when something reads it."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dnsgate.lazy_imports import defer, defer_init


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


@pytest.fixture
def big_package(tmp_path: Path) -> Iterator[Path]:
    """A package `bigpkg` whose __init__ records each run and imports its `client` too; `server`
    imports the package's version, as aiohttp's http module does."""
    root = tmp_path / "bigpkg"
    root.mkdir()
    ran = tmp_path / "ran"
    (root / "__init__.py").write_text(f"__version__ = '1.2.3'\nwith open({str(ran)!r}, 'a') as f:\n    f.write('i')\n"
                                      "from .client import Session\n")
    (root / "client.py").write_text("class Session:\n    pass\n")
    (root / "server.py").write_text("from . import __version__\nBANNER = 'bigpkg/' + __version__\n")
    (tmp_path / "plainpkg").mkdir()
    (tmp_path / "plainpkg" / "__init__.py").write_text("from . import part\n")
    (tmp_path / "plainpkg" / "part.py").write_text("")
    sys.path.insert(0, str(tmp_path))
    try:
        yield ran
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("bigpkg", "bigpkg.client", "bigpkg.server", "plainpkg", "plainpkg.part"):
            sys.modules.pop(name, None)


def test_a_package_s_submodules_import_without_its_init_until_a_name_of_it_is_read(big_package: Path) -> None:
    defer_init("bigpkg")
    from bigpkg import server  # type: ignore[import-not-found]

    assert server.BANNER == "bigpkg/1.2.3"
    assert not big_package.exists()
    assert "bigpkg.client" not in sys.modules
    import bigpkg

    assert bigpkg.Session.__module__ == "bigpkg.client"  # read: __init__ runs, in the same module
    assert big_package.read_text() == "i"
    assert bigpkg.server is server
    assert bigpkg.Session is sys.modules["bigpkg.client"].Session
    assert bigpkg.__version__ == "1.2.3"
    assert big_package.read_text() == "i"


def test_a_package_without_a_stated_version_is_imported_as_usual(big_package: Path) -> None:
    defer_init("plainpkg")
    assert "plainpkg" not in sys.modules
    defer_init("nosuchpkg")
    assert "nosuchpkg" not in sys.modules

"""The package layers hold: nothing imports upward, no module imports itself round about, and every
module of dnsgate/ is in a layer (a new one cannot slip past the rule). The layers are stated once, in
pyproject.toml's [tool.importlinter]; import-linter checks them on the real import graph."""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

ROOT = Path(__file__).resolve().parent.parent


def layer_modules() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return {name.strip() for layer in layers for name in layer.split(":")}


def test_the_layer_contracts_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    # (the use case, not the command line, which reconfigures logging and so silences dnsgate's loggers
    # for every later test)
    configuration.configure()
    kept = lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    assert kept, capsys.readouterr().out


def test_every_module_is_in_a_layer() -> None:
    listed = layer_modules()
    top = {f"dnsgate.{p.stem}" for p in (ROOT / "dnsgate").glob("*.py")}
    top |= {f"dnsgate.{p.parent.name}" for p in (ROOT / "dnsgate").glob("*/__init__.py")}
    rules = {f"dnsgate.rules.{p.stem}" for p in (ROOT / "dnsgate" / "rules").glob("*.py")} - {"dnsgate.rules.__init__"}
    # dnsgate.rules spans two layers, so its modules are named one by one; __init__ and __main__ are no layer
    expected = (top - {"dnsgate.__init__", "dnsgate.__main__", "dnsgate.rules"}) | rules
    assert sorted(expected - listed) == [], "modules in no layer of [tool.importlinter]"
    assert sorted(listed - expected) == [], "layers naming modules that do not exist"


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("dnsgate")
    cycles = sorted((module, imported) for module in graph.modules
                    for imported in graph.find_modules_directly_imported_by(module)
                    if graph.chain_exists(importer=imported, imported=module))
    assert cycles == []

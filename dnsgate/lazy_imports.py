"""Modules that a library imports at start but dnsgate never (or rarely) calls: loaded on first use.

Every serving process holds what it imported for as long as it runs (code objects, tables), so a
module kept only for a library's command line or a recipe dnsgate does not use costs memory in
every dnsgate for nothing. `defer` puts such a module in `sys.modules` as a placeholder whose code
runs at the first attribute read (importlib's LazyLoader): the library's `import` succeeds, and a
caller that does use it gets the real module, loaded then.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from typing import Any, Final

VERSION_LINE: Final = re.compile(r"""^__version__ = ["']([^"']+)["']$""", re.MULTILINE)


def defer(name: str) -> None:
    """Load the module `name` on first use; nothing if it is already imported or not installed."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    parent, _, child = name.rpartition(".")
    if parent:
        # as an import binds a submodule on its package (find_spec imported the package): so that
        # `from package import child` finds it there and does not look the placeholder up again,
        # which would read its attributes and load it
        setattr(sys.modules[parent], child, module)


class _UninitialisedPackage(types.ModuleType):
    """A package whose `__init__` has not run: its submodules import as usual; reading any other
    name runs `__init__` (in this module object) and answers from it."""

    def __getattr__(self, name: str) -> Any:
        if importlib.util.find_spec(f"{self.__name__}.{name}") is not None:
            raise AttributeError(name)  # a submodule: the import system loads it and binds it here
        spec = self.__spec__
        assert spec is not None
        assert spec.loader is not None
        self.__class__ = types.ModuleType  # type: ignore[assignment]  # from now on a plain module
        spec.loader.exec_module(self)
        return getattr(self, name)


def defer_init(name: str) -> None:
    """Let the submodules of the package `name` be imported without its `__init__`, which then runs
    when a caller reads a name it defines (e.g. `aiohttp.ClientSession`): for a package whose
    `__init__` imports a whole side that a process may not use (aiohttp's client, beside the server).
    Its `__version__` is set from the `__init__`'s source, for submodules that import it from the
    package. Nothing if it is already imported, not installed, or states no version that way."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None or spec.origin is None:
        return
    try:
        with open(spec.origin, encoding="utf-8") as f:
            found = VERSION_LINE.search(f.read())
    except OSError:
        return
    if found is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _UninitialisedPackage
    module.__version__ = found[1]  # type: ignore[attr-defined]
    sys.modules[name] = module

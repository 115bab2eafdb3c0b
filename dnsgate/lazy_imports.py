"""Modules that a library imports at start but dnsgate never (or rarely) calls: loaded on first use.

Every serving process holds what it imported for as long as it runs (code objects, tables), so a
module kept only for a library's command line or a recipe dnsgate does not use costs memory in
every dnsgate for nothing. `defer` puts such a module in `sys.modules` as a placeholder whose code
runs at the first attribute read (importlib's LazyLoader): the library's `import` succeeds, and a
caller that does use it gets the real module, loaded then.
"""

from __future__ import annotations

import importlib.util
import sys


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

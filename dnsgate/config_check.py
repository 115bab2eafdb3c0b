"""What `dnsgate config check|schema|env` print, derived from the definitions in config.py: the
sections' dataclasses, their annotations, defaults and the comments above each field. Nothing here is
written twice: a key added to config.py appears in the schema, the environment table and the
effective configuration by itself.

Why not a validation library: msgspec (0.23) converts these dataclasses but ignores unknown keys
(its forbid_unknown_fields is for its own Struct), reads TOML tables such as `upstream.domains` only
as the dataclass's tuple of pairs, and words its errors "Expected `int`, got `str` - at
`$.dns.udp_max_size`"; keeping the errors dnsgate documents meant rewriting every section as a Struct
and translating its errors, for a schema and an environment mapping that these few functions give.
Its start cost is not the reason (importing it beside dnsgate.config measured 1 to 16 ms); the fit is.
"""

from __future__ import annotations

import inspect
import json
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Final

from dnsgate.config import (
    _SECTIONS,
    ENV_PREFIX,
    ENV_SHORTHANDS,
    PROFILE_NAMES,
    Config,
    ConfigError,
    ListSource,
    Overrides,
    env_variable,
    load_config,
    overrides_from_env,
)

SCHEMA_ID: Final = "https://dnsgate.invalid/schema/dnsgate.toml.json"
FIELD: Final = re.compile(r"^\s+(\w+): ")
TABLE_START: Final = "<!-- dnsgate config env: generated, do not edit (tests/test_config_check.py checks it) -->"
TABLE_END: Final = "<!-- end of dnsgate config env -->"


def field_comments(cls: type[Any]) -> dict[str, str]:
    """The comment lines above each field of a section's dataclass, as one sentence; a field right
    below another without its own comment shares that one (`rate_limit`, `rate_limit_slip`)."""
    comments: dict[str, str] = {}
    pending: list[str] = []
    last = ""
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = FIELD.match(line)
        if match:
            if pending:
                last = " ".join(pending)
            comments[match[1]] = last
        else:
            last = ""
        pending = []
    return comments


def keys() -> Iterator[tuple[str, str, str, Any]]:
    """(section, key, annotation, default) of every key, in the order of config.py."""
    for section, cls in _SECTIONS.items():
        instance = cls()
        for f in fields(cls):
            yield section, f.name, str(f.type), getattr(instance, f.name)


def toml_value(value: Any, annotation: str) -> Any:
    """A key's value as the file writes it (tables for the tuples of pairs, lists for tuples)."""
    if annotation in ("tuple[tuple[str, str], ...]", "tuple[tuple[str, tuple[str, ...]], ...]"):
        return {name: list(v) if isinstance(v, tuple) else v for name, v in value}
    if annotation == "tuple[ListSource, ...]":
        return [{f.name: getattr(source, f.name) for f in fields(ListSource)} for source in value]
    if isinstance(value, tuple):
        return list(value)
    return value


def _type_schema(annotation: str) -> dict[str, Any]:
    strings = {"type": ["array", "string"], "items": {"type": "string"}}  # a string is a list of one
    simple: dict[str, dict[str, Any]] = {
              "bool": {"type": "boolean"}, "int": {"type": "integer"}, "float": {"type": "number"},
              "str": {"type": "string"}, "tuple[str, ...]": strings,
              "tuple[tuple[str, str], ...]": {"type": "object", "additionalProperties": {"enum": list(PROFILE_NAMES)}},
              "tuple[tuple[str, tuple[str, ...]], ...]": {"type": "object", "additionalProperties": strings}}
    if annotation in simple:
        return dict(simple[annotation])
    if annotation.startswith("Literal["):
        return {"enum": [a.strip().strip("\"'") for a in annotation[8:-1].split(",")]}
    if annotation == "tuple[ListSource, ...]":
        return {"type": "array", "items": _table_schema(ListSource, None)}
    raise AssertionError(f"no schema for {annotation}")  # pragma: no cover - a new kind of key needs one


def _table_schema(cls: type[Any], section: str | None) -> dict[str, Any]:
    comments = field_comments(cls)
    properties: dict[str, Any] = {}
    for f in fields(cls):
        annotation = str(f.type)
        prop = _type_schema(annotation)
        if comments.get(f.name):
            prop["description"] = comments[f.name]
        if section is not None:
            prop["description"] = (prop.get("description", "") + f" (env {env_variable(section, f.name)})").strip()
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        if default is not MISSING:
            prop["default"] = toml_value(default, annotation)
        properties[f.name] = prop
    return {"type": "object", "additionalProperties": False, "properties": properties}


def schema() -> dict[str, Any]:
    """A JSON Schema (2020-12) of the configuration file, for editors (Taplo, Even Better TOML).
    It knows each key's type, choices, default and meaning; the ranges and formats that only
    `dnsgate config check` knows (ports, networks, 1..395 days) are in the descriptions."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID,
            "title": "dnsgate configuration", "type": "object", "additionalProperties": False,
            "properties": {section: _table_schema(cls, section) for section, cls in _SECTIONS.items()}}


def _kind(annotation: str) -> str:
    if annotation == "tuple[str, ...]":
        return "list: comma-separated or JSON"
    if annotation.startswith("tuple["):
        return "JSON " + ("array of tables" if "ListSource" in annotation else "table")
    if annotation.startswith("Literal["):
        return " \\| ".join(a.strip().strip("\"'") for a in annotation[8:-1].split(","))
    return {"bool": "true \\| false", "int": "integer", "float": "number", "str": "string"}[annotation]


def env_table() -> str:
    """The Markdown table of every key's variable (docs/configuration.md holds it, generated)."""
    shorthand = {key: name for name, key in ENV_SHORTHANDS.items()}
    rows = ["| key | environment | value | default |", "|---|---|---|---|"]
    for section, key, annotation, default in keys():
        variable = env_variable(section, key)
        also = shorthand.get(f"{section}.{key}")
        names = f"`{variable}`" + (f" (or `{also}`)" if also and also != variable else "")
        shown = json.dumps(toml_value(default, annotation)).replace("|", "\\|")
        rows.append(f"| `{section}.{key}` | {names} | {_kind(annotation)} | `{shown}` |")
    return "\n".join(rows) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    raise AssertionError(f"no TOML for {value!r}")  # pragma: no cover


def effective_toml(cfg: Config, sources: Mapping[str, str], file: str) -> str:
    """The configuration in force, every key, as a file dnsgate reads back to the same; a key not at
    its default says where its value comes from."""
    lines: list[str] = []
    defaults = Config()
    for section in _SECTIONS:
        lines.append(f"[{section}]" if not lines else f"\n[{section}]")
        current, default = getattr(cfg, section), getattr(defaults, section)
        sources_later: list[str] = []
        for f in fields(current):
            annotation = str(f.type)
            value = getattr(current, f.name)
            if annotation == "tuple[ListSource, ...]":
                for source in value:
                    table = toml_value((source,), annotation)[0]
                    sources_later.append(f"\n[[{section}.{f.name}]]\n" + "\n".join(
                        f"{k} = {_toml(v)}" for k, v in table.items()))
                if not value:
                    lines.append(f"{f.name} = []")
                continue
            note = ""
            if value != getattr(default, f.name):
                note = f"  # {sources.get(f'{section}.{f.name}', file)}"
            lines.append(f"{f.name} = {_toml(toml_value(value, annotation))}{note}")
        lines.extend(sources_later)
    return "\n".join(lines) + "\n"


def env_sources(env: Mapping[str, str]) -> dict[str, str]:
    """key -> the DNSGATE_* variable that sets it."""
    found: dict[str, str] = {}
    for section, key, _, _ in keys():
        variable = env_variable(section, key)
        if env.get(variable, "").strip():
            found[f"{section}.{key}"] = variable
    for short, key in ENV_SHORTHANDS.items():
        if env.get(short, "").strip():
            found[key] = short
    return found


def locate(text: str, key: str) -> int | None:
    """The line of `key` in a TOML text where it can be found: `dns.udp_max_size` under [dns],
    `lists.sources[1].url` in the second [[lists.sources]], else the line of the section's header."""
    match = re.match(r"(\w+)(?:\.(\w+))?(?:\[(\d+)\])?(?:\.(\w+))?", key)
    if not match:
        return None
    section, name, index, sub = match[1], match[2], match[3], match[4]
    array = f"{section}.{name}" if index is not None else None
    table, count, header = "", -1, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.split("#", 1)[0].strip()
        opened = re.fullmatch(r"(\[\[?)\s*([\w.]+)\s*\]\]?", stripped)
        if opened:
            table = opened[2]
            count += table == array
            if header is None and (table == section or (table == array and count == int(index or 0))):
                header = number
            continue
        assigned = re.match(r"([\w-]+)\s*=", stripped)
        if not assigned:
            continue
        if array is not None and table == array and count == int(index or 0) and assigned[1] == sub:
            return number
        if table == section and assigned[1] == name:
            return number
    return header


# The flags of `dnsgate serve` and the keys they set (Overrides' fields).
FLAG_KEYS: Final = {"dns": ("--dns", "dns.listen"), "api": ("--api", "api.listen"),
                    "upstream": ("--upstream", "upstream.servers"), "data_dir": ("--data-dir", "storage.data_dir"),
                    "store": ("--store", "storage.store"), "log_level": ("--log-level", "log.level"),
                    "log_format": ("--log-format", "log.format"), "workers": ("--workers", "dns.workers")}


def where(error: ConfigError, path: str | None, env: Mapping[str, str], flags: Overrides | None = None) -> str:
    """The error as one line that says where the bad value was set: the flag, the DNSGATE_* variable,
    or the file and the line where the key is (when it can be found)."""
    message = str(error)
    key = re.split(r"[: ]", message, maxsplit=1)[0]
    bare = re.sub(r"\[\d+\].*", "", key)
    if error.in_file:
        pass  # the file's own value, wrong even where a variable or flag overrides it
    elif bare in {k for name, (_, k) in FLAG_KEYS.items() if flags is not None and getattr(flags, name)}:
        return message  # set on the command line just typed: the key names it (and the file is not to blame)
    elif (set_by := env_sources(env).get(bare)) is not None:
        return message if message.startswith(set_by) else f"{set_by}: {message}"
    if path is None or key.startswith(ENV_PREFIX) or key in ("--config", path):
        return message  # it names its variable, or the file and line itself
    try:
        line = locate(Path(path).read_text(encoding="utf-8"), key)
    except OSError:
        line = None
    return f"{path}{f':{line}' if line else ''}: {message}"


def check(path: str | None, env: Mapping[str, str]) -> tuple[int, str]:
    """`dnsgate config check`: (exit status, what to print). 0 and the effective configuration, or 2
    and a line for each error naming the file, the line where it can be found, and the key."""
    env_path, overrides = overrides_from_env(env)
    path = path or env_path
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        lines = [f"environment: {e}" if str(e).startswith(ENV_PREFIX) else where(e, path, env) for e in exc.errors]
        if path is not None:  # in the file's order, as the operator reads it; those without a line last
            at = re.compile(re.escape(path) + r":(\d+): ")
            lines.sort(key=lambda line: int(m[1]) if (m := at.match(line)) else 1 << 30)
        return 2, "\n".join(f"dnsgate: error: {line}" for line in lines)
    shown = "no file" if path is None else path
    head = (f"# dnsgate config check: valid. The configuration in force ({shown}, DNSGATE_* variables, defaults);\n"
            "# a key not at its default says where its value comes from.\n")
    return 0, head + effective_toml(cfg, env_sources(env), path or "the file")


def parse_back(text: str) -> Config:
    """What dnsgate reads from `effective_toml`'s output (the tests check it is the same)."""
    from dnsgate.config import parse_config

    return parse_config(tomllib.loads(text))

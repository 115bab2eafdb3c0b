"""The consent notice: the text a person is shown before choosing, its version and its SHA-256.

Proof of consent (GDPR Art. 7(1)) needs to show what the person saw; each choice records the
catalog version, this notice's version and the hash of the text in the language shown. Pure:
parsing takes text, never files.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources

from .consent import CurrentNotice


class NoticeError(ValueError):
    """The notice file is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class Notice:
    version: str
    default_language: str
    texts: Mapping[str, str]  # language -> text
    hashes: Mapping[str, str] = field(init=False)  # language -> SHA-256 of the text, hashed once

    def __post_init__(self) -> None:
        object.__setattr__(self, "hashes", {lang: sha256_text(text) for lang, text in self.texts.items()})

    def current(self, catalog_version: str) -> CurrentNotice:
        return CurrentNotice(catalog_version, self.version, self.hashes)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_notice_text(text: str, source: str = "notice") -> Notice:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise NoticeError(f"{source}: not valid TOML: {exc}") from None
    version = data.get("version")
    if not isinstance(version, str) or not version:
        raise NoticeError(f"{source}: version: expected a non-empty string")
    texts = data.get("text")
    if not isinstance(texts, dict) or not texts or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in texts.items()):
        raise NoticeError(f"{source}: text: expected a table of language = \"text\" entries")
    default = data.get("default_language", next(iter(texts)))
    if default not in texts:
        raise NoticeError(f"{source}: default_language: {default!r} has no entry in [text]")
    unknown = set(data) - {"version", "default_language", "text"}
    if unknown:
        raise NoticeError(f"{source}: {sorted(unknown)[0]}: unknown key")
    return Notice(version, default, dict(texts))


def builtin_notice_text() -> str:
    return resources.files("dnsgate").joinpath("data/notice.toml").read_text(encoding="utf-8")

"""Where imported lists come from: local files, or http(s) URLs kept on disk in <data_dir>/lists.

A URL list is downloaded with a conditional request (If-None-Match / If-Modified-Since from the
last download) into a temporary file next to its copy; only once the new copy has been parsed and
found usable does `commit` move it into place, so a bad download (a captive portal's HTML page, an
empty file) never replaces a good list. Lists are always read from disk, so a restart without
network still gates. Every list gets a `stamp` (size and content hash: hashing 30 MB takes a few
tens of milliseconds, parsing it a second) so an unchanged list is not parsed again on reload.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Self

if TYPE_CHECKING:  # imported where a list is fetched: a worker process (app/worker.py) never fetches
    import aiohttp

from dnsgate.config import ListSource

log = logging.getLogger(__name__)

CHUNK: Final = 1 << 20
Stamp = tuple[int, str]  # (size, SHA-1 of the content)


class ListError(Exception):
    """A list cannot be read or fetched; the message names the list (lists.sources[...])."""


@dataclass(frozen=True, slots=True)
class Meta:
    """What we know of a URL list's copy on disk (<id>.json next to <id>.list)."""

    url: str
    etag: str = ""
    last_modified: str = ""
    fetched_at: float = 0.0  # last download that brought new content
    checked_at: float = 0.0  # last successful check (200 or 304)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A download: `path` holds new content (not yet committed), or None when unchanged (304)."""

    source: ListSource
    path: Path | None
    meta: Meta


def read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def stamp_of(path: Path) -> Stamp:
    digest = hashlib.sha1(usedforsecurity=False)
    size = 0
    for chunk in read_chunks(path):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


class ListStore:
    """Copies of URL lists and their metadata in one directory; the HTTP client that fetches them."""

    def __init__(self, directory: Path, wall: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.wall = wall
        self._session: aiohttp.ClientSession | None = None

    def copy_path(self, src: ListSource) -> Path:
        return self.directory / f"{src.id}.list"

    def _meta_path(self, src: ListSource) -> Path:
        return self.directory / f"{src.id}.json"

    def meta(self, src: ListSource) -> Meta | None:
        """The metadata of the disk copy of `src`, if that copy came from `src.url`."""
        try:
            data = json.loads(self._meta_path(src).read_text(encoding="utf-8"))
            meta = Meta(**data)
        except (OSError, ValueError, TypeError):
            return None
        return meta if meta.url == src.url and self.copy_path(src).exists() else None

    def local(self, src: ListSource) -> Path | None:
        """Where the list's bytes are now: its file, or the disk copy of its URL (None if none yet)."""
        if src.file:
            return Path(src.file)
        return self.copy_path(src) if self.meta(src) is not None else None

    async def fetch(self, src: ListSource, index: int, *, timeout: float, max_bytes: int,
                    conditional: bool = True) -> Fetched:
        """Download `src.url` (at most `max_bytes`, within `timeout` seconds); raises ListError."""
        previous = self.meta(src) if conditional else None
        headers = {"User-Agent": "dnsgate (list refresh)"}
        if previous is not None:
            if previous.etag:
                headers["If-None-Match"] = previous.etag
            if previous.last_modified:
                headers["If-Modified-Since"] = previous.last_modified
        key = f"lists.sources[{index}] ({src.id})"
        import aiohttp

        try:
            session = self._client()
            async with session.get(src.url, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                now = self.wall()
                if response.status == 304 and previous is not None:
                    return Fetched(src, None, Meta(**{**asdict(previous), "checked_at": now}))
                if response.status != 200:
                    raise ListError(f"{key}: {src.url} answered HTTP {response.status}")
                if (response.content_length or 0) > max_bytes:
                    raise ListError(f"{key}: {src.url} is larger than lists.max_download_bytes")
                tmp = self.directory / f".{src.id}.list.download"
                await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
                size = 0
                with tmp.open("wb") as out:
                    async for chunk in response.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        if size > max_bytes:
                            out.close()
                            tmp.unlink(missing_ok=True)
                            raise ListError(f"{key}: {src.url} is larger than lists.max_download_bytes")
                        out.write(chunk)
                meta = Meta(url=src.url, etag=response.headers.get("ETag", ""),
                            last_modified=response.headers.get("Last-Modified", ""), fetched_at=now, checked_at=now)
                return Fetched(src, tmp, meta)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ListError(f"{key}: cannot fetch {src.url}: {_reason(exc)}") from None

    def commit(self, fetched: Fetched) -> None:
        """Make a download the list's copy (atomically) and record its metadata."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if fetched.path is not None:
            _fsync(fetched.path)
            os.replace(fetched.path, self.copy_path(fetched.source))
        meta_tmp = self._meta_path(fetched.source).with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps(asdict(fetched.meta)), encoding="utf-8")
        _fsync(meta_tmp)
        os.replace(meta_tmp, self._meta_path(fetched.source))

    def discard(self, fetched: Fetched) -> None:
        if fetched.path is not None:
            fetched.path.unlink(missing_ok=True)

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__

"""Who may read what dnsgate keeps: its data dir and the databases in it.

The consent store holds addresses, MACs and user agents, and the query log what each client asked:
only dnsgate's user reads them (dir 0700, files 0600), or, with `storage.group`, that group too
(0750/0640). The dir then carries the setgid bit, so the files SQLite adds beside a database later
(`-wal`, `-shm`, created with the database's mode) take the group as well. Files that exist already
are brought to these modes at start; secrets (the admin token, the query log's key) stay 0600.
"""

from __future__ import annotations

import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SIDECARS: Final = ("-wal", "-shm", "-journal")  # what SQLite keeps beside a database


class AccessError(Exception):
    """The configured group does not exist; the message names the key."""


@dataclass(frozen=True, slots=True)
class Access:
    gid: int | None = None  # the group that may read too; None: dnsgate's user only

    @classmethod
    def for_group(cls, group: str) -> Access:
        if not group:
            return cls()
        try:
            return cls(int(group) if group.isdigit() else grp.getgrnam(group).gr_gid)
        except KeyError:
            raise AccessError(f"storage.group: no group {group!r} on this system") from None

    @property
    def dir_mode(self) -> int:
        return 0o700 if self.gid is None else 0o750 | stat.S_ISGID

    @property
    def file_mode(self) -> int:
        return 0o600 if self.gid is None else 0o640

    def directory(self, path: Path) -> None:
        """Create `path` (and its parents) if needed; the last one gets the dir mode and group."""
        path.mkdir(parents=True, exist_ok=True)
        self._own(path)
        os.chmod(path, self.dir_mode)

    def database(self, path: Path) -> None:
        """Create the database file empty if missing (SQLite takes an empty file as an empty
        database), so it never exists with a wider mode; then the file mode for it and its sidecars."""
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, self.file_mode))
        for file in [path, *(path.with_name(path.name + s) for s in SIDECARS)]:
            if file.exists():
                self._own(file)
                os.chmod(file, self.file_mode)

    def _own(self, path: Path) -> None:
        if self.gid is not None and path.stat().st_gid != self.gid:
            os.chown(path, -1, self.gid)

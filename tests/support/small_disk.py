"""A data dir whose disk the test can fill up or make read-only, for dnsgate run as a process.

Where the test runs as root and may mount, the dir is a small tmpfs of its own (unmounted in a
finally): `fill` writes a file until the disk is full (ENOSPC), `free` deletes it, `read_only` and
`writable` remount it. Elsewhere it is a plain directory: `fill` lowers the process's file size
limit (RLIMIT_FSIZE through prlimit: writes that would grow a file fail with EFBIG, as on a full
disk) and `free` lifts it; a read-only dir needs the mount (dnsgate gives its own dir its modes back).
DNSGATE_TEST_NO_MOUNT=1 takes the second way as root too (to try it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

MOUNT = shutil.which("mount")
UMOUNT = shutil.which("umount")


class SmallDisk:
    def __init__(self, path: Path, tmpfs: bool) -> None:
        self.path = path
        self.tmpfs = tmpfs
        self.pid: int | None = None  # the dnsgate process writing here (for the size limit)
        self._filler = path / "filler"

    def fill(self) -> None:
        if self.tmpfs:
            with open(self._filler, "ab", buffering=0) as f:
                block = b"\1" * 4096
                try:
                    while True:
                        f.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
            return
        assert self.pid is not None
        largest = max(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (largest, hard))  # (the soft one: it can go back up)

    def free(self) -> None:
        if self.tmpfs:
            self._filler.unlink(missing_ok=True)
            return
        assert self.pid is not None
        _, hard = resource.prlimit(self.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (hard, hard))

    @property
    def can_remount(self) -> bool:
        return self.tmpfs

    def read_only(self) -> None:
        """Remount read-only (a tmpfs only; refused while a file on it is open for writing)."""
        assert self.tmpfs
        _run(MOUNT, "-o", "remount,ro", str(self.path))

    def writable(self) -> None:
        assert self.tmpfs
        _run(MOUNT, "-o", "remount,rw", str(self.path))


def _run(*args: str | None) -> None:
    assert all(args), "mount is not installed"
    subprocess.run([str(a) for a in args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def small_disk(path: Path, size: str = "3m") -> Iterator[SmallDisk]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if os.geteuid() == 0 and MOUNT and UMOUNT and not os.environ.get("DNSGATE_TEST_NO_MOUNT"):
        try:
            _run(MOUNT, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path))
            mounted = True
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            mounted = False  # (a container without the right to mount: the size limit instead)
    disk = SmallDisk(path, mounted)
    try:
        yield disk
    finally:
        if mounted:
            with contextlib.suppress(subprocess.CalledProcessError):
                _run(MOUNT, "-o", "remount,rw", str(path))
            try:
                _run(UMOUNT, str(path))
            except subprocess.CalledProcessError:
                _run(UMOUNT, "-l", str(path))  # still busy: detach it now, the kernel frees it when unused

"""descriptors.py without a process to exhaust: what the configured limits can hold at once, and
a shortage's episodes (logged once at the start, once at the end). The real thing, a process out
of descriptors, is tests/reliability/test_exhaustion.py and tests/e2e/resolver/test_stranded_forwards.py."""

from __future__ import annotations

import errno
import logging
from dataclasses import replace

import pytest

from dnsgate.config import Config, DnsConfig
from dnsgate.descriptors import Shortage, budget, is_shortage
from dnsgate.dns.upstreams import SOCKETS_PER_FAMILY


def test_the_defaults_hold_well_inside_1024_descriptors() -> None:
    need = budget(Config(), servers=2, sockets_per_family=SOCKETS_PER_FAMILY)
    assert (need.dns_tcp, need.api, need.upstream, need.workers) == (514, 129, 34, 0)
    assert need.total == 741 and need.total <= 0.75 * 1024


def test_the_budget_follows_the_limits_and_the_workers() -> None:
    cfg = Config()
    cfg = replace(cfg, dns=replace(cfg.dns, tcp_max_connections=2000, workers=3),
                  api=replace(cfg.api, max_connections=500, admin_listen="127.0.0.1:8054"))
    need = budget(cfg, servers=1, sockets_per_family=SOCKETS_PER_FAMILY)
    assert (need.dns_tcp, need.api, need.workers) == (2002, 502, 8)
    two = replace(cfg, dns=replace(cfg.dns, listen=DnsConfig().listen * 2))
    assert budget(two, servers=1, sockets_per_family=SOCKETS_PER_FAMILY).dns_tcp == 2004


def test_what_counts_as_a_shortage() -> None:
    for code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        assert is_shortage(OSError(code, "x"))
    wrapped = OSError("uvloop's words")
    wrapped.__cause__ = OSError(errno.EMFILE, "Too many open files")
    assert is_shortage(wrapped)
    assert not is_shortage(OSError(errno.ECONNREFUSED, "refused")) and not is_shortage(ValueError())


def test_an_episode_is_logged_once_and_ends_when_a_socket_can_be_opened(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    probe: list[OSError | None] = [OSError(errno.EMFILE, "Too many open files")]
    shortage = Shortage(clock=lambda: now[0], probe=lambda: probe[0])
    with caplog.at_level(logging.INFO, logger="dnsgate.descriptors"):
        shortage.check()
        for _ in range(50):
            shortage.hit(OSError(errno.EMFILE, "Too many open files"), "opening an upstream socket")
            shortage.check()
        assert shortage.short and shortage.episodes == 1
        now[0] += 12
        assert shortage.describe().endswith("for 12 s: Too many open files (EMFILE) opening a socket")
        probe[0] = None
        shortage.check()
        shortage.check()
    assert not shortage.short and shortage.describe() == "ok"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("out of file descriptors or socket buffers: Too many open files (EMFILE)")
    assert lines[1].startswith("file descriptors available again after 12.0 s: 101 operations failed")

"""What clients were told, checked against what dnsgate does: the fault-injection tests' ledger.

Clients change their consent through the admin API of one instance or another (alternating grants
and withdrawals) while a fault is injected, and the ledger keeps every answer. Then:
- `check_safe`: during a fault, no instance lets a client resolve a tracker unless the client's last
  answered change was a grant (200): every withdrawal (200, or 202 held) holds, and a grant answered
  503 after it opens nothing;
- `check_exact`: once the store is back, every instance lets exactly the clients whose last answered
  change was a grant resolve it (every 200 in force, every 503 absent, every withdrawal held);
- `check_log`: the exported log holds every change answered 200 under the id it was answered with,
  and no grant that was not answered 200 (a grant answered 503 is absent, or recorded and undone).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode

TRACKER = "trackcmp.net"
GRANT = {"categories": ["marketing"]}


class Instance(Protocol):
    """A running dnsgate: in-process (tests.conftest.Gate) or a process (tests.reliability.process)."""

    async def change(self, client: str, grant: bool) -> tuple[int, Any]: ...
    async def allowed(self, client: str) -> bool: ...
    async def export(self) -> list[dict[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class Answer:
    client: str
    grant: bool
    status: int  # 0: no answer (the connection failed)
    via: int  # which instance took it
    took: float  # seconds from the request to its answer
    choice_id: int | None  # the choice in force after it, as answered
    asked: float = 0.0  # when it was asked (time.monotonic)


class RunQueue:
    """How long the threads that answer waited for a CPU while they had work: Linux's run-queue time
    (/proc schedstat), sampled every few ms by a thread of its own. Watched: the thread that makes it
    (the event loop's, where in-process instances answer) and, with `pids`, every thread of those
    processes (dnsgate run as a process: its event loop and its store's thread). It is the loaded
    machine's share of a late answer (other work on both cores), which no deadline in dnsgate can
    shorten. An answer passes from one thread to the next, so waits that overlap delay it once: the
    measure is the time covered by any thread's wait, not their sum. Linux credits a wait when it
    ends, so a thread's wait seen at a sample is placed just before that sample (behind the thread's
    earlier waits where they would overlap); only the part inside the measured span counts. Without
    schedstat it reads 0 (nothing is excused)."""

    EVERY = 0.005

    def __init__(self, *pids: int) -> None:
        self.path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
        self.pids = pids
        self.times: list[float] = []
        self._waits: dict[str, list[tuple[float, float]]] = {}  # each thread's waits placed in time, in order
        self._last: dict[str, float] = {}  # each thread's own figure at the sample before
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="run-queue", daemon=True)

    def __enter__(self) -> RunQueue:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @staticmethod
    def _waited(path: str) -> float | None:
        try:
            with open(path, encoding="ascii") as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return None

    def _read(self) -> float | None:
        return self._waited(self.path)

    def _paths(self) -> list[str]:
        paths = [self.path]
        for pid in self.pids:
            with contextlib.suppress(OSError):  # (a process that has ended waits no more)
                paths += [f"/proc/{pid}/task/{tid}/schedstat" for tid in os.listdir(f"/proc/{pid}/task")]
        return paths

    def _sample_once(self) -> bool:
        with self._lock:
            now = time.monotonic()
            for path in self._paths():
                waited = self._waited(path)
                if waited is None:
                    if path == self.path:
                        return False
                    continue
                before = self._last.get(path)
                self._last[path] = waited
                if before is None or waited <= before:  # (a thread seen first now counts from the next sample)
                    continue
                waits = self._waits.setdefault(path, [])
                took = waited - before
                while waits and waits[-1][1] > now - took:  # (one thread waits once at a time: end to end)
                    took += waits[-1][1] - waits[-1][0]
                    waits.pop()
                waits.append((now - took, now))
            self.times.append(now)
            return True

    def _sample(self) -> None:
        while not self._stop.is_set() and self._sample_once():
            self._stop.wait(self.EVERY)

    def between(self, start: float, end: float | None = None) -> float:
        """Seconds the threads waited for a CPU from `start` to `end` (time.monotonic; None: now): from
        the last sample at or before `start` to the first at or after `end`; 0 if either is missing."""
        return self.measured(start, end)[0]

    def measured(self, start: float, end: float | None = None) -> tuple[float, float]:
        """`between`, and the seconds between the two samples it was read from (more than `end` -
        `start` when the sampler itself waited for a CPU): (0, 0) if either sample is missing."""
        if end is None and not self._sample_once():
            return 0.0, 0.0
        with self._lock:  # (the sampler appends meanwhile)
            times = self.times
            i = bisect.bisect_right(times, start) - 1
            j = len(times) - 1 if end is None else bisect.bisect_left(times, end)
            if i < 0 or j >= len(times):
                return 0.0, 0.0
            low, high = times[i], times[j]
            # A thread's waits are in order and apart: those from the last one begun by `low` on.
            waits = sorted(w for thread in self._waits.values()
                           for w in thread[max(0, bisect.bisect_right(thread, (low, low)) - 1):])
        covered, reached = 0.0, low
        for begin, until in waits:  # the union of the waits, within the span
            begin, until = max(begin, reached), min(until, high)
            if until > begin:
                covered += until - begin
                reached = until
        return covered, high - low


@dataclass
class Ledger:
    clients: Sequence[str]
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    dns_checked: int = 0  # DNS answers compared with the ledger (check_safe, check_exact): none was stale
    run_queue: RunQueue | None = None  # the answering thread's waits for a CPU (`late`)

    def __post_init__(self) -> None:
        self.answers = {c: [] for c in self.clients}

    async def change(self, instance: Instance, via: int, client: str, grant: bool) -> Answer:
        start = time.monotonic()
        try:
            status, body = await instance.change(client, grant)
        except (aiohttp.ClientError, OSError):
            status, body = 0, None
        choice = body.get("choice") if isinstance(body, dict) else None
        answer = Answer(client, grant, status, via, time.monotonic() - start,
                        choice["id"] if status == 200 and choice else None, start)
        assert status in (200, 202, 503), (status, body)
        assert status != 202 or (not grant and "held" in body), body  # only a withdrawal is held
        self.answers[client].append(answer)
        return answer

    def expected(self, client: str, on: int | None = None) -> bool:
        """Whether `client` may resolve the tracker: its last answered change was a grant (200). With
        `on`, as instance `on` must have it while the store is failing: a withdrawal held (202) binds
        only the instance that took it until the store has recorded it."""
        for a in reversed(self.answers[client]):
            if a.status == 200 or (a.status == 202 and (on is None or a.via == on)):
                return a.grant
        return False

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in itertools.chain.from_iterable(self.answers.values()))

    def slowest(self) -> float:
        return max((a.took for a in itertools.chain.from_iterable(self.answers.values())), default=0.0)

    def late(self, deadline: float) -> float:
        """The most any answer came after `deadline` seconds from its request, less the time the
        answering thread waited for a CPU in between (`run_queue`): how late dnsgate itself was."""
        rq = self.run_queue
        worst = -deadline
        for a in itertools.chain.from_iterable(self.answers.values()):
            over = a.took - deadline
            if over > 0 and rq is not None:
                over -= rq.between(a.asked + deadline, a.asked + a.took)
            worst = max(worst, over)
        return worst

    def summary(self, deadline: float | None = None) -> str:
        s = self.statuses()
        late = "" if deadline is None else f", {self.late(deadline):.3f} s after its {deadline:g} s deadline " \
                                           "less the machine's delays"
        return (f"{sum(s.values())} changes: {s[200]} x 200, {s[202]} x 202, {s[503]} x 503; "
                f"slowest {self.slowest():.3f} s{late}")


FIGURES = "DNSGATE_FAULT_FIGURES"  # a file: each test that passes appends its figures (tests/reliability)


def record(test: str, ledger: Ledger, during: Counter[int] | None = None, **extra: float) -> None:
    """The figures of a run that passed, for tests/reliability/store_faults.py: every change, and
    those answered while the fault lasted (`during`)."""
    path = os.environ.get(FIGURES)
    if not path:
        return
    s = ledger.statuses()
    d = during or Counter()
    line = {"test": test, "changes": sum(s.values()), "200": s[200], "202": s[202], "503": s[503],
            "during": {"200": d[200], "202": d[202], "503": d[503]},
            "slowest": round(ledger.slowest(), 3), "dns_checked": ledger.dns_checked,
            **{k: round(v, 3) for k, v in extra.items()}}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


async def churn(ledger: Ledger, instances: Sequence[Instance], seconds: float,
                via: Callable[[int], int] | None = None) -> None:
    """Every client alternates grant and withdrawal for `seconds`, one change at a time, through the
    instance `via(n)` picks for its n-th change (round robin by default)."""
    stop = time.monotonic() + seconds

    async def client_loop(k: int, client: str) -> None:
        n = k
        while time.monotonic() < stop:
            i = via(n) if via is not None else n % len(instances)
            asked = ledger.answers[client]
            grant = not asked[-1].grant if asked else True  # whatever the last answer was
            await ledger.change(instances[i], i, client, grant)
            n += 1
            await asyncio.sleep(0.02 + (n % 5) * 0.02)

    await asyncio.gather(*(client_loop(k, c) for k, c in enumerate(ledger.clients)))


async def check_safe(ledger: Ledger, instances: Sequence[Instance], which: Sequence[int] | None = None) -> None:
    for i in which if which is not None else range(len(instances)):
        for client in ledger.clients:
            ledger.dns_checked += 1
            if await instances[i].allowed(client):
                assert ledger.expected(client, on=i), (f"instance {i} lets {client} resolve {TRACKER}, but its last "
                                                 f"answered change was not a grant: {ledger.answers[client][-3:]}")


async def check_exact(ledger: Ledger, instances: Sequence[Instance], within: float) -> None:
    """Every instance agrees with the ledger, at the latest `within` seconds from now (less the time
    the answering thread waited for a CPU meanwhile, with the ledger's `run_queue`)."""
    start = time.monotonic()
    rq = ledger.run_queue

    def late() -> bool:
        return time.monotonic() - start - (rq.between(start) if rq is not None else 0.0) > within

    for i, instance in enumerate(instances):
        for client in ledger.clients:
            want = ledger.expected(client)
            ledger.dns_checked += 1
            while await instance.allowed(client) != want:
                assert not late(), (
                    f"instance {i}: {client} {'blocked' if want else 'allowed'}, but its last answered change "
                    f"was {'a grant' if want else 'no grant'}: {ledger.answers[client][-3:]}")
                await asyncio.sleep(0.05)


def check_log(ledger: Ledger, log: Sequence[dict[str, Any]], history_lost: bool = False) -> None:
    """`log`: an instance's export (JSON Lines records). With `history_lost`, the changes answered
    before the loss are gone with it; only its marker and the later ones are checked."""
    by_id = {e["id"]: e for e in log}
    assert len(by_id) == len(log), "an event id is used twice"
    first = min(by_id, default=0)
    answered_grants = set()
    for client, answers in ledger.answers.items():
        for a in answers:
            if a.status != 200 or a.choice_id is None:
                continue
            if a.grant:
                answered_grants.add(a.choice_id)
            if history_lost and a.choice_id < first:
                continue
            event = by_id.get(a.choice_id)
            assert event is not None, f"change #{a.choice_id} by {client} was answered 200 but is not in the log"
            assert event["address"] == client
            assert event["categories"]["marketing"] is a.grant, event
    undone = {e["supersedes"] for e in log if "answered 503" in e["reason"]}
    for e in log:
        if e["action"] == "grant":
            assert e["id"] in answered_grants | undone or "in force again" in e["reason"], (
                f"grant #{e['id']} for {e['address']} is in the log but was never answered 200: {e}")
        if e["supersedes"] is not None:
            assert e["supersedes"] in by_id or e["supersedes"] < first, (
                f"#{e['id']} supersedes #{e['supersedes']}, which is not an event of this log")
    for client in ledger.clients:
        mine = [e for e in log if e["address"] == client]
        if mine and not ledger.expected(client):
            assert mine[-1]["action"] in ("withdrawal", "refusal", "reset"), mine[-1]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str = "") -> float:
    """Poll `check` until it holds; seconds it took. Fails after `timeout`."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def resolves(dns_port: int, client: str) -> bool:
    q = dns.message.make_query(TRACKER, "A")
    for attempt in range(3):
        try:
            reply = await dns.asyncquery.udp(q, "127.0.0.1", port=dns_port, source=client, timeout=2.0)
            break
        except TimeoutError:
            if attempt == 2:
                raise
    assert reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)
    return reply.rcode() == dns.rcode.NOERROR

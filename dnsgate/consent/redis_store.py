"""Consent shared by several dnsgate instances through Redis (`storage.store = "redis://…"`).

Keys, under `storage.redis_prefix` ("dnsgate:"):
- `log`: the consent log, an append-only Stream. Entry id `<event id>-0`; fields: the event's
  columns exactly as SQLite keeps them (`store.EVENT_COLUMNS`), plus `x`: what the event did to
  the choices in force (JSON: `ends`, `choice`, `profile_of`, `items_of`, `pairing`), and who recorded
  it (`origin`: the instance, `change`: the change's idempotency key, `step`, `epoch`), so that other
  instances can apply it. Entries are never changed; retention trims the oldest ones only.
- `seq`: the last event id.
- `epoch`: the history's identity, a random id made once. A Redis that lost its data (restarted
  empty, replaced, restored from an older file) cannot reproduce it, so an instance that followed
  the log tells a lost history from a new one by identity, not by comparing sequence numbers.
- `choice:<id>`: a choice in force, a hash of its columns, with what later events changed in it (a
  profile change: its profile and expiry; a migration: its items and terms). It is deleted by the
  event that ends the choice, never expired by Redis: an opt-out outlives its grants' expiry, and a
  choice rebuilt from the event that made it would lose those changes. (A hash an older dnsgate let
  expire is rebuilt from that event and every later one that changed it: `load`.)
- `choices`: a sorted set of the ids of choices in force, scored by expiry. An id leaves it only
  when an event ends its choice (expiry recorded, reset, superseded): the expiry is recorded
  exactly once, by whichever instance's sweeper is first.
- `pairings`: a hash, JSON `[http key, dns key]` -> when.
- `activity`: a hash, kiosk client key -> its last DNS query seen by any instance (merged at every
  sweep), so a kiosk session is idle only when no instance has seen a query from it.
- `change:<key>`: a change that will never be recorded (see below), for a minute.

A change is one Lua script, which Redis runs alone: it checks the epoch, its deadline and that
`seq` is still the position the change was planned at (else `Conflict`: the service catches up and
plans again), allocates event ids, appends to the log and updates the choices. With `appendonly yes`
and `appendfsync always` Redis writes the change to disk before it answers, so an acknowledged change
survives a crash.

A change that gets no answer is settled before the API answers, never left to land later: the
script carries a deadline in Redis's clock and refuses to run after it (a command stuck in a paused
Redis or a stalled network), and `RESOLVE` asks, on a fresh connection, whether the change's key is
in the log after the position it was planned at; if not, it marks the key so the change can never
run. Only if Redis stays unreachable until the deadline is the outcome unknown (`InDoubt`); the
service resolves it when Redis answers again.

Following: one blocking `XREAD` at a time from the last entry applied, so a change through any
instance is in force on the others a few milliseconds later. Expiries do not need Redis's key
expiry notifications (fire-and-forget pub/sub, lost while an instance is disconnected, and sent
only when Redis gets round to deleting the key): every instance's table stops applying a choice at
its expiry time by itself, and the sweeper's recorded `expiry` event removes it everywhere.

When Redis cannot be reached every call raises `StoreError` (the API answers 503). An instance that
has heard nothing from Redis for `lease` seconds may be missing withdrawals made through others, so
it holds closed (`ChangeSink.cut_off`) until it has loaded the state again. On reconnection the
follower reads the epoch, the sequence and the trimmed point in one script: a different epoch, a
sequence below what this instance had already applied (a rollback: the history is forked into a new
epoch whose ids start above every id used before), or entries trimmed past its position mean a full
reload; otherwise it reads the log on from where it stopped. A new epoch after a loss starts with a
`history_lost` entry saying what is missing, and its ids start above every id of the old one (at
the loss time in milliseconds, or the last id this instance saw, whichever is higher), so no id is
ever used twice. The epoch an instance followed, and how far it read (written at most a second
behind, and at shutdown), is remembered in its data dir, so a loss that happened while it was
stopped, or killed, is seen at its next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dnsgate.consent.backend import (
    ChangeSink,
    Conflict,
    InDoubt,
    Recorded,
    Snapshot,
    choices_in_order,
    stop_if_cancelled,
    within,
)
from dnsgate.consent.model import Choice, Subject
from dnsgate.consent.records import Event, EventFilter, Step, StoreError
from dnsgate.consent.sqlite_store import (
    CHOICE_COLUMNS,
    EVENT_COLUMNS,
    choice_from_row,
    choice_row,
    event_from_row,
    event_row,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
PAGE: Final = 500
FOLLOW_BLOCK_MS: Final = 1000
RETRY_MIN, RETRY_MAX = 0.1, 1.0
# A change's script must run this long before the API answers, in Redis's clock as estimated here:
# time to ask on another connection whether it ran, and room for the estimate's error.
RESOLVE_RESERVE: Final = 0.4
CLOCK_MARGIN_MS: Final = 100
CANCEL_MARK_MS: Final = 60_000
CLOCK_EVERY: Final = 10.0  # seconds between readings of Redis's clock by the follower
# Seconds between writes of how far this instance read (to its data dir) while the log moves: a
# process killed without shutting down remembers that much less of what a Redis emptied meanwhile lost.
REMEMBER_EVERY: Final = 1.0

# The epoch, the sequence, the trimmed point and Redis's clock, read together.
STATE: Final = """
local trimmed = '0-0'
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'max-deleted-entry-id' then trimmed = info[i + 1] end
  end
end
local t = redis.call('TIME')
return {redis.call('GET', KEYS[3]) or '', redis.call('GET', KEYS[1]) or '0', trimmed, t[1], t[2]}
"""

# Make the epoch: on an empty Redis (with the entry saying what was lost, if anything is known to
# be), over a log from before epochs existed (it carries on), or in place of a rolled-back one.
EPOCH: Final = """
local current = redis.call('GET', KEYS[1])
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
if current and current ~= ARGV[1] then return {current, string.format('%d', seq)} end
redis.call('SET', KEYS[1], ARGV[2])
if not current and (seq > 0 or redis.call('EXISTS', KEYS[3]) == 1) then
  return {ARGV[2], string.format('%d', seq)}
end
seq = math.max(seq, tonumber(ARGV[3]))
if #ARGV > 3 then
  seq = seq + 1
  local fields = {}
  for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('XADD', KEYS[3], string.format('%d', seq) .. '-0', unpack(fields))
end
redis.call('SET', KEYS[2], string.format('%d', seq))
return {ARGV[2], string.format('%d', seq)}
"""

# Was a change recorded? If not, make sure it never is (its commit checks the mark).
RESOLVE: Final = """
if (redis.call('GET', KEYS[2]) or '') ~= ARGV[3] then return {'gone'} end
local out = {'recorded'}
local first = string.format('%d', tonumber(ARGV[2]) + 1) .. '-0'
for _, entry in ipairs(redis.call('XRANGE', KEYS[1], first, '+', 'COUNT', 256)) do
  local fields, x = entry[2], nil
  for i = 1, #fields, 2 do
    if fields[i] == 'x' then x = fields[i + 1] end
  end
  if not x then break end
  local effects = cjson.decode(x)
  if effects.change ~= ARGV[4] then break end
  out[#out + 1] = entry[1]
  out[#out + 1] = tostring(effects.step)
end
if #out > 1 then return out end
redis.call('SET', ARGV[1] .. 'change:' .. ARGV[4], '1', 'PX', ARGV[5])
return {'cancelled'}
"""

COMMIT: Final = """
local epoch = redis.call('GET', KEYS[5]) or ''
if epoch ~= ARGV[4] then return {'epoch', epoch} end
local prefix = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now_ms > tonumber(ARGV[6]) then return {'late', string.format('%d', now_ms)} end
if redis.call('EXISTS', prefix .. 'change:' .. ARGV[5]) == 1 then return {'cancelled', ''} end
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
if seq ~= tonumber(ARGV[2]) then return {'conflict', string.format('%d', seq)} end
local out = {'ok', '', string.format('%d', now_ms)}
for i, s in ipairs(cjson.decode(ARGV[3])) do
  local id = '0'
  if s.only_if_current == nil or redis.call('ZSCORE', KEYS[3], s.only_if_current) then
    seq = seq + 1
    id = string.format('%d', seq)
    for _, ended in ipairs(s.ends) do
      redis.call('ZREM', KEYS[3], ended)
      redis.call('DEL', prefix .. 'choice:' .. ended)
    end
    if s.choice then
      redis.call('ZADD', KEYS[3], s.expires, id)
      redis.call('HSET', prefix .. 'choice:' .. id, unpack(s.choice))
    end
    if s.profile_of then
      local key = prefix .. 'choice:' .. s.profile_of
      if redis.call('EXISTS', key) == 1 then
        redis.call('HSET', key, 'profile', s.profile, 'expires_at', s.profile_expires)
        redis.call('PERSIST', key)
      end
      redis.call('ZADD', KEYS[3], 'XX', s.profile_expires, s.profile_of)
    end
    if s.items_of then
      local key = prefix .. 'choice:' .. s.items_of
      if redis.call('EXISTS', key) == 1 then
        redis.call('HSET', key, 'items', s.items, 'terms', s.terms)
        redis.call('PERSIST', key)
      end
    end
    if s.pairing then redis.call('HSET', KEYS[4], s.pairing, s.at) end
    redis.call('XADD', KEYS[2], id .. '-0', unpack(s.fields))
  end
  out[i + 3] = id
end
redis.call('SET', KEYS[1], string.format('%d', seq))
out[2] = string.format('%d', seq)
return out
"""


ACTIVITY: Final = """
for i = 2, #ARGV, 2 do
  local seen = redis.call('HGET', KEYS[1], ARGV[i])
  if not seen or tonumber(seen) < tonumber(ARGV[i + 1]) then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) < tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
"""


def redact(url: str) -> str:
    """The URL without its password (it goes into logs, /healthz and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def encode(row: Mapping[str, Any]) -> dict[str, str]:
    """A row as Redis field values: numbers as exact text (repr), None left out."""
    return {k: v if isinstance(v, str) else repr(v) for k, v in row.items() if v is not None}


def decode(fields: Mapping[str, str], columns: Mapping[str, type]) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(columns)
    for name, kind in columns.items():
        raw = fields.get(name)
        if raw is not None:
            row[name] = float(raw) if kind is float else int(raw) if kind is int else raw
    return row


def flat(fields: Mapping[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


class _Reload(StoreError):
    """The log belongs to another history than the one this instance applied: load it whole again."""


class RedisBackend:
    """The consent store in Redis (see the module docstring); one per dnsgate instance."""

    shared = True

    def __init__(self, url: str, prefix: str = "dnsgate:", timeout: float = 2.0,
                 client: aioredis.Redis | None = None, memory: Path | None = None) -> None:
        self.name = redact(url)
        self.prefix = prefix
        self.timeout = timeout
        self.keys = (prefix + "seq", prefix + "log", prefix + "choices", prefix + "pairings", prefix + "epoch")
        self.redis = client or aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # the follower retries; a change must fail fast (503), not hang
            client_name="dnsgate")
        self.block_ms = max(50, min(FOLLOW_BLOCK_MS, int(timeout * 500)))
        # Heard nothing for this long: changes through other instances may be missing here.
        self.lease = max(3.0, 2 * timeout)
        self.origin = secrets.token_hex(8)  # tells this instance's own changes apart in the log
        self.memory = memory  # a file in the data dir: the epoch this instance followed, across restarts
        self._position = 0
        self._epoch = ""
        self._loaded = False  # the table holds this epoch's state up to `position`
        self._fresh = 0.0  # time.monotonic() of the last read that saw the whole log
        self._clock: tuple[float, float] | None = None  # (Redis's time in ms, time.monotonic() then)
        self._remembered = (0, 0.0)  # (the position last written to `memory`, time.monotonic() then)
        self._remember()

    @property
    def position(self) -> int:
        return self._position

    async def _call(self, what: str, op: Callable[[], Any], *, again: bool = True) -> Any:
        """Run one operation; StoreError if Redis cannot do it. A dropped connection (Redis restarted,
        a proxy closed an idle one) empties the pool, and a read (`again`) is tried once more on a fresh
        connection."""
        for attempt in (1, 2):
            try:
                return await op()
            except (RedisConnectionError, OSError) as exc:
                await self._drop_connections()
                if attempt == 2 or not again:
                    raise StoreError(f"{self.name}: {what}: {exc or type(exc).__name__}") from exc
            except (RedisError, TimeoutError) as exc:
                await self._drop_connections()  # (a reply may still come on that connection)
                raise StoreError(f"{self.name}: {what}: {exc or type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    async def _drop_connections(self, deadline: float | None = None) -> None:
        """Close every pooled connection; with `deadline`, waiting no longer than it (a close may
        wait for a peer that reads nothing; it ends on its own, within redis-py's connect timeout)."""
        with contextlib.suppress(RedisError, OSError):
            if deadline is None:
                await self.redis.connection_pool.disconnect()
            else:
                await within(deadline, self.redis.connection_pool.disconnect())

    # -- the epoch -------------------------------------------------------------------------------------
    def _remember(self, position: int | None = None) -> None:
        """Read (at start) or write the epoch followed, in `memory`; a file that cannot be used only
        means a loss while this instance was stopped goes unnoticed, so it is warned about, not fatal."""
        if self.memory is None:
            return
        if position is None and not self._epoch:
            try:
                kept = json.loads(self.memory.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return
            except (OSError, ValueError) as exc:
                log.warning("consent store %s: cannot read %s (%s); a loss of Redis's data while this instance "
                            "was stopped would go unnoticed", self.name, self.memory, exc)
                return
            if isinstance(kept, dict) and kept.get("store") == self.name and kept.get("prefix") == self.prefix:
                self._epoch = str(kept.get("epoch", ""))
                self._position = int(kept.get("position", 0))
            return
        record = {"store": self.name, "prefix": self.prefix, "epoch": self._epoch, "position": self._position}
        self._remembered = (self._position, time.monotonic())
        try:
            part = self.memory.with_name(self.memory.name + ".new")
            part.write_text(json.dumps(record) + "\n", encoding="utf-8")
            os.replace(part, self.memory)
        except OSError as exc:
            log.warning("consent store %s: cannot write %s (%s)", self.name, self.memory, exc)

    async def _state(self) -> tuple[str, int, int]:
        """(epoch, seq, last trimmed id), read in one script; also sets the clock."""
        sent = time.monotonic()
        seq_key, log_key, epoch_key = self.keys[0], self.keys[1], self.keys[4]
        epoch, seq, trimmed, sec, usec = await self._call(
            "state", lambda: self.redis.eval(STATE, 3, seq_key, log_key, epoch_key))
        self._clock = (int(sec) * 1000 + int(usec) / 1000, sent)
        return str(epoch), int(seq), int(str(trimmed).split("-")[0])

    async def _new_epoch(self, fork_from: str, base: int, gap: str) -> tuple[str, int]:
        """Make (or adopt another instance's) epoch; a `gap` says what the new one does not hold."""
        new = secrets.token_hex(8)
        args: list[str] = [fork_from, new, str(base)]
        if gap:
            now = self._redis_now() / 1000
            event = Event("history_lost", now, Subject(), "", channel="system", reason=gap)
            x = json.dumps({"epoch": new, "origin": self.origin}, separators=(",", ":"))
            args += flat({**encode(event_row(event)), "x": x})
        epoch_key, seq_key, log_key = self.keys[4], self.keys[0], self.keys[1]
        made, seq = await self._call("epoch", lambda: self.redis.eval(EPOCH, 3, epoch_key, seq_key, log_key, *args))
        return str(made), int(seq)

    def _redis_now(self) -> float:
        """Redis's clock now, in ms, as last read (never ahead of it: the reading is dated when sent)."""
        if self._clock is None:
            return time.time() * 1000
        redis_ms, at = self._clock
        return redis_ms + (time.monotonic() - at) * 1000

    # -- reading the state ---------------------------------------------------------------------------
    async def load(self) -> Snapshot:
        """The choices in force and the pairings; this instance follows the log from here on."""
        self._loaded = False
        known, applied = self._epoch, self._position
        sent = time.monotonic()
        epoch, seq, _ = await self._state()
        if not epoch or (epoch == known and seq < applied):
            # Empty (restarted without its files, or new), or rolled back below what this instance
            # applied: a new epoch, whose ids start above every one used before.
            gap = ""
            if known and applied:
                what = "is empty" if not epoch else f"went back from event #{applied} to #{seq}"
                gap = (f"the consent log lost its history: Redis {what}; events up to #{applied} (history "
                       f"{known}) are not in this log, exports made before hold them")
            base = max(applied + 1, int(self._redis_now())) if known else 0
            epoch, seq = await self._new_epoch(epoch if epoch else "", base, gap)
        lost = ""
        if known and applied and epoch != known:
            lost = (f"Redis no longer holds the consent history this instance followed (history {known}, read up "
                    f"to event #{applied}); it now holds history {epoch} (events from #{seq} on)")
        index, pairings_key = self.keys[2], self.keys[3]
        members: list[tuple[str, float]] = await self._call("load", lambda: self.redis.zrange(index, 0, -1,
                                                                                              withscores=True))
        choices: list[Choice] = []
        rebuilt: list[int] = []
        for start in range(0, len(members), PAGE):
            ids = [int(m) for m, _ in members[start:start + PAGE]]

            async def read(ids: list[int] = ids) -> list[dict[str, str]]:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for i in ids:
                        pipe.hgetall(f"{self.prefix}choice:{i}")
                    return list(await pipe.execute())

            for choice_id, fields in zip(ids, await self._call("load", read), strict=True):
                if fields:
                    choices.append(choice_from_row({**decode(fields, CHOICE_COLUMNS), "id": choice_id}))
                    continue
                # An older dnsgate let Redis drop the hash at the choice's expiry, which is not recorded
                # yet: the event that made the choice says what it was, the later ones what changed.
                made = await self._entry(choice_id)
                if made is not None and made.expires_at is not None:
                    choices.append(made.as_choice(choice_id))
                    rebuilt.append(choice_id)
                else:
                    log.warning("consent store %s: choice #%d has neither a hash nor its event; skipped",
                                self.name, choice_id)
        if rebuilt:
            choices = await self._changed_since(choices, rebuilt)
        raw_pairs: dict[str, str] = await self._call("load", lambda: self.redis.hgetall(pairings_key))
        pairs = [(*json.loads(k), float(v)) for k, v in raw_pairs.items()]
        changed = epoch != self._epoch
        self._epoch, self._position, self._loaded = epoch, seq, True
        self._fresh = max(self._fresh, sent)
        if changed:
            self._remember(seq)
        return Snapshot(choices_in_order(choices), pairs, lost)

    async def _changed_since(self, choices: list[Choice], rebuilt: list[int]) -> list[Choice]:
        """`choices` with what the log's later events changed in the `rebuilt` ones (rebuilt from the
        event that made them): profile and expiry (a profile change), items and terms (a migration)."""
        by_id = {c.id: c for c in choices}
        wanted = set(rebuilt)
        bound = f"({min(rebuilt)}-0"
        while True:
            page = await self._call("read log", functools.partial(self.redis.xrange, self.keys[1], bound, "+",
                                                                  count=PAGE))
            for entry_id, fields in page:
                effects = json.loads(fields.get("x", "{}"))
                profile_of, items_of = effects.get("profile_of"), effects.get("items_of")
                if profile_of not in wanted and items_of not in wanted:
                    continue
                e = _event(fields, int(entry_id.split("-")[0]))
                if profile_of in wanted:
                    c = by_id[profile_of]
                    by_id[profile_of] = dataclasses.replace(
                        c, profile=e.profile, expires_at=c.expires_at if e.expires_at is None else e.expires_at)
                if items_of in wanted:
                    by_id[items_of] = dataclasses.replace(by_id[items_of], items=e.items, terms=e.terms)
            if len(page) < PAGE:
                return [by_id[c.id] for c in choices]
            bound = f"({page[-1][0]}"

    async def _entry(self, event_id: int) -> Event | None:
        found = await self._call("read log", lambda: self.redis.xrange(self.keys[1], f"{event_id}-0",
                                                                       f"{event_id}-0"))
        return _event(found[0][1], event_id) if found else None

    async def pairings_of(self, http: str) -> dict[str, float]:
        raw: dict[str, str] = await self._call("pairings", lambda: self.redis.hgetall(self.keys[3]))
        found: dict[str, float] = {}
        for k, v in raw.items():
            h, d = json.loads(k)
            if h == http:
                found[d] = float(v)
        return found

    # -- changing ------------------------------------------------------------------------------------
    async def commit(self, steps: Sequence[Step], based_on: int, change: str, deadline: float) -> Recorded:
        if not self._loaded:
            raise StoreError(f"{self.name}: this instance has not caught up with the consent log yet")
        payload = json.dumps([self._step_args(s, change, i) for i, s in enumerate(steps)], separators=(",", ":"))
        ends_by = deadline - RESOLVE_RESERVE
        script_deadline = int(self._redis_now() + (ends_by - time.monotonic()) * 1000 - CLOCK_MARGIN_MS)
        sent = time.monotonic()
        try:
            # (a script sent late, past `within`, is refused by its deadline or by RESOLVE's mark)
            result = await within(max(sent + 0.05, ends_by), self.redis.eval(
                COMMIT, 5, *self.keys, self.prefix, str(based_on), payload, self._epoch, change, str(script_deadline)))
        except (RedisConnectionError, OSError, RedisError, TimeoutError) as exc:
            if isinstance(exc, RedisError) and not isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
                raise StoreError(f"{self.name}: commit: {exc}") from exc  # Redis refused it: not run
            await self._drop_connections(deadline)
            by_step = await self._settle(change, based_on, deadline, exc)
            settled = Recorded([by_step.get(i) for i in range(len(steps))], in_force_up_to=self._position)
            self._position = max(self._position, *by_step.values())
            return settled
        kind = result[0]
        if kind == "epoch":
            self._loaded = False
            raise _Reload(f"{self.name}: the consent log now holds another history; reloading it")
        if kind == "late":
            raise StoreError(f"{self.name}: Redis ran the change after its deadline, so it refused it")
        if kind == "cancelled":
            raise StoreError(f"{self.name}: the change was given up before Redis ran it")
        if kind == "conflict":
            raise Conflict(f"{self.name}: the log is at {result[1]}, this change was planned at {based_on}")
        self._clock = (float(result[2]), sent)
        self._fresh = max(self._fresh, sent)
        ids = [int(i) or None for i in result[3:]]
        # The follower may have applied these entries (in log order) while the answer was on its way.
        recorded = Recorded(ids, in_force_up_to=self._position)
        self._position = max(self._position, int(result[1]))
        return recorded

    async def _settle(self, change: str, based_on: int, deadline: float, cause: BaseException) -> dict[int, int]:
        """A change got no answer: ask on fresh connections, until the deadline, whether it was
        recorded (step -> event id) or not (StoreError; it never will be). InDoubt if Redis never
        answers: the change's own deadline has passed by then, so it cannot run later."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                found = await within(deadline, self._resolve(change, based_on))
            except (RedisError, OSError, TimeoutError):
                await self._drop_connections(deadline)
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            if found is None:
                raise StoreError(f"{self.name}: commit: {cause or type(cause).__name__}; not recorded") from None
            return found
        raise InDoubt(f"{self.name}: commit: no answer ({cause or type(cause).__name__}); the change may have "
                      "been recorded just before, and is undone if so when Redis answers again")

    async def _resolve(self, change: str, based_on: int) -> dict[int, int] | None:
        log_key, epoch_key = self.keys[1], self.keys[4]
        reply = await self.redis.eval(RESOLVE, 2, log_key, epoch_key, self.prefix, str(based_on), self._epoch,
                                      change, str(CANCEL_MARK_MS))
        if reply[0] == "gone":
            self._loaded = False  # (another history: nothing of it was recorded there)
            return None
        if reply[0] == "cancelled":
            return None
        return {int(reply[i + 1]): int(str(reply[i]).split("-")[0]) for i in range(1, len(reply), 2)}

    async def resolve(self, change: str, based_on: int) -> dict[int, int] | None:
        return await self._call("resolve", lambda: self._resolve(change, based_on))  # type: ignore[no-any-return]

    def _step_args(self, s: Step, change: str, index: int) -> dict[str, Any]:
        e = s.event
        effects: dict[str, Any] = {"ends": s.ends, "choice": s.makes_choice, "origin": self.origin,
                                   "change": change, "step": index, "epoch": self._epoch}
        args: dict[str, Any] = {"ends": [str(i) for i in s.ends]}
        if s.only_if_current is not None:
            args["only_if_current"] = str(s.only_if_current)
        if s.makes_choice:
            assert e.expires_at is not None
            row = choice_row(e.as_choice(0))
            del row["id"]
            args.update(choice=flat(encode(row)), expires=repr(e.expires_at))
        if s.sets_profile_of is not None:
            assert e.expires_at is not None
            args.update(profile_of=str(s.sets_profile_of), profile=e.profile, profile_expires=repr(e.expires_at))
            effects["profile_of"] = s.sets_profile_of
        if s.sets_items_of is not None:
            row = event_row(e)
            args.update(items_of=str(s.sets_items_of), items=row["items"] or "{}", terms=row["terms"] or "")
            effects["items_of"] = s.sets_items_of
        if s.pairing is not None:
            args.update(pairing=json.dumps(list(s.pairing)), at=repr(e.at))
            effects["pairing"] = list(s.pairing)
        args["fields"] = flat({**encode(event_row(e)), "x": json.dumps(effects, separators=(",", ":"))})
        return args

    async def share_activity(self, seen: Mapping[str, float], forget_before: float) -> dict[str, float]:
        args = [repr(forget_before), *(item for key, at in seen.items() for item in (key, repr(at)))]
        flat_reply = await self._call("kiosk activity", lambda: self.redis.eval(ACTIVITY, 1, self.prefix + "activity",
                                                                                *args))
        return {flat_reply[i]: float(flat_reply[i + 1]) for i in range(0, len(flat_reply), 2)}

    async def remember_pairing(self, http: str, dns: str, at: float) -> None:
        await self._call("pairing", lambda: self.redis.hset(self.keys[3], json.dumps([http, dns]), repr(at)))

    # -- following -----------------------------------------------------------------------------------
    async def catch_up(self, sink: ChangeSink) -> None:
        """Apply every entry after `position`, now."""
        if not self._loaded:
            raise StoreError(f"{self.name}: this instance has not caught up with the consent log yet")
        while True:
            entries = await self._call("catch up", lambda: self.redis.xrange(
                self.keys[1], f"({self._position}-0", "+", count=PAGE))
            self._apply(entries, sink)
            if len(entries) < PAGE:
                return

    async def follow(self, sink: ChangeSink) -> None:
        """Apply other instances' changes as they are logged, for ever; reconnect after outages; hold
        closed while nothing is heard for longer than the lease."""
        watch = asyncio.get_running_loop().create_task(self._watch_lease(sink))
        try:
            await self._follow(sink)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)

    async def _follow(self, sink: ChangeSink) -> None:
        problem = "" if self._loaded else "not loaded yet"
        wait = RETRY_MIN
        clock_read = time.monotonic()
        while True:
            stop_if_cancelled()
            try:
                reloaded = not self._loaded
                if reloaded:
                    sink.replace_all(await self.load())
                elif problem:
                    await self._resume(sink)
                # (after any reload too: the lease may have cut this instance off while no read failed)
                if problem or reloaded:
                    problem = ""
                    sink.store_health("")
                    wait = RETRY_MIN
                if time.monotonic() - clock_read > CLOCK_EVERY:
                    await self._state()
                    clock_read = time.monotonic()
                sent, applied = time.monotonic(), self._position
                epoch, seq, found = await self._call("follow", self._read_on)
                # A reconnection may have reached a Redis that lost data: another epoch, or a log
                # that went back (`applied` is taken first: this instance's commits only add to it).
                if epoch != self._epoch or int(seq or 0) < applied:
                    raise _Reload(f"{self.name}: the consent log now holds another history")
                if self._loaded:
                    self._fresh = max(self._fresh, sent)
                    for _stream, entries in found or ():
                        self._apply(entries, sink)
                    written, written_at = self._remembered
                    if self._position != written and time.monotonic() - written_at > REMEMBER_EVERY:
                        self._remember(self._position)
            except _Reload:
                self._loaded = False
            except StoreError as exc:
                if str(exc) != problem:
                    problem = str(exc)
                    sink.store_health(problem)
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_MAX)

    async def _read_on(self) -> list[Any]:
        """The epoch and the sequence, then the entries after `position` (waiting for some up to
        `block_ms`), on one connection in that order: entries are only applied from the history this
        instance follows."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys[4])
            pipe.get(self.keys[0])
            pipe.xread({self.keys[1]: f"{self._position}-0"}, count=PAGE, block=self.block_ms)
            return list(await pipe.execute())

    async def _watch_lease(self, sink: ChangeSink) -> None:
        while True:
            await asyncio.sleep(min(0.25, self.lease / 4))
            if self._loaded and time.monotonic() - self._fresh > self.lease:
                self._loaded = False  # (the follower loads everything again once Redis answers)
                sink.cut_off(f"{self.name}: no answer for {self.lease:g} s; changes made through other instances "
                             "meanwhile are unknown here")

    async def _resume(self, sink: ChangeSink) -> None:
        """Back after an outage: read on from `position`, unless the log is another history, went back
        below `position`, or lost entries after it to retention; then load the whole state again."""
        applied = self._position  # (before the read: this instance's own commits only add to it)
        epoch, seq, trimmed = await self._state()
        if epoch != self._epoch or seq < applied or trimmed > applied:
            if epoch == self._epoch and seq >= applied:
                log.warning("consent store %s: retention trimmed the log past #%d while this instance was cut "
                            "off; reloading every choice", self.name, applied)
            sink.replace_all(await self.load())
        else:
            await self.catch_up(sink)

    def _apply(self, entries: Sequence[tuple[str, Mapping[str, str]]], sink: ChangeSink) -> None:
        for entry_id, fields in entries:
            event_id = int(entry_id.split("-")[0])
            if event_id <= self._position:
                continue  # applied already (this instance's own change, or read twice)
            effects = json.loads(fields.get("x", "{}"))
            if effects.get("epoch", self._epoch) != self._epoch:
                self._loaded = False
                raise _Reload(f"{self.name}: the consent log now holds another history; reloading it")
            event = _event(fields, event_id)
            pairing = effects.get("pairing")
            step = Step(event, makes_choice=bool(effects.get("choice")), ends=tuple(effects.get("ends", ())),
                        pairing=(pairing[0], pairing[1]) if pairing else None,
                        sets_profile_of=effects.get("profile_of"), sets_items_of=effects.get("items_of"))
            self._position = event_id
            # Own: the commit announces it (or, for a change in doubt, the service once it is settled).
            sink.apply_recorded(step, event_id, effects.get("origin") == self.origin, str(effects.get("change", "")))

    # -- the log ---------------------------------------------------------------------------------------
    async def _pages(self, reverse: bool = False) -> AsyncIterator[tuple[int, Mapping[str, str]]]:
        log_key = self.keys[1]
        bound = "+" if reverse else "-"
        while True:
            if reverse:
                page = await self._call("read log", functools.partial(self.redis.xrevrange, log_key, bound, "-",
                                                                      count=PAGE))
            else:
                page = await self._call("read log", functools.partial(self.redis.xrange, log_key, bound, "+",
                                                                      count=PAGE))
            for entry_id, fields in page:
                yield int(entry_id.split("-")[0]), fields
            if len(page) < PAGE:
                return
            bound = f"({page[-1][0]}"

    async def events(self, address: str | None, limit: int) -> list[Event]:
        found: list[Event] = []
        async for event_id, fields in self._pages(reverse=True):
            if address is None or address in (fields.get("client"), fields.get("mac")):
                found.append(_event(fields, event_id))
                if len(found) >= limit:
                    break
        return found

    async def export(self, f: EventFilter) -> AsyncIterator[Event]:
        async for event_id, fields in self._pages():
            at = float(fields["at"])
            if ((f.since is not None and at < f.since) or (f.until is not None and at >= f.until)
                    or (f.address is not None and fields.get("client") != f.address)
                    or (f.mac is not None and fields.get("mac") != f.mac)):
                continue
            yield _event(fields, event_id)

    async def purge(self, before: float, now: float) -> int:
        """Retention: trim the log's oldest entries, up to the first one that is either newer than
        `before` or the event of a choice still in force (the log is only ever cut from its start)."""
        index, log_key = self.keys[2], self.keys[1]
        in_force = [int(m) for m in await self._call("purge", lambda: self.redis.zrange(index, 0, -1))]
        keep_from = min(in_force, default=None)
        doomed, trim_at = 0, None
        async for event_id, fields in self._pages():
            if float(fields["at"]) >= before or (keep_from is not None and event_id >= keep_from):
                trim_at = event_id
                break
            doomed += 1
        if not doomed:
            return 0
        if trim_at is None:
            trim_at = int(await self._call("purge", lambda: self.redis.get(self.keys[0])) or 0) + 1
        await self._call("purge", lambda: self.redis.xtrim(log_key, minid=f"{trim_at}-0", approximate=False))
        return doomed

    # -- migration -------------------------------------------------------------------------------------
    async def restore(self, events: AsyncIterator[Event], snapshot: Snapshot) -> int:
        seq_key, log_key, index, pairings_key, epoch_key = self.keys
        if await self._call("restore", lambda: self.redis.exists(seq_key, log_key, index)):
            raise StoreError(f"{self.name}: already holds consent (keys {self.prefix}*); "
                             "migrate only into an empty store")
        copied, last = 0, 0
        batch: list[Event] = []

        async def flush() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                for e in batch:
                    pipe.xadd(log_key, encode(event_row(e)), id=f"{e.id}-0")  # type: ignore[arg-type]
                await pipe.execute()

        async for event in events:
            assert event.id is not None
            batch.append(event)
            last = max(last, event.id)
            if len(batch) >= PAGE:
                await self._call("restore", flush)
                copied += len(batch)
                batch.clear()
        if batch:
            await self._call("restore", flush)
            copied += len(batch)

        async def state() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                for c in snapshot.choices:
                    row = choice_row(c)
                    del row["id"]
                    key = f"{self.prefix}choice:{c.id}"
                    pipe.zadd(index, {str(c.id): c.expires_at})
                    pipe.hset(key, mapping=encode(row))  # type: ignore[arg-type]
                for http, dns, at in snapshot.pairings:
                    pipe.hset(pairings_key, json.dumps([http, dns]), repr(at))
                pipe.set(seq_key, max([last, *(c.id for c in snapshot.choices)]))
                pipe.set(epoch_key, secrets.token_hex(8))  # a history of its own from here on
                await pipe.execute()

        await self._call("restore", state)
        return copied

    async def durability_warning(self) -> str | None:
        """Why an acknowledged change could be lost in a crash of Redis, if it could; None if not
        (or if the server does not let us ask)."""
        try:
            config = await self.redis.config_get("append*")
        except (TimeoutError, RedisError, OSError):
            return None
        if config.get("appendonly") != "yes":
            return "Redis runs without appendonly: changes acknowledged since its last snapshot are lost if it crashes"
        if config.get("appendfsync") != "always":
            return (f"Redis runs with appendfsync {config.get('appendfsync')}: up to a second of acknowledged "
                    "changes can be lost if its machine crashes (appendfsync always closes that gap)")
        return None

    async def close(self) -> None:
        if self._loaded:
            self._remember(self._position)
        await self.redis.aclose()


def _event(fields: Mapping[str, str], event_id: int) -> Event:
    return event_from_row({**decode(fields, EVENT_COLUMNS), "id": event_id})

"""Consent shared by several dnsgate instances through Redis (`storage.store = "redis://…"`).

Keys, under `storage.redis_prefix` ("dnsgate:"):
- `log`: the consent log, an append-only Stream. Entry id `<event id>-0`; fields: the event's
  columns exactly as SQLite keeps them (`store.EVENT_COLUMNS`), plus `x`: what the event did to
  the choices in force (JSON: `ends`, `choice`, `profile_of`, `items_of`, `pairing`, `origin`), so that
  other instances can apply it. Entries are never changed; retention trims the oldest ones only.
- `seq`: the last event id.
- `choice:<id>`: a choice in force, a hash of its columns, expiring natively at the choice's expiry
  (never, for opt-outs that stand until changed).
- `choices`: a sorted set of the ids of choices in force, scored by expiry. An id leaves it only
  when an event ends its choice (expiry recorded, reset, superseded), so it outlives the hash of an
  expired choice: the expiry is recorded exactly once, by whichever instance's sweeper is first.
- `pairings`: a hash, JSON `[http key, dns key]` -> when.
- `activity`: a hash, kiosk client key -> its last DNS query seen by any instance (merged at every
  sweep), so a kiosk session is idle only when no instance has seen a query from it.

A change is one Lua script, which Redis runs alone: it checks that `seq` is still the position the
change was planned at (else `Conflict`: the service catches up and plans again), allocates event
ids, appends to the log and updates the choices. With `appendonly yes` and `appendfsync always`
Redis writes the change to disk before it answers, so an acknowledged change survives a crash.

Following: one blocking `XREAD` at a time from the last entry applied, so a change through any
instance is in force on the others a few milliseconds later. Expiries do not need Redis's key
expiry notifications (fire-and-forget pub/sub, lost while an instance is disconnected, and sent
only when Redis gets round to deleting the key): every instance's table stops applying a choice at
its expiry time by itself, and the sweeper's recorded `expiry` event removes it everywhere.

When Redis cannot be reached every call raises `StoreError` (the API answers 503); the follower
reports it, retries, and on reconnection reads the log from where it stopped, or reloads the whole
state if Redis lost or trimmed entries this instance had not seen.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .consent import UNTIL_CHANGED, Choice
from .consent_backend import ChangeSink, Conflict, Recorded, Snapshot, choices_in_order, stop_if_cancelled
from .store import (
    CHOICE_COLUMNS,
    EVENT_COLUMNS,
    Event,
    EventFilter,
    Step,
    StoreError,
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

COMMIT: Final = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
if seq ~= tonumber(ARGV[2]) then return {'conflict', tostring(seq)} end
local prefix = ARGV[1]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {'ok', ''}
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
      if tonumber(s.expires_ms) > now_ms then
        local key = prefix .. 'choice:' .. id
        redis.call('HSET', key, unpack(s.choice))
        redis.call('PEXPIREAT', key, s.expires_ms)
      end
    end
    if s.profile_of then
      local key = prefix .. 'choice:' .. s.profile_of
      if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'profile', s.profile) end
    end
    if s.items_of then
      local key = prefix .. 'choice:' .. s.items_of
      if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'items', s.items, 'terms', s.terms) end
    end
    if s.pairing then redis.call('HSET', KEYS[4], s.pairing, s.at) end
    redis.call('XADD', KEYS[2], id .. '-0', unpack(s.fields))
  end
  out[i + 2] = id
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


class RedisBackend:
    """The consent store in Redis (see the module docstring); one per dnsgate instance."""

    shared = True

    def __init__(self, url: str, prefix: str = "dnsgate:", timeout: float = 2.0,
                 client: aioredis.Redis | None = None) -> None:
        self.name = redact(url)
        self.prefix = prefix
        self.keys = (prefix + "seq", prefix + "log", prefix + "choices", prefix + "pairings")
        self.redis = client or aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # the follower retries; a change must fail fast (503), not hang
            client_name="dnsgate")
        self.block_ms = max(50, min(FOLLOW_BLOCK_MS, int(timeout * 500)))
        self.origin = secrets.token_hex(8)  # tells this instance's own changes apart in the log
        self._position = 0
        self._loaded = False

    @property
    def position(self) -> int:
        return self._position

    async def _call(self, what: str, op: Callable[[], Any], *, again: bool = True) -> Any:
        """Run one operation; StoreError if Redis cannot do it. A dropped connection (Redis restarted,
        a proxy closed an idle one) empties the pool, and a read (`again`) is tried once more on a fresh
        connection. A change is not: Redis may have applied it before the connection dropped."""
        for attempt in (1, 2):
            try:
                return await op()
            except (RedisConnectionError, OSError) as exc:
                await self.redis.connection_pool.disconnect()
                if attempt == 2 or not again:
                    raise StoreError(f"{self.name}: {what}: {exc or type(exc).__name__}") from exc
            except (RedisError, TimeoutError) as exc:
                raise StoreError(f"{self.name}: {what}: {exc or type(exc).__name__}") from exc
        raise AssertionError("unreachable")

    # -- reading the state ---------------------------------------------------------------------------
    async def load(self) -> Snapshot:
        """The choices in force and the pairings; this instance follows the log from here on."""
        seq, _, index, pairings_key = self.keys
        position = int(await self._call("load", lambda: self.redis.get(seq)) or 0)
        members: list[tuple[str, float]] = await self._call("load", lambda: self.redis.zrange(index, 0, -1,
                                                                                              withscores=True))
        choices: list[Choice] = []
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
                # Expired (Redis dropped the hash) but its expiry is not recorded yet: the event that
                # made the choice says what it was, so the sweeper can record the expiry.
                made = await self._entry(choice_id)
                if made is not None and made.expires_at is not None:
                    choices.append(made.as_choice(choice_id))
                else:
                    log.warning("consent store %s: choice #%d has neither a hash nor its event; skipped",
                                self.name, choice_id)
        raw_pairs: dict[str, str] = await self._call("load", lambda: self.redis.hgetall(pairings_key))
        pairs = [(*json.loads(k), float(v)) for k, v in raw_pairs.items()]
        self._position = max(self._position, position) if self._loaded else position
        self._loaded = True
        return Snapshot(choices_in_order(choices), pairs)

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
    async def commit(self, steps: Sequence[Step], based_on: int) -> Recorded:
        payload = json.dumps([self._step_args(s) for s in steps], separators=(",", ":"))
        result = await self._call("commit", lambda: self.redis.eval(COMMIT, 4, *self.keys, self.prefix,
                                                                    str(based_on), payload), again=False)
        if result[0] == "conflict":
            raise Conflict(f"{self.name}: the log is at {result[1]}, this change was planned at {based_on}")
        ids = [int(i) or None for i in result[2:]]
        # The follower may have applied these entries (in log order) while the answer was on its way.
        recorded = Recorded(ids, in_force_up_to=self._position)
        self._position = max(self._position, int(result[1]))
        return recorded

    def _step_args(self, s: Step) -> dict[str, Any]:
        e = s.event
        effects: dict[str, Any] = {"ends": s.ends, "choice": s.makes_choice, "origin": self.origin}
        args: dict[str, Any] = {"ends": [str(i) for i in s.ends]}
        if s.only_if_current is not None:
            args["only_if_current"] = str(s.only_if_current)
        if s.makes_choice:
            assert e.expires_at is not None
            choice = e.as_choice(0)
            row = choice_row(choice)
            del row["id"]
            kept = UNTIL_CHANGED if choice.standing else e.expires_at  # standing refusals outlive the grants
            args.update(choice=flat(encode(row)), expires=repr(e.expires_at), expires_ms=str(math.ceil(kept * 1000)))
        if s.sets_profile_of is not None:
            args.update(profile_of=str(s.sets_profile_of), profile=e.profile)
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
        while True:
            entries = await self._call("catch up", lambda: self.redis.xrange(
                self.keys[1], f"({self._position}-0", "+", count=PAGE))
            self._apply(entries, sink)
            if len(entries) < PAGE:
                return

    async def follow(self, sink: ChangeSink) -> None:
        """Apply other instances' changes as they are logged, for ever; reconnect after outages."""
        problem = "" if self._loaded else "not loaded yet"
        wait = RETRY_MIN
        while True:
            stop_if_cancelled()
            try:
                if not self._loaded:
                    sink.replace_all(await self.load())
                elif problem:
                    await self._resume(sink)
                if problem:
                    problem = ""
                    sink.store_health("")
                    wait = RETRY_MIN
                found = await self._call("follow", lambda: self.redis.xread(
                    {self.keys[1]: f"{self._position}-0"}, count=PAGE, block=self.block_ms))
                for _stream, entries in found or ():
                    self._apply(entries, sink)
            except StoreError as exc:
                if str(exc) != problem:
                    problem = str(exc)
                    sink.store_health(problem)
                await asyncio.sleep(wait)
                wait = min(wait * 2, RETRY_MAX)

    async def _resume(self, sink: ChangeSink) -> None:
        """Back after an outage: read on from `position`, unless Redis no longer has those entries
        (it lost data, or retention trimmed them): then take the whole state again."""
        seq_key, log_key = self.keys[0], self.keys[1]
        seq = int(await self._call("resume", lambda: self.redis.get(seq_key)) or 0)
        trimmed = 0
        if await self._call("resume", lambda: self.redis.exists(log_key)):
            info = await self._call("resume", lambda: self.redis.xinfo_stream(log_key))
            trimmed = int(str(info.get("max-deleted-entry-id", "0-0")).split("-")[0])
        if seq < self._position or trimmed > self._position:
            log.warning("consent store %s: the log no longer has the changes after #%d (Redis lost or trimmed "
                        "them); reloading every choice", self.name, self._position)
            self._loaded = False
            sink.replace_all(await self.load())

    def _apply(self, entries: Sequence[tuple[str, Mapping[str, str]]], sink: ChangeSink) -> None:
        for entry_id, fields in entries:
            event_id = int(entry_id.split("-")[0])
            if event_id <= self._position:
                continue  # applied already (this instance's own change, or read twice)
            effects = json.loads(fields.get("x", "{}"))
            event = _event(fields, event_id)
            pairing = effects.get("pairing")
            step = Step(event, makes_choice=bool(effects.get("choice")), ends=tuple(effects.get("ends", ())),
                        pairing=(pairing[0], pairing[1]) if pairing else None,
                        sets_profile_of=effects.get("profile_of"), sets_items_of=effects.get("items_of"))
            self._position = event_id
            sink.apply_recorded(step, event_id, effects.get("origin") == self.origin)

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
        seq_key, log_key, index, pairings_key = self.keys
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
                    pipe.pexpireat(key, math.ceil(c.expires_at * 1000))
                for http, dns, at in snapshot.pairings:
                    pipe.hset(pairings_key, json.dumps([http, dns]), repr(at))
                pipe.set(seq_key, max([last, *(c.id for c in snapshot.choices)]))
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
        await self.redis.aclose()


def _event(fields: Mapping[str, str], event_id: int) -> Event:
    return event_from_row({**decode(fields, EVENT_COLUMNS), "id": event_id})

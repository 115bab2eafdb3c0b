"""Structured logs: one line per event, as `key=value` text or as a JSON object.

dnsgate logs starts, stops, its configuration and every consent change at info; nothing per query
(the query log and /metrics are for that). Messages are written as `what: key=value ...`, so the
text form reads well and the JSON form carries the same words in "msg".
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import TextIO

_RESERVED = frozenset(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RESERVED and k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Configure the root logger (replacing earlier handlers: the config may change the format)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp logs every request at info on its access logger; dnsgate turns access logs off.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

"""One reading of a point in time for every `--since`/`--until` and every `since`/`until` of the API
(the consent log's export, the query log, the evidence report): ISO 8601 (`2026-11-28`,
`2026-11-28T10:00:00Z`, `…+01:00`; naive means UTC), UNIX seconds (`1795860000`), or an age before
`now` (`90s`, `15m`, `2h`, `7d`, `1.5d`). Pure: the caller gives the clock."""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Final

AGE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FORMS: Final = "ISO 8601 (2026-11-28 or 2026-11-28T10:00:00Z), UNIX seconds, or an age such as 15m, 2h or 7d"


def parse_when(text: str, now: float) -> float:
    """UNIX seconds for `text`; ValueError naming the accepted forms."""
    text = text.strip()
    age = AGE.fullmatch(text)
    if age:
        return now - float(age[1]) * UNITS[age[2]]
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
        raise ValueError(f"expected {FORMS}, got {text!r}")
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected {FORMS}, got {text!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()

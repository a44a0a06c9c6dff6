"""When a failed request is retried and how long to wait first: the openai SDK's rules.

The builder posts over its own lean HTTP path (teacher_client.py), so it cannot use the
SDK's retry loop, but it keeps the SDK's decisions exactly (openai 3.54,
`_base_client.BaseClient._should_retry`, `_calculate_retry_timeout` and
`_parse_retry_after_header`; tests compare the two on the same responses): retry
connection errors, timeouts, 408, 409, 429 and 5xx unless `x-should-retry` says
otherwise; honour `retry-after-ms` / `Retry-After` (seconds or an HTTP date) up to two
minutes, refuse to retry when the server asks for longer, else back off
0.5 s x 2^retries up to 8 s, less up to 25% jitter.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Mapping

INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER_DELAY = 120.0
RETRIED_STATUSES = frozenset({408, 409, 429})
INFINITY_WORDS = frozenset({"inf", "+inf", "infinity", "+infinity"})


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked to wait (`retry-after-ms`, then `Retry-After`), or None."""
    for header, divisor in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            delay = float(value)
        except ValueError:
            continue
        if delay == math.inf and value.strip().lower() not in INFINITY_WORDS:
            return MAX_RETRY_AFTER_DELAY + 1
        return delay / divisor
    try:
        parsed = email.utils.parsedate_tz(headers.get("retry-after"))
        if parsed is None:
            return None
        return float(email.utils.mktime_tz(parsed) - time.time())
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """Whether an error status is worth another attempt."""
    wait = retry_after(headers)
    if wait is not None and math.isfinite(wait) and wait > MAX_RETRY_AFTER_DELAY:
        return False
    explicit = headers.get("x-should-retry")
    if explicit in ("true", "false"):
        return explicit == "true"
    return status in RETRIED_STATUSES or status >= 500


def retry_delay(retries_taken: int, headers: Mapping[str, str] | None = None) -> float:
    """Seconds to wait before retry number `retries_taken + 1`."""
    wait = retry_after(headers) if headers is not None else None
    if wait is not None and math.isfinite(wait) and 0 < wait <= MAX_RETRY_AFTER_DELAY:
        return wait
    backoff = min(INITIAL_RETRY_DELAY * 2.0 ** min(retries_taken, 1000), MAX_RETRY_DELAY)
    return max(0.0, backoff * (1 - 0.25 * random.random()))

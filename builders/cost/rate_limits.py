"""Keeping a build under an account's rate limits, and backing off when the server says so.

OpenAI limits requests and tokens per minute; a build that ignores them spends its
time in 429s and retries. Before a request goes out, `RateLimiter.acquire` waits for
a slot of the (adaptive) concurrency and for room in the requests-per-minute and
tokens-per-minute buckets, charging the request's *estimated* tokens; `release`
corrects the charge with the tokens `usage` reports. `observe` reads what the server
says about every HTTP attempt: a 429's `Retry-After` pauses every slot (not just the
one request the client retries), the `x-ratelimit-remaining-*` / `x-ratelimit-reset-*`
headers bring the buckets in line with the server's own count (and teach the limiter
an account limit nobody typed in), and a 429 halves the concurrency, which then grows
back by one slot per window of successes (AIMD, as TCP does).

Waiters queue first-come first-served and only the head of the queue watches the
clock, so a release wakes one coroutine, not every one in flight. The waiting is
hand-written because no library bucket can be corrected after the fact or re-synced
from response headers (aiolimiter's leaky bucket only ever takes).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from domainbed_reasoning.builders.transport.retry_policy import retry_after

from domainbed_reasoning.errors import UserError

DECREASE = 0.5
DEFAULT_PAUSE_S = 1.0
MAX_PAUSE_S = 600.0
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
KINDS = ("requests", "tokens")
HEADERS = {
    kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for kind in KINDS
}


@dataclass(frozen=True)
class RateLimits:
    """`--max-requests-per-minute` and `--max-tokens-per-minute`; None is no limit of ours."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def __post_init__(self) -> None:
        for flag, value in (
            ("--max-requests-per-minute", self.requests_per_minute),
            ("--max-tokens-per-minute", self.tokens_per_minute),
        ):
            if value is not None and value <= 0:
                raise UserError(f"{flag} {value:g}: must be more than 0 (leave it out for no limit)")

    def divided(self, parts: int) -> RateLimits:
        """Each of `parts` client processes keeps to its share, so together they keep the whole."""
        return RateLimits(
            *(None if value is None else value / parts for value in (self.requests_per_minute, self.tokens_per_minute))
        )


def parse_duration(text: str | None) -> float | None:
    """Seconds in OpenAI's reset format (`1s`, `6m0s`, `20ms`, `1h2m3.5s`) or a plain number."""
    if text is None:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = DURATION_PART.findall(text)
    if not parts or "".join(value + unit for value, unit in parts) != text:
        return None
    return sum(float(value) * UNIT_SECONDS[unit] for value, unit in parts)


def pause_for(headers: Mapping[str, str]) -> float:
    """How long a 429 pauses every slot: the server's Retry-After, read as the retry policy
    reads it; a 429 without a wait to honour (none, zero, a date already past) still pauses
    for a default second, or every slot would hit the limit again at once."""
    wait = retry_after(headers)
    return wait if wait is not None and wait > 0 else DEFAULT_PAUSE_S


def header_number(headers: Mapping[str, str], name: str) -> float | None:
    try:
        return float(headers[name])
    except (KeyError, ValueError):
        return None


class Bucket:
    """`per_minute` units a minute, refilled continuously, holding one second's worth: servers
    enforce a per-minute limit over shorter periods too, so a full minute's burst would be
    refused. A charge corrected upwards can leave it in debt (below zero), which later
    requests wait out."""

    def __init__(self, per_minute: float, now: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, amount: float, now: float) -> float:
        """Seconds until `amount` fits (one bigger than the bucket waits for a full one)."""
        self.refill(now)
        return max(0.0, (min(amount, self.capacity) - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount

    def cap(self, remaining: float, now: float) -> None:
        """The server counted more than we did: believe it."""
        self.refill(now)
        self.level = min(self.level, remaining)


class AdaptiveConcurrency:
    """At most `limit` requests in flight: halved on a 429 (once per round trip: only a
    request sent after the last cut can cut again), one more per `limit` successes."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.limit = float(ceiling)
        self.lowest = float(ceiling)
        self.last_cut = -math.inf

    @property
    def slots(self) -> int:
        return max(1, int(self.limit))

    def throttled(self, sent_at: float, now: float) -> None:
        if sent_at >= self.last_cut:
            self.limit = max(1.0, self.limit * DECREASE)
            self.lowest = min(self.lowest, self.limit)
            self.last_cut = now

    def succeeded(self) -> None:
        self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)


@dataclass(frozen=True)
class Permit:
    tokens: float
    sent_at: float


@dataclass
class LimiterStats:
    requests: int = 0
    throttled: int = 0
    paused_s: float = 0.0


class RateLimiter:
    """Use as: `permit = await acquire(estimate)`, `observe(permit, status, headers)` for
    each HTTP attempt, `release(permit, used_tokens)` once the request is over."""

    def __init__(
        self,
        limits: RateLimits,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        now = clock()
        self.concurrency = AdaptiveConcurrency(concurrency)
        per_minute = dict(zip(KINDS, (limits.requests_per_minute, limits.tokens_per_minute), strict=True))
        self.buckets = {kind: Bucket(value, now) for kind, value in per_minute.items() if value}
        self.paused_until = now
        self.in_flight = 0
        self.stats = LimiterStats()
        self._queue: deque[asyncio.Future[None]] = deque()
        self._nudge: asyncio.Future[None] | None = None

    def delay(self, tokens: float, now: float) -> float:
        """Seconds before a request of `tokens` may go; inf while every slot is taken."""
        if self.in_flight >= self.concurrency.slots:
            return math.inf
        waits = [self.paused_until - now]
        if bucket := self.buckets.get("requests"):
            waits.append(bucket.delay(1, now))
        if bucket := self.buckets.get("tokens"):
            waits.append(bucket.delay(tokens, now))
        return max(0.0, *waits)

    async def acquire(self, tokens: float) -> Permit:
        if not self._queue and self.delay(tokens, self.clock()) == 0:
            return self._take(tokens)  # the common case: no queue, no future
        loop = asyncio.get_running_loop()
        ticket = loop.create_future()
        self._queue.append(ticket)
        if self._queue[0] is ticket:
            ticket.set_result(None)
        try:
            await ticket
            while (wait := self.delay(tokens, self.clock())) > 0:
                self._nudge = loop.create_future()
                await asyncio.wait({self._nudge}, timeout=None if math.isinf(wait) else wait)
        finally:
            head = self._queue[0] is ticket
            self._queue.remove(ticket)
            if head and self._queue and not self._queue[0].done():
                self._queue[0].set_result(None)
        return self._take(tokens)

    def _take(self, tokens: float) -> Permit:
        now = self.clock()
        for kind, amount in zip(KINDS, (1, tokens), strict=True):
            if bucket := self.buckets.get(kind):
                bucket.take(amount)
        self.in_flight += 1
        self.stats.requests += 1
        return Permit(tokens, now)

    def _poke(self) -> None:
        if self._nudge is not None and not self._nudge.done():
            self._nudge.set_result(None)

    def pause(self, seconds: float, now: float) -> None:
        until = now + min(seconds, MAX_PAUSE_S)
        if until > self.paused_until:
            self.stats.paused_s += until - max(now, self.paused_until)
            self.paused_until = until

    def observe(self, permit: Permit, status: int, headers: Mapping[str, str]) -> None:
        """What one HTTP attempt's answer says about the limits (header names in lower case)."""
        now = self.clock()
        for kind, names in HEADERS.items():
            if names[1] in headers or names[0] in headers:
                self._sync(kind, names, headers, now)
        if status == 429:
            self.stats.throttled += 1
            self.concurrency.throttled(permit.sent_at, now)
            self.pause(pause_for(headers), now)
        self._poke()

    def _sync(
        self, kind: str, names: tuple[str, str, str], headers: Mapping[str, str], now: float
    ) -> None:
        limit_name, remaining_name, reset_name = names
        limit = header_number(headers, limit_name)
        remaining = header_number(headers, remaining_name)
        reset = parse_duration(headers.get(reset_name))
        bucket = self.buckets.get(kind)
        if limit and (bucket is None or limit < bucket.per_minute):
            bucket = self.buckets[kind] = Bucket(limit, now)
        if bucket is not None and remaining is not None:
            bucket.cap(remaining, now)
        if remaining is not None and remaining < 1 and reset:
            self.pause(reset, now)

    def release(self, permit: Permit, used_tokens: int | None) -> None:
        """The request is over: correct its token charge (given back when it got no answer)."""
        self.in_flight -= 1
        if bucket := self.buckets.get("tokens"):
            bucket.take((used_tokens or 0) - permit.tokens)
        if used_tokens is not None:
            self.concurrency.succeeded()
        self._poke()

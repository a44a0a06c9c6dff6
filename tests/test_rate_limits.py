"""The client-side rate limiter: buckets, Retry-After, OpenAI's headers, AIMD concurrency."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest
from domainbed_reasoning.builders.cost.rate_limits import (
    DEFAULT_PAUSE_S,
    AdaptiveConcurrency,
    Bucket,
    Permit,
    RateLimiter,
    RateLimits,
    parse_duration,
    pause_for,
)

from domainbed_reasoning.errors import UserError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def permit(clock: Clock) -> Permit:
    return Permit(tokens=10, sent_at=clock.now)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.25", 0.25), ("soon", None), (None, None)],
)
def test_reset_durations_in_openais_format(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_a_429_pauses_for_retry_after_read_as_the_retry_policy_reads_it() -> None:
    assert pause_for({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert pause_for({"retry-after": "3"}) == 3.0
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert pause_for({"retry-after": soon}) == pytest.approx(30, abs=2)
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert pause_for({"retry-after": past}) == DEFAULT_PAUSE_S
    assert pause_for({}) == DEFAULT_PAUSE_S


def test_limits_are_checked_and_divided_between_processes() -> None:
    with pytest.raises(UserError, match="--max-tokens-per-minute 0"):
        RateLimits(tokens_per_minute=0)
    assert RateLimits(600, 90_000).divided(3) == RateLimits(200, 30_000)
    assert RateLimits(None, 90_000).divided(2) == RateLimits(None, 45_000)


def test_a_bucket_holds_one_seconds_worth_and_can_go_into_debt() -> None:
    bucket = Bucket(per_minute=600, now=0.0)  # 10 a second
    assert bucket.capacity == 10 and bucket.delay(10, 0.0) == 0.0
    bucket.take(10)
    assert bucket.delay(1, 0.0) == pytest.approx(0.1)
    bucket.take(5)  # usage came back higher than the estimate
    assert bucket.delay(1, 0.0) == pytest.approx(0.6)
    assert bucket.delay(50, 10.0) == 0.0  # a request bigger than the bucket waits for a full one only
    bucket.cap(2, 10.0)
    assert bucket.level == 2


def test_concurrency_halves_once_per_round_trip_and_grows_back() -> None:
    gate = AdaptiveConcurrency(64)
    gate.throttled(sent_at=1.0, now=2.0)
    assert gate.slots == 32
    gate.throttled(sent_at=1.5, now=2.1)  # sent before the cut: the same storm, no second cut
    assert gate.slots == 32
    gate.throttled(sent_at=2.2, now=3.0)
    assert gate.slots == 16 and gate.lowest == 16
    for _ in range(17):  # one slot more per window of `limit` successes
        gate.succeeded()
    assert gate.slots == 17
    for _ in range(10_000):
        gate.succeeded()
    assert gate.slots == 64


def test_delay_follows_the_buckets_and_pauses() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(requests_per_minute=60, tokens_per_minute=6000), 8, clock)
    assert limiter.delay(100, clock.now) == 0.0
    limiter.buckets["tokens"].take(100)
    assert limiter.delay(50, clock.now) == pytest.approx(0.5)  # 100 tokens a second
    limiter.pause(2.0, clock.now)
    assert limiter.delay(1, clock.now) == pytest.approx(2.0)
    clock.now += 2.0
    assert limiter.delay(1, clock.now) == 0.0


def test_headers_teach_and_correct_the_limits() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(), 8, clock)
    permit_headers = {
        "x-ratelimit-limit-requests": "120",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1.5s",
        "x-ratelimit-limit-tokens": "60000",
        "x-ratelimit-remaining-tokens": "59000",
        "x-ratelimit-reset-tokens": "6ms",
    }
    limiter.observe(permit(clock), 200, permit_headers)
    assert limiter.buckets["requests"].per_minute == 120 and limiter.buckets["tokens"].per_minute == 60_000
    assert limiter.buckets["requests"].level == 0
    assert limiter.delay(1, clock.now) == pytest.approx(1.5)  # nothing remains until the reset


def test_a_429_pauses_everyone_and_cuts_concurrency() -> None:
    clock = Clock()
    limiter = RateLimiter(RateLimits(), 10, clock)
    limiter.observe(permit(clock), 429, {"retry-after": "3"})
    assert limiter.stats.throttled == 1 and limiter.concurrency.slots == 5
    assert limiter.delay(1, clock.now) == pytest.approx(3.0)
    limiter.observe(permit(clock), 429, {})  # no Retry-After: a default pause
    assert limiter.paused_until == pytest.approx(clock.now + 3.0)


async def test_pacing_at_the_requests_per_minute_limit() -> None:
    limiter = RateLimiter(RateLimits(requests_per_minute=1200), 64)  # 20 a second, 20 at once
    start = time.monotonic()

    async def one() -> None:
        permit = await limiter.acquire(0)
        limiter.release(permit, 1)

    await asyncio.gather(*(one() for _ in range(40)))
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 3.0, elapsed  # 20 at once, then 20 more at 20/s


async def test_a_slot_freed_wakes_the_next_waiter_in_order() -> None:
    limiter = RateLimiter(RateLimits(), 1)
    first = await limiter.acquire(0)
    order: list[int] = []

    async def waiter(index: int) -> None:
        permit = await limiter.acquire(0)
        order.append(index)
        limiter.release(permit, 1)

    waiters = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert order == [] and limiter.in_flight == 1
    waiters[1].cancel()  # a waiter given up on leaves the queue without blocking it
    limiter.release(first, 1)
    await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 2.0)
    assert order == [0, 2] and limiter.in_flight == 0


async def test_usage_above_the_estimate_delays_the_next_request() -> None:
    limiter = RateLimiter(RateLimits(tokens_per_minute=60_000), 8)  # 1,000 tokens a second
    permit = await limiter.acquire(100)
    limiter.release(permit, 1_600)  # the answer was long: 600 tokens of debt
    assert limiter.delay(1, time.monotonic()) == pytest.approx(0.601, abs=0.05)
    refund = await limiter.acquire(0)
    limiter.release(refund, None)  # no answer: its estimate is given back
    assert limiter.concurrency.limit == 8

"""The budget: measured spend per mode, reservations for requests in flight, a clean stop."""

from __future__ import annotations

import asyncio

import polars as pl
import pytest
from domainbed_reasoning.builders.cost.budget import Budget, spend_by_mode
from domainbed_reasoning.builders.cost.pacing import BudgetSpent, Pacing, RunningUsage
from domainbed_reasoning.builders.cost.pricing import resolve_price

from domainbed_reasoning.errors import UserError


def test_spend_prices_each_mode_at_its_own_price() -> None:
    requests = pl.DataFrame(
        {
            "prompt_tokens": [1_000_000, 1_000_000],
            "completion_tokens": [100_000, 100_000],
            "mode": ["online", "batch"],
        }
    )
    online = resolve_price("gpt-4o", None, None, batch=False)
    batch = resolve_price("gpt-4o", None, None, batch=True)
    spend = spend_by_mode(requests, {"online": online, "batch": batch})
    assert spend["usd"] == pytest.approx((2.5 + 1.0) * 1.5)
    assert spend["by_mode"]["batch"] == {"requests": 1, "prompt": 1_000_000, "completion": 100_000, "usd": 1.75}
    unknown = spend_by_mode(requests.with_columns(mode=pl.lit(None, pl.String)), {"online": None})
    assert unknown["usd"] is None and unknown["by_mode"]["online"]["requests"] == 2


async def test_reservations_hold_back_requests_that_would_pass_the_budget() -> None:
    budget = Budget(limit_usd=1.0)
    assert await budget.reserve(0.4) and await budget.reserve(0.4)
    third = asyncio.create_task(budget.reserve(0.4))  # would pass 1.0 beside the two in flight
    await asyncio.sleep(0.01)
    assert not third.done()
    budget.settle(0.4, 0.3)
    budget.settle(0.4, 0.3)
    assert await asyncio.wait_for(third, 1.0)  # 0.6 spent + 0.4 fits
    budget.settle(0.4, 0.5)
    assert budget.exhausted and budget.spent_usd == pytest.approx(1.1)
    assert not await budget.reserve(0.01)


async def test_a_lone_request_may_reach_the_budget() -> None:
    budget = Budget(limit_usd=1.0, spent_usd=0.9)
    assert await budget.reserve(0.5)  # nothing in flight: it goes, and the budget is reached
    budget.settle(0.5, 0.5)
    assert not await budget.reserve(0.5)
    assert "nothing was sent" in budget.spent_line("runs/chains/PACS")


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(UserError, match="--budget-usd 0"):
        Budget(0)


def test_running_usage_follows_the_measured_means() -> None:
    usage = RunningUsage(prompt_tokens=500)
    assert usage.tokens(4) == 500 + 4 * 400  # before anything is measured: the assumption
    usage.update(prompt_tokens=600, completion_tokens=1200, answers=4)
    usage.update(prompt_tokens=800, completion_tokens=2000, answers=4)
    assert (usage.prompt_tokens, usage.answer_tokens) == (700, 400)


async def test_pacing_measures_spend_and_stops_at_the_budget() -> None:
    price = resolve_price("gpt-4o", None, None, batch=False)
    pacing = Pacing(RunningUsage(prompt_tokens=1_000_000, answer_tokens=0), 1, price, Budget(limit_usd=5.0))
    estimate = await pacing.reserve()
    assert estimate == pytest.approx(2.5)
    pacing.settle(estimate, prompt_tokens=1_000_000, completion_tokens=300_000)  # $2.50 + $3.00
    assert pacing.spend.usd == pytest.approx(5.5) and pacing.spend.completion_tokens == 300_000
    assert pacing.usage.answer_tokens == 300_000
    with pytest.raises(BudgetSpent):
        await pacing.reserve()
    assert await Pacing(RunningUsage(100), 4).acquire() is None  # no limits: nothing to wait for

"""Whether and when the next teacher request may go: the budget, the rate limits, the estimate.

One object per client process ties them together for the HTTP path. Before a request,
its cost is estimated from the usage seen so far (a running mean, seeded by the answers
already in the store) and reserved against `--budget-usd`; before each HTTP attempt, the
rate limiter is asked for a slot with the request's token estimate; after it, the
limiter reads the answer's headers and the reply's `usage` corrects every estimate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from domainbed_reasoning.builders.cost.budget import Budget
from domainbed_reasoning.builders.cost.dry_run import ASSUMED_ANSWER_TOKENS
from domainbed_reasoning.builders.cost.pricing import Price
from domainbed_reasoning.builders.cost.rate_limits import Permit, RateLimiter, RateLimits


class BudgetSpent(Exception):
    """The budget is spent: the build stops taking new requests, and says so once."""


@dataclass
class RunningUsage:
    """Mean prompt tokens per request and completion tokens per answer, from `usage`."""

    prompt_tokens: float
    answer_tokens: float = float(ASSUMED_ANSWER_TOKENS)
    requests: int = 0

    def tokens(self, answers: int) -> float:
        return self.prompt_tokens + answers * self.answer_tokens

    def update(self, prompt_tokens: int, completion_tokens: int, answers: int) -> None:
        self.requests += 1
        weight = 1 / self.requests
        self.prompt_tokens += weight * (prompt_tokens - self.prompt_tokens)
        self.answer_tokens += weight * (completion_tokens / max(answers, 1) - self.answer_tokens)


@dataclass
class Spend:
    """Tokens and dollars measured by this process, for the progress bar."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    @classmethod
    def total(cls, spends: Iterable[Spend]) -> Spend:
        spends = list(spends)
        return cls(
            sum(s.prompt_tokens for s in spends),
            sum(s.completion_tokens for s in spends),
            sum(s.usd for s in spends),
        )

    def describe(self) -> str:
        tokens = f"{(self.prompt_tokens + self.completion_tokens) / 1e6:.2f}M tokens"
        return f"{tokens}, ${self.usd:,.2f}" if self.usd else tokens


@dataclass(frozen=True)
class PacingPlan:
    """What each client process builds its Pacing from; `--workers` processes split the
    budget and the rate limits evenly, as they split the concurrency."""

    usage: RunningUsage
    answers: int
    concurrency: int
    price: Price | None = None
    budget_left_usd: float | None = None
    limits: RateLimits = field(default_factory=RateLimits)

    def divided(self, parts: int, concurrency: int) -> PacingPlan:
        left = None if self.budget_left_usd is None else self.budget_left_usd / parts
        return replace(
            self, concurrency=concurrency, budget_left_usd=left, limits=self.limits.divided(parts)
        )

    def build(self) -> Pacing:
        budget = None if self.budget_left_usd is None else Budget(max(self.budget_left_usd, 1e-9))
        limiter = RateLimiter(self.limits, self.concurrency)
        return Pacing(replace(self.usage), self.answers, self.price, budget, limiter)


class Pacing:
    def __init__(
        self,
        usage: RunningUsage,
        answers: int,
        price: Price | None = None,
        budget: Budget | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.usage = usage
        self.answers = answers
        self.price = price
        self.budget = budget
        self.limiter = limiter
        self.spend = Spend()

    def estimated_usd(self) -> float:
        if self.price is None:
            return 0.0
        return self.price.cost(self.usage.prompt_tokens, self.answers * self.usage.answer_tokens)

    async def reserve(self) -> float:
        """Reserve one request's estimated cost; BudgetSpent once the budget is gone."""
        estimate = self.estimated_usd()
        if self.budget is not None and not await self.budget.reserve(estimate):
            raise BudgetSpent
        return estimate

    async def acquire(self) -> Permit | None:
        if self.limiter is None:
            return None
        return await self.limiter.acquire(self.usage.tokens(self.answers))

    def observe(self, permit: Permit | None, status: int, headers: Mapping[str, str]) -> None:
        if permit is not None:
            self.limiter.observe(permit, status, headers)

    def release(self, permit: Permit | None, used_tokens: int | None) -> None:
        if permit is not None:
            self.limiter.release(permit, used_tokens)

    def settle(self, estimate: float, prompt_tokens: int, completion_tokens: int) -> None:
        """A request is over (tokens 0 when it got no answer): measure it, correct the estimates."""
        cost = self.price.cost(prompt_tokens, completion_tokens) if self.price else 0.0
        if completion_tokens:
            self.usage.update(prompt_tokens, completion_tokens, self.answers)
        self.spend.prompt_tokens += prompt_tokens
        self.spend.completion_tokens += completion_tokens
        self.spend.usd += cost
        if self.budget is not None:
            self.budget.settle(estimate, cost)

"""`--budget-usd`: what this output folder has spent on the teacher, and whether to send more.

The spend is measured, never estimated: the `usage` of every answered request in the
candidate store, priced per mode (the Batch API bills half). It covers every run that
wrote to the folder, so a re-run with the same budget sends nothing once it is spent.
Before a request goes out its estimated cost is reserved, so the requests in flight
cannot together carry the spend far past the budget; the answer's `usage` then
replaces the reservation.
"""

from __future__ import annotations

import asyncio

import polars as pl
from domainbed_reasoning.builders.cost.pricing import MODES, Price

from domainbed_reasoning.errors import UserError


def spend_by_mode(requests: pl.DataFrame, prices: dict[str, Price | None]) -> dict:
    """Requests, tokens and dollars per mode of `requests` (one row per answered request:
    prompt_tokens, completion_tokens, mode; a null mode is online, as stores before modes
    were). `usd` is None where the mode's price is unknown, and in the total if any is."""
    modes = requests.with_columns(pl.col("mode").fill_null("online"))
    rows = {}
    for mode in MODES:
        chosen = modes.filter(pl.col("mode") == mode)
        if chosen.is_empty():
            continue
        prompt, completion = int(chosen["prompt_tokens"].sum()), int(chosen["completion_tokens"].sum())
        price = prices.get(mode)
        usd = None if price is None else round(price.cost(prompt, completion), 4)
        rows[mode] = {"requests": chosen.height, "prompt": prompt, "completion": completion, "usd": usd}
    costs = [row["usd"] for row in rows.values()]
    total = None if None in costs else round(sum(costs), 4)
    return {"by_mode": rows, "usd": total}


class Budget:
    """The folder's spend against `limit_usd`, with the estimates of requests in flight reserved."""

    def __init__(self, limit_usd: float, spent_usd: float = 0.0) -> None:
        if limit_usd <= 0:
            raise UserError(f"--budget-usd {limit_usd:g}: must be more than 0 dollars")
        self.limit_usd = limit_usd
        self.spent_usd = spent_usd
        self.reserved_usd = 0.0
        self._settled: asyncio.Event | None = None

    @property
    def exhausted(self) -> bool:
        return self.spent_usd >= self.limit_usd

    async def reserve(self, estimate_usd: float) -> bool:
        """Reserve a request's estimated cost; False once the budget is spent. A request that
        would not fit beside those in flight waits for them (alone, it may go: the budget is
        reached, not feared)."""
        while not self.exhausted:
            fits = self.spent_usd + self.reserved_usd + estimate_usd <= self.limit_usd
            if fits or not self.reserved_usd:
                self.reserved_usd += estimate_usd
                return True
            self._settled = self._settled or asyncio.Event()
            await self._settled.wait()
        return False

    def settle(self, estimate_usd: float, actual_usd: float) -> None:
        """A request is over: its measured cost replaces its reservation."""
        self.reserved_usd = max(0.0, self.reserved_usd - estimate_usd)
        self.spent_usd += actual_usd
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def spent_line(self, folder: str) -> str:
        return (
            f"budget spent: ${self.spent_usd:,.2f} of --budget-usd {self.limit_usd:,.2f} already "
            f"went to the teacher for {folder}; nothing was sent. Raise --budget-usd to go on"
        )

"""`--dry-run`: what a build would send and cost, before a single request goes out.

Requests come as a range: every pending image needs at least one more request, and
at most its remaining rounds. Tokens per request come from answers already measured
in this output folder (a `--limit` trial is the way to get them), else from the
token_estimate.py counts; the completion length is assumed until it is measured, and
bounded by `--max-tokens`. The cost needs a price (pricing.py): without one the
estimate says so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from domainbed_reasoning.builders.cost.pricing import Price, unknown_price_note
from domainbed_reasoning.builders.cost.token_estimate import (
    openai_image_tokens,
    processor_prompt_tokens,
    sent_size,
    text_tokens,
    tile_cost,
)

from domainbed_reasoning.chains.rules import RejectReason

ASSUMED_ANSWER_TOKENS = 400  # a five-stage chain of a few sentences per stage
LEFT_OUT = (
    "Left out: OpenAI's cached-input discount (the prompt's shared prefix), requests retried "
    "after transport errors, and any change of price."
)


@dataclass(frozen=True)
class Measured:
    """Per-request figures from answers already in the candidate store."""

    requests: int
    prompt_tokens: float
    answer_tokens: float
    acceptance: float  # share of requests with a label-consistent candidate

    def expected_requests(self, rounds_left: int) -> float:
        """Mean requests of an image with `rounds_left` rounds, each accepting with `acceptance`."""
        return sum((1 - self.acceptance) ** k for k in range(rounds_left))


def measure(candidates: pl.DataFrame, teacher: str) -> Measured | None:
    """Answered requests of `teacher` in the store, or None when there are none yet."""
    answered = candidates.filter(
        (pl.col("teacher") == teacher)
        & (pl.col("reason") != RejectReason.REQUEST_ERROR.value)
        & (pl.col("completion_tokens") > 0)
    )
    requests = answered.group_by("id", "round").agg(
        pl.col("prompt_tokens").first(),
        pl.col("completion_tokens").first() / pl.len(),
        (pl.col("reason") == "accepted").any().alias("accepted"),
    )
    if requests.is_empty():
        return None
    return Measured(
        requests=requests.height,
        prompt_tokens=float(requests["prompt_tokens"].mean()),
        answer_tokens=float(requests["completion_tokens"].mean()),
        acceptance=float(requests["accepted"].mean()),
    )


@dataclass(frozen=True)
class DryRunInputs:
    """`images` holds the pending images' `width`, `height` and `rounds_left`."""

    dataset: str
    selected: int
    images: pl.DataFrame
    model: str
    prompt: str
    candidates: int
    max_tokens: int
    max_side: int
    detail: str
    price: Price | None
    mode: str = "online"
    processor: str | None = None
    measured: Measured | None = None


@dataclass(frozen=True)
class Estimate:
    dataset: str
    mode: str
    selected: int
    images: int
    requests: tuple[int, int]
    expected_requests: float | None
    prompt_tokens: tuple[int, int] | None  # totals over the request range
    prompt_source: str
    answer_tokens: float
    answer_source: str
    candidates: int
    max_tokens: int
    price: Price | None
    price_note: str

    def completion_tokens(self, requests: float, answer_tokens: float) -> float:
        return requests * self.candidates * answer_tokens

    def cost(self, index: int, answer_tokens: float) -> float | None:
        """Cost at the low (0) or high (1) end of the request range."""
        if self.price is None or self.prompt_tokens is None:
            return None
        completion = self.completion_tokens(self.requests[index], answer_tokens)
        return self.price.cost(self.prompt_tokens[index], completion)


def per_image_prompt_tokens(inputs: DryRunInputs) -> tuple[pl.Series | None, str]:
    """Prompt tokens of one request for each pending image, and where the figure comes from."""
    sizes = [
        sent_size(width, height, inputs.max_side)
        for width, height in inputs.images.select("width", "height").iter_rows()
    ]
    if inputs.measured is not None:
        per_image = pl.Series([inputs.measured.prompt_tokens] * len(sizes))
        return per_image, f"measured: mean of {inputs.measured.requests:,} answered requests"
    cost = tile_cost(inputs.model)
    if cost is not None:
        text = text_tokens(inputs.prompt)
        tokens = [text + openai_image_tokens(w, h, inputs.detail, cost) for w, h in sizes]
        detail = "high (auto is counted as high)" if inputs.detail == "auto" else inputs.detail
        source = (
            f"OpenAI's tile formula for {inputs.model}, detail {detail}; text ~{text} tokens "
            "at 4 characters a token"
        )
        return pl.Series(tokens, dtype=pl.Float64), source
    if inputs.processor is not None:
        counts = processor_prompt_tokens(inputs.processor, inputs.prompt, sizes)
        source = f"counted by the processor of {inputs.processor}"
        return pl.Series([counts[size] for size in sizes], dtype=pl.Float64), source
    return None, (
        f"unknown for model {inputs.model!r}: pass --teacher-checkpoint (the teacher's weights) "
        "or measure with a --limit trial"
    )


def estimate(inputs: DryRunInputs) -> Estimate:
    rounds = inputs.images["rounds_left"].cast(pl.Int64)
    per_image, prompt_source = per_image_prompt_tokens(inputs)
    prompt_tokens = None
    if per_image is not None:
        prompt_tokens = (round(per_image.sum()), round((per_image * rounds).sum()))
    measured = inputs.measured
    expected = None
    if measured is not None:
        expected = sum(measured.expected_requests(left) for left in rounds.to_list())
        answer_tokens = measured.answer_tokens
        answer_source = f"measured over {measured.requests:,} answered requests"
    else:
        answer_tokens = float(min(ASSUMED_ANSWER_TOKENS, inputs.max_tokens))
        answer_source = "assumed; none measured yet, a --limit trial measures them"
    return Estimate(
        dataset=inputs.dataset,
        mode=inputs.mode,
        selected=inputs.selected,
        images=inputs.images.height,
        requests=(inputs.images.height, int(rounds.sum())),
        expected_requests=expected,
        prompt_tokens=prompt_tokens,
        prompt_source=prompt_source,
        answer_tokens=answer_tokens,
        answer_source=answer_source,
        candidates=inputs.candidates,
        max_tokens=inputs.max_tokens,
        price=inputs.price,
        price_note=inputs.price.describe() if inputs.price else unknown_price_note(inputs.model),
    )


def millions(tokens: float) -> str:
    return f"{tokens / 1e6:,.2f}M" if tokens >= 1e5 else f"{tokens:,.0f}"


def dollars(amount: float) -> str:
    return f"${amount:,.2f}"


def row(label: str, text: str) -> str:
    return f"  {label:<20}{text}"


def render(estimate: Estimate) -> list[str]:
    """The dry run's lines, as printed."""
    low, high = estimate.requests
    lines = [
        f"Dry run for {estimate.dataset} ({estimate.mode} mode): nothing was sent.",
        row("images to resolve", f"{estimate.images:,} of {estimate.selected:,} selected"),
        row(
            "requests",
            f"{low:,} (every image accepted at its next round) to {high:,} (every image uses "
            "all its rounds)",
        ),
    ]
    if estimate.expected_requests is not None:
        expected = f"{estimate.expected_requests:,.0f} at the measured acceptance"
        lines.append(row("expected requests", expected))
    if estimate.prompt_tokens is None:
        lines.append(row("prompt tokens", estimate.prompt_source))
    else:
        first, last = estimate.prompt_tokens
        per_request = first / low if low else 0.0
        lines.append(row("prompt tokens", f"~{per_request:,.0f} per request ({estimate.prompt_source})"))
        lines.append(row("", f"{millions(first)} to {millions(last)} in all"))
    completion = [estimate.completion_tokens(r, estimate.answer_tokens) for r in (low, high)]
    ceiling = estimate.completion_tokens(high, estimate.max_tokens)
    per_request = f"{estimate.candidates} answers x ~{estimate.answer_tokens:,.0f} per request"
    lines.append(row("completion tokens", f"{per_request} ({estimate.answer_source})"))
    lines.append(
        row(
            "",
            f"{millions(completion[0])} to {millions(completion[1])} in all; at most "
            f"{millions(ceiling)} if every answer ran to --max-tokens {estimate.max_tokens:,}",
        )
    )
    lines.append(row("price", estimate.price_note))
    if estimate.price is not None and estimate.prompt_tokens is not None:
        worst = estimate.price.cost(estimate.prompt_tokens[1], ceiling)
        low_cost, high_cost = (estimate.cost(i, estimate.answer_tokens) for i in (0, 1))
        lines.append(row("cost", f"{dollars(low_cost)} to {dollars(high_cost)}; at most {dollars(worst)}"))
    lines.append("  " + LEFT_OUT)
    return lines

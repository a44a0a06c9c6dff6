"""A build's money and tokens, from the candidate store: what the folder has spent, what the
next request is expected to cost, and the dry run's view of the pending work.

Everything here reads the store, so it holds across runs, kills and shards: the spend of
`--budget-usd` is the folder's, and a `--limit` trial's answers become the estimates.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from domainbed_reasoning.builders.build_config import BuildConfig
from domainbed_reasoning.builders.cost.budget import Budget, spend_by_mode
from domainbed_reasoning.builders.cost.dry_run import DryRunInputs, estimate, measure, render
from domainbed_reasoning.builders.cost.pacing import PacingPlan, RunningUsage
from domainbed_reasoning.builders.cost.token_estimate import (
    openai_image_tokens,
    sent_size,
    text_tokens,
    tile_cost,
)
from domainbed_reasoning.builders.rejection_sampling import REQUEST_ERROR
from domainbed_reasoning.builders.store.candidate_store import scan_candidates

from domainbed_reasoning.errors import UserError

MEASURED_COLUMNS = ["id", "round", "reason", "teacher", "prompt_tokens", "completion_tokens"]


def folder_spend(store: Path, config: BuildConfig) -> dict:
    """Requests, tokens and dollars per mode of every answered request in the store."""
    requests = (
        scan_candidates(
            store, ["candidate_index", "reason", "prompt_tokens", "completion_tokens", "mode"]
        )
        .filter((pl.col("candidate_index") == 0) & (pl.col("reason") != REQUEST_ERROR))
        .collect()
    )
    return spend_by_mode(requests, config.spending.prices(config.teacher.model))


def budget_left(spend: dict, config: BuildConfig, folder: Path) -> float | None:
    """Dollars left of --budget-usd; one line, before anything is sent, when none is left."""
    limit = config.spending.budget_usd
    if limit is None:
        return None
    if spend["usd"] is None or config.spending.prices(config.teacher.model)[config.mode] is None:
        raise UserError(
            f"--budget-usd needs a price for model {config.teacher.model!r}: pass --price-in and "
            "--price-out (dollars per million tokens)"
        )
    budget = Budget(limit, spend["usd"])
    if budget.exhausted:
        raise UserError(budget.spent_line(str(folder)))
    return limit - spend["usd"]


def first_usage(store: Path, config: BuildConfig, prompt: str, selection: pl.DataFrame) -> RunningUsage:
    """The usage expected of the next request: measured in the store, else estimated (the
    tile formula at the median image size for OpenAI's models, else the text alone)."""
    measured = measure(scan_candidates(store, MEASURED_COLUMNS).collect(), config.teacher.model)
    if measured is not None:
        return RunningUsage(measured.prompt_tokens, measured.answer_tokens)
    tokens = float(text_tokens(prompt))
    cost = tile_cost(config.teacher.model)
    if cost is not None and selection.height:
        width, height = int(selection["width"].median()), int(selection["height"].median())
        size = sent_size(width, height, config.policy.max_side)
        tokens += openai_image_tokens(*size, config.teacher.detail, cost)
    return RunningUsage(tokens)


def pacing_plan(
    config: BuildConfig, store: Path, prompt: str, selection: pl.DataFrame, left: float | None
) -> PacingPlan:
    return PacingPlan(
        usage=first_usage(store, config, prompt, selection),
        answers=config.plan.candidates,
        concurrency=config.teacher.concurrency,
        price=config.spending.prices(config.teacher.model)[config.mode],
        budget_left_usd=left,
        limits=config.limits,
    )


def dry_run_lines(
    config: BuildConfig, store: Path, prompt: str, selection: pl.DataFrame, pending: pl.DataFrame
) -> list[str]:
    """What the pending work would send and cost."""
    images = pending.join(selection.select("id", "width", "height"), on="id").select(
        "width", "height", rounds_left=config.plan.max_rounds - pl.col("first_round") + 1
    )
    columns = scan_candidates(store, MEASURED_COLUMNS).collect()
    inputs = DryRunInputs(
        dataset=config.dataset,
        selected=selection.height,
        images=images,
        model=config.teacher.model,
        prompt=prompt,
        candidates=config.plan.candidates,
        max_tokens=config.teacher.max_tokens,
        max_side=config.policy.max_side,
        detail=config.teacher.detail,
        price=config.spending.prices(config.teacher.model)[config.mode],
        mode=config.mode,
        processor=config.teacher_checkpoint,
        measured=measure(columns, config.teacher.model),
    )
    return render(estimate(inputs))

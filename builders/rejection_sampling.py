"""Rejection sampling: K candidates per request, up to R rounds, until one passes `judge`.

An image is *resolved* when a candidate is accepted and *exhausted* after R
rounds without one. A request that fails after the client's retries still
consumes its round (as one `request_error` candidate), so a dead teacher ends a
build instead of looping forever. Which round an image resumes at is derived
from the candidate shards alone, which is what makes the build restartable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

import polars as pl

from builders.candidate_store import CandidateRecord
from builders.image_payload import PayloadPolicy, image_data_url
from builders.teacher_client import Reply, encode_messages
from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.verdict import judge
from domainbed_reasoning.errors import UserError

ACCEPTED = "accepted"


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True)
class SamplingPlan:
    candidates: int = 4
    max_rounds: int = 3
    temperatures: tuple[float, ...] = (0.7, 0.9, 1.0)

    def __post_init__(self) -> None:
        if self.candidates < 1:
            raise UserError(f"--candidates {self.candidates}: must be at least 1")
        if self.max_rounds < 1:
            raise UserError(f"--max-rounds {self.max_rounds}: must be at least 1")
        if not self.temperatures or any(not 0.0 <= t <= 2.0 for t in self.temperatures):
            given = ",".join(str(t) for t in self.temperatures) or "(none)"
            raise UserError(
                f"--temperatures {given}: give values in [0, 2], one per round, e.g. 0.7,0.9,1.0"
            )

    def temperature(self, round_: int) -> float:
        """Round `round_` (1-based) uses its own temperature; the last one repeats."""
        return self.temperatures[min(round_, len(self.temperatures)) - 1]


def parse_temperatures(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(
            f"--temperatures {text!r}: give comma-separated numbers, e.g. 0.7,0.9,1.0"
        ) from None


@dataclass(frozen=True, slots=True)
class ImageTask:
    id: str
    class_name: str
    path: str
    first_round: int
    within_caps: bool  # per PayloadPolicy.within_caps: no downscaling, no worker thread


def progress_by_image(candidates: pl.DataFrame) -> pl.DataFrame:
    """Per image seen so far: the last round tried and whether any candidate was accepted."""
    return candidates.group_by("id").agg(
        pl.col("round").max().alias("rounds"),
        (pl.col("reason") == ACCEPTED).any().alias("accepted"),
    )


def pending_tasks(
    selection: pl.DataFrame,
    candidates: pl.DataFrame,
    plan: SamplingPlan,
    policy: PayloadPolicy,
) -> list[ImageTask]:
    """Images of `selection` neither accepted nor out of rounds, each at its next round."""
    done = progress_by_image(candidates)
    todo = (
        selection.join(done, on="id", how="left")
        .with_columns(pl.col("rounds").fill_null(0), pl.col("accepted").fill_null(False))
        .filter(~pl.col("accepted") & (pl.col("rounds") < plan.max_rounds))
    )
    return [
        ImageTask(id_, class_name, path, rounds + 1, policy.within_caps(width, height, nbytes))
        for id_, class_name, path, rounds, width, height, nbytes in todo.select(
            "id", "class_name", "path", "rounds", "width", "height", "bytes"
        ).iter_rows()
    ]


@dataclass(frozen=True)
class Judging:
    """What a candidate record needs besides the reply: the matcher and provenance."""

    matcher: ClassMatcher
    teacher: str
    prompt_version: str

    def records(
        self, task: ImageTask, round_: int, temperature: float, reply: Reply
    ) -> list[CandidateRecord]:
        common = {
            "id": task.id,
            "round": round_,
            "temperature": temperature,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "latency_s": reply.latency_s,
            "teacher": self.teacher,
            "teacher_url": reply.host,
            "prompt_version": self.prompt_version,
        }
        if reply.error is not None:
            return [
                CandidateRecord(
                    candidate_index=0,
                    text="",
                    finish_reason=None,
                    reason=RejectReason.REQUEST_ERROR.value,
                    predicted=None,
                    detail=reply.error,
                    **common,
                )
            ]
        records = []
        for index, sample in enumerate(reply.samples):
            verdict = judge(sample.text, self.matcher, task.class_name, sample.finish_reason)
            records.append(
                CandidateRecord(
                    candidate_index=index,
                    text=sample.text,
                    finish_reason=sample.finish_reason,
                    reason=ACCEPTED if verdict.accepted else str(verdict.reason),
                    predicted=verdict.predicted,
                    detail=verdict.detail,
                    **common,
                )
            )
        return records


Ask = Callable[[bytes, int, float], Awaitable[Reply]]


def image_messages(path: str, policy: PayloadPolicy, prompt: str) -> bytes:
    return encode_messages(prompt, image_data_url(path, policy))


async def resolve_image(
    task: ImageTask,
    plan: SamplingPlan,
    policy: PayloadPolicy,
    prompt: str,
    ask: Ask,
    judging: Judging,
    emit: Callable[[list[CandidateRecord]], None],
) -> Outcome:
    """Sample rounds for one image until a candidate is accepted or the rounds run out.

    The image and prompt are encoded once and reused by every round; an image that may need
    downscaling is encoded off the event loop.
    """
    if task.within_caps:
        messages = image_messages(task.path, policy, prompt)
    else:
        messages = await asyncio.to_thread(image_messages, task.path, policy, prompt)
    for round_ in range(task.first_round, plan.max_rounds + 1):
        temperature = plan.temperature(round_)
        reply = await ask(messages, plan.candidates, temperature)
        records = judging.records(task, round_, temperature, reply)
        emit(records)
        if any(record.reason == ACCEPTED for record in records):
            return Outcome.ACCEPTED
    return Outcome.EXHAUSTED

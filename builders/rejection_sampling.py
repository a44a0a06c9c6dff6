"""Rejection sampling: K candidates per request, up to R rounds, until one passes `judge`.

An image is *accepted* when a candidate passes, *exhausted* after R rounds of teacher
answers without one, and *pending* otherwise. Only answers use up rounds: a request that
still fails after its retries (a transport error, an outage, a refusal) is recorded as one
`request_error` row and leaves its image pending at the same round, so the next run asks
that round again; an outage can delay a build but never exhaust an image. Which round an
image resumes at is derived from the candidate shards alone, which is what makes the
build restartable.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import polars as pl
from domainbed_reasoning.builders.store.candidate_store import CandidateRecord
from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy, image_data_url
from domainbed_reasoning.builders.transport.teacher_client import MessagesTemplate, Reply

from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.verdict import judge
from domainbed_reasoning.errors import UserError

ACCEPTED = "accepted"
REQUEST_ERROR = RejectReason.REQUEST_ERROR.value
FAILED_INDEX = -1  # the candidate_index of a failed request's row


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    EXHAUSTED = "exhausted"
    FAILED = "failed"  # a request failed after its retries: pending until a later run


@dataclass(frozen=True)
class SamplingPlan:
    candidates: int = 4
    max_rounds: int = 3
    temperatures: tuple[float, ...] = (0.7, 0.9, 1.0)
    seed: int = 0

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

    def request_seed(self, image_id: str, round_: int) -> int:
        return request_seed(self.seed, image_id, round_)


def request_seed(seed: int, image_id: str, round_: int) -> int:
    """The `seed` sent with an image's round: the same on every run, machine and retry, so a
    server that honours it (vLLM does, sample i of n drawing with seed + i) gives the same
    answers to the same request. The teacher's builder and SARR's self-labelling share it."""
    return zlib.crc32(f"{seed}:{image_id}:{round_}".encode())


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


def progress_by_image(candidates: pl.LazyFrame) -> pl.DataFrame:
    """Per image seen so far: the last round the teacher answered (0 if none), whether a
    candidate was accepted, and the last round whose request failed (0 if none)."""
    failure = pl.col("reason") == REQUEST_ERROR
    return (
        candidates.select("id", "round", "reason")
        .group_by("id")
        .agg(
            pl.col("round").filter(~failure).max().fill_null(0).alias("rounds"),
            (pl.col("reason") == ACCEPTED).any().alias("accepted"),
            pl.col("round").filter(failure).max().fill_null(0).alias("failed_round"),
        )
        .collect()
    )


def pending_tasks(
    selection: pl.DataFrame,
    progress: pl.DataFrame,
    plan: SamplingPlan,
    policy: PayloadPolicy,
) -> pl.DataFrame:
    """Images of `selection` neither accepted nor out of rounds, each at its next round, as
    rows of ImageTask's fields: a frame, because a first run of DomainNet has 586k of them and
    as Python objects they took longer to make than everything else at start-up."""
    return (
        selection.join(progress, on="id", how="left")
        .with_columns(pl.col("rounds").fill_null(0), pl.col("accepted").fill_null(False))
        .filter(~pl.col("accepted") & (pl.col("rounds") < plan.max_rounds))
        .select(
            "id",
            "class_name",
            "path",
            first_round=pl.col("rounds") + 1,
            within_caps=policy.within_caps(),
        )
    )


def image_tasks(pending: pl.DataFrame, chunk: int = 4096) -> Iterator[ImageTask]:
    """The rows of `pending_tasks` as ImageTasks, made as the request slots ask for them."""
    for rows in pending.iter_slices(chunk):
        yield from map(ImageTask, *(column.to_list() for column in rows.get_columns()))


@dataclass(frozen=True)
class Judging:
    """What a candidate record needs besides the reply: the matcher and provenance."""

    matcher: ClassMatcher
    teacher: str
    prompt_version: str
    top_p: float
    max_tokens: int
    mode: str = "online"

    def records(
        self, task: ImageTask, round_: int, request: Request, reply: Reply
    ) -> list[CandidateRecord]:
        common = {
            "id": task.id,
            "round": round_,
            "temperature": request.temperature,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "latency_s": reply.latency_s,
            "teacher": self.teacher,
            "teacher_url": reply.host,
            "prompt_version": self.prompt_version,
            "seed": request.seed,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "server_model": reply.server_model,
            "system_fingerprint": reply.system_fingerprint,
            "timestamp": datetime.fromtimestamp(reply.timestamp, UTC),
            "downscaled": request.downscaled,
            "mode": self.mode,
        }
        if reply.error is not None:
            return [
                CandidateRecord(
                    candidate_index=FAILED_INDEX,
                    text="",
                    finish_reason=None,
                    reason=REQUEST_ERROR,
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


@dataclass(frozen=True, slots=True)
class Request:
    """What one round of one image asks, as its records state it."""

    temperature: float
    seed: int
    downscaled: bool


Ask = Callable[[bytes, int, float, int], Awaitable[Reply]]


def image_messages(
    task: ImageTask, policy: PayloadPolicy, template: MessagesTemplate
) -> tuple[bytes, bool]:
    """The request's messages and whether the image was downscaled."""
    payload = image_data_url(task.path, policy, scanned_fit=task.within_caps)
    return template.fill(payload.data_url), payload.downscaled


async def resolve_image(
    task: ImageTask,
    plan: SamplingPlan,
    policy: PayloadPolicy,
    template: MessagesTemplate,
    ask: Ask,
    judging: Judging,
    emit: Callable[[list[CandidateRecord]], None],
) -> Outcome:
    """Sample rounds for one image until a candidate is accepted, the rounds run out, or a
    request fails (the image then waits for the next run at that round).

    The image and prompt are encoded once and reused by every round; an image that may need
    downscaling is encoded off the event loop.
    """
    if task.within_caps:
        messages, downscaled = image_messages(task, policy, template)
    else:
        messages, downscaled = await asyncio.to_thread(image_messages, task, policy, template)
    for round_ in range(task.first_round, plan.max_rounds + 1):
        request = Request(plan.temperature(round_), plan.request_seed(task.id, round_), downscaled)
        reply = await ask(messages, plan.candidates, request.temperature, request.seed)
        records = judging.records(task, round_, request, reply)
        emit(records)
        if reply.error is not None:
            return Outcome.FAILED
        if any(record.reason == ACCEPTED for record in records):
            return Outcome.ACCEPTED
    return Outcome.EXHAUSTED

"""`--mode batch`: every pending image's next round as a batch, answered by OpenAI's Batch
API or by vLLM's offline runner, then judged exactly as online answers are.

A pass sends one request per unresolved image (its next round: the round after depends
on this one's verdicts) and, once the pass is ingested, the next pass goes out for the
images still unresolved, until none is left or a pass brings no answer back. Answers go
through the same judge into the same candidate store as online ones, so chains, stats,
the report and resume are the online ones. A request the batch did not answer (the
batch failed or expired, or its line errored) is stored as a request_error row: a
transport failure, which leaves its image pending at the same round for the next pass
or run. The journal (batch_files.py) makes a killed run poll the batches it created,
and a result already in the store is never ingested twice.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import polars as pl
from domainbed_reasoning.builders.batch.batch_files import (
    BatchRequest,
    BatchResult,
    Journal,
    Part,
    parse_results,
    read_requests,
    write_parts,
)
from domainbed_reasoning.builders.batch.openai_batch import OpenAIBatches
from domainbed_reasoning.builders.build_config import BuildConfig
from domainbed_reasoning.builders.cost.pacing import Pacing
from domainbed_reasoning.builders.rejection_sampling import (
    ACCEPTED,
    REQUEST_ERROR,
    ImageTask,
    Request,
    image_messages,
    image_tasks,
    pending_tasks,
    progress_by_image,
)
from domainbed_reasoning.builders.sampling import Counters, Share
from domainbed_reasoning.builders.store.candidate_store import scan_candidates, write_shard
from domainbed_reasoning.builders.transport.teacher_client import (
    NO_KEY,
    Reply,
    key_travels,
    parse_completion,
    request_body,
    request_fields,
)

from domainbed_reasoning.serving.vllm_batch import run_batch
from domainbed_reasoning.serving.vllm_server import ServerConfig

BATCH_FOLDER = "batches"
NOT_ANSWERED = "not answered by the batch"


class Runner(Protocol):
    """Where a part's requests are answered: OpenAI's Batch API, or vLLM on this machine."""

    host: str

    def submit(self, part: Part, journal: Journal) -> None: ...

    def wait(
        self, part: Part, journal: Journal, report: Callable[[Part, int, int], None]
    ) -> None: ...


class LocalRunner:
    """vLLM's offline batch runner: nothing to submit; waiting is running the part."""

    host = "vllm-run-batch"

    def __init__(self, server: ServerConfig) -> None:
        self.server = server

    def submit(self, part: Part, journal: Journal) -> None:
        return None

    def wait(
        self, part: Part, journal: Journal, report: Callable[[Part, int, int], None]
    ) -> None:
        output = Path(part.input_path).with_suffix(".output.jsonl")
        if not output.is_file():
            start = time.perf_counter()
            run_batch(self.server, Path(part.input_path), output)
            part.seconds = time.perf_counter() - start
        part.output_path, part.status = str(output), "completed"
        journal.save()
        report(part, part.requests, part.requests)


@dataclass(frozen=True)
class BatchPlan:
    """What a batch build needs beyond the share: the runner, the selection, and the pacing
    (usage estimate, price and budget) that ingested answers update."""

    runner: Runner
    selection: pl.DataFrame
    pacing: Pacing


def runner_for(config: BuildConfig, folder: Path) -> Runner:
    """vLLM's offline runner given --teacher-checkpoint, else the Batch API at --teacher-url."""
    if config.teacher_checkpoint is not None:
        server = ServerConfig(
            model=config.teacher_checkpoint,
            served_model_name=config.teacher.model,
            extra_args=config.batch.vllm_args,
            log_path=folder / BATCH_FOLDER / "vllm.log",
        )
        return LocalRunner(server)
    teacher = config.teacher
    url = teacher.urls[0]
    key = teacher.api_key if key_travels(url, teacher.api_key_explicit) else NO_KEY
    metadata = {"dataset": config.dataset, "tool": "domainbed-reasoning"}
    return OpenAIBatches(url, key, metadata, poll_s=config.batch.poll_s)


def batch_requests(share: Share, pending: pl.DataFrame) -> Iterator[tuple[BatchRequest, bytes]]:
    """Each pending image's next round, as the body an online request would post."""
    config = share.config
    plan, policy = config.plan, config.policy
    for task in image_tasks(pending):
        messages, downscaled = image_messages(task, policy, share.messages)
        round_ = task.first_round
        request = BatchRequest(
            task.id, round_, plan.temperature(round_), plan.request_seed(task.id, round_), downscaled
        )
        fields = request_fields(config.teacher, plan.candidates, request.temperature, request.seed)
        yield request, request_body(messages, fields)


def result_reply(result: BatchResult | None, part: Part, host: str) -> Reply:
    """A result line as the online path's Reply (latency: the whole batch's)."""
    latency = part.seconds or 0.0
    if result is None:
        return Reply((), 0, 0, latency, host, f"batch {part.status}: {NOT_ANSWERED}")
    if result.error is not None:
        return Reply((), 0, 0, latency, host, f"batch {part.status}: {result.error}")
    try:
        samples, prompt_tokens, completion_tokens = parse_completion(result.completion)
    except ValueError as err:
        return Reply((), 0, 0, latency, host, f"batch {part.status}: {err}")
    completion = result.completion
    return Reply(
        samples,
        prompt_tokens,
        completion_tokens,
        latency,
        host,
        server_model=completion.get("model"),
        system_fingerprint=completion.get("system_fingerprint"),
    )


def part_results(part: Part) -> dict[str, BatchResult]:
    results = {}
    for path in (part.output_path, part.errors_path):
        if path:
            for result in parse_results(Path(path).read_text(encoding="utf-8")):
                results[result.custom_id] = result
    return results


def answered_rounds(store: Path) -> set[tuple[str, int]]:
    """(image, round) pairs the store already holds an answer for."""
    answers = (
        scan_candidates(store, ["id", "round", "reason"])
        .filter(pl.col("reason") != REQUEST_ERROR)
        .select("id", "round")
        .unique()
        .collect()
    )
    return set(answers.iter_rows())


def ingest(part: Part, share: Share, batch: BatchPlan, classes: dict[str, str], counters: Counters) -> None:
    """Judge a finished part's results into the store (once: answers already there are
    skipped) and measure what they cost."""
    results = part_results(part)
    done = answered_rounds(share.folder)
    records = []
    for row in read_requests(Path(part.input_path)).iter_rows(named=True):
        if (row["id"], row["round"]) in done:
            continue
        reply = result_reply(results.get(row["custom_id"]), part, batch.runner.host)
        task = ImageTask(row["id"], classes[row["id"]], "", row["round"], True)
        request = Request(row["temperature"], row["seed"], row["downscaled"])
        judged = share.judging.records(task, row["round"], request, reply)
        records += judged
        batch.pacing.settle(0.0, reply.prompt_tokens, reply.completion_tokens)
        counters.requests += 1
        counters.images += 1
        counters.failed += reply.error is not None
        counters.accepted += any(record.reason == ACCEPTED for record in judged)
    if records:
        write_shard(share.folder, records)


def affordable(pending: pl.DataFrame, pacing: Pacing) -> pl.DataFrame:
    """As many pending images as the budget left pays for at the estimated cost (at least
    one while any budget is left: the budget is reached, not feared)."""
    if pacing.budget is None:
        return pending
    left = pacing.budget.limit_usd - pacing.budget.spent_usd
    each = pacing.estimated_usd()
    if left <= 0:
        return pending.clear()
    return pending.head(max(1, math.floor(left / each)) if each else pending.height)


def sample_in_batches(
    share: Share, batch: BatchPlan, report: Callable[[Counters], None]
) -> Counters:
    """Passes of batches until every selected image is resolved, the budget is spent, or a
    pass brings nothing back; returns this run's counters."""
    config = share.config
    journal = Journal.load(share.folder.parent / BATCH_FOLDER)
    classes = dict(batch.selection.select("id", "class_name").iter_rows())
    counters = Counters(spend=batch.pacing.spend)

    def finish(parts: list[Part]) -> None:
        for part in parts:
            batch.runner.submit(part, journal)
        for part in parts:
            batch.runner.wait(part, journal, lambda *_: report(counters))
            ingest(part, share, batch, classes, counters)
            part.ingested = True
            journal.save()
            report(counters)

    finish(journal.open_parts())
    while True:
        progress = progress_by_image(scan_candidates(share.folder))
        pending = pending_tasks(batch.selection, progress, config.plan, config.policy)
        if pending.is_empty():
            return counters
        chosen = affordable(pending, batch.pacing)
        if chosen.is_empty():
            counters.stopped = "the budget is spent"
            return counters
        stem = f"batch-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        paths = write_parts(batch_requests(share, chosen), Path(journal.path).parent, stem)
        parts = [Part(str(path), read_requests(path).height) for path in paths]
        journal.parts += parts
        journal.save()
        answered_before = counters.requests - counters.failed
        finish(parts)
        if counters.requests - counters.failed == answered_before:
            counters.stopped = "a whole pass of batches came back without an answer"
            return counters

"""`dbr build-chains`: scan, pick this machine's share, sample the teacher, derive the outputs.

The build keeps `concurrency` requests in flight with as many workers, each
taking the next unresolved image and sampling its rounds; answers stream into
the candidate shards, and chains/stats/report are derived from those shards at
the end. Re-running the same command resumes from the shards, so a crash or a
Ctrl-C costs only the requests that were in flight.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.layout import candidates_dir, chains_dir, manifest_path
from domainbed_reasoning.matching import ClassMatcher
from domainbed_reasoning.prompts import class_list, load_prompt
from domainbed_reasoning.registry import get_spec
from domainbed_reasoning.scan import scan_dataset, write_manifest

from .build_report import RunInfo, write_outputs
from .candidate_store import CandidateRecord, CandidateWriter, read_candidates
from .image_payload import PayloadPolicy
from .rejection_sampling import (
    ImageTask,
    Judging,
    Outcome,
    SamplingPlan,
    pending_tasks,
    resolve_image,
)
from .teacher_client import TeacherConfig, TeacherPool, url_host

SHARD_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Machine `index` of `count` (0-based) takes the ids whose stable hash falls on it."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = SHARD_SPEC.match(text)
        if not match or not int(match[1]) < int(match[2]):
            raise UserError(
                f"--shard {text!r}: write i/n with 0 <= i < n, e.g. 0/4 for the first of four machines"
            )
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def stable_hash(ids: pl.Series) -> pl.Series:
    """CRC32 of the id: the same on every machine, Python version and polars version."""
    return pl.Series([zlib.crc32(id_.encode()) for id_ in ids], dtype=pl.UInt64)


def select_images(manifest: pl.DataFrame, shard: Shard, limit: int | None) -> pl.DataFrame:
    """This shard's images in stable-hash order, so `--limit N` samples every domain and class."""
    hashed = manifest.with_columns(_hash=stable_hash(manifest["id"]))
    chosen = (
        hashed.filter(pl.col("_hash") % shard.count == shard.index)
        .sort("_hash", "id")
        .drop("_hash")
    )
    return chosen if limit is None else chosen.head(limit)


@dataclass(frozen=True)
class BuildConfig:
    dataset: str
    data_dir: Path
    out: Path
    teacher: TeacherConfig
    plan: SamplingPlan = field(default_factory=SamplingPlan)
    policy: PayloadPolicy = field(default_factory=PayloadPolicy)
    shard: Shard = field(default_factory=Shard)
    limit: int | None = None
    flush_rows: int = 2048
    flush_seconds: float = 2.0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UserError(
                f"--limit {self.limit}: must be at least 1 (leave it out for every image)"
            )
        if not self.teacher.urls:
            raise UserError(
                "no --teacher-url given: pass e.g. --teacher-url http://127.0.0.1:8000/v1"
            )
        for url in self.teacher.urls:
            url_host(url)


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        accepted = task.fields.get("accepted", 0)
        share = f"{100 * accepted / task.completed:.1f}%" if task.completed else "-"
        return Text(f"{speed or 0:.1f} img/s, accepted {share}")


def progress_bar(console: Console | None, show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not show,
    )


@dataclass
class Counters:
    requests: int = 0
    accepted: int = 0


async def sample_all(
    tasks: list[ImageTask], config: BuildConfig, pool: TeacherPool, writer: CandidateWriter,
    judging: Judging, prompt: str, progress: Progress,
) -> Counters:  # fmt: skip
    """Run `concurrency` workers over the task list; the first unexpected error stops them all."""
    counters = Counters()
    bar = progress.add_task(f"{config.dataset} chains", total=len(tasks), accepted=0)
    queue = iter(tasks)

    def emit(records: list[CandidateRecord]) -> None:
        counters.requests += 1
        writer.add(records)

    ask = partial(pool.complete, prompt)

    async def worker() -> None:
        for task in queue:
            outcome = await resolve_image(task, config.plan, config.policy, ask, judging, emit)
            counters.accepted += outcome is Outcome.ACCEPTED
            progress.update(bar, advance=1, accepted=counters.accepted)

    workers = [
        asyncio.create_task(worker()) for _ in range(min(config.teacher.concurrency, len(tasks)))
    ]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return counters


async def build_chains_async(config: BuildConfig, console: Console | None = None) -> dict:
    spec = get_spec(config.dataset)
    folder = chains_dir(config.out, spec)
    scan = scan_dataset(spec, config.data_dir)
    write_manifest(scan, manifest_path(folder))
    manifest = scan.frame
    selection = select_images(manifest, config.shard, config.limit)
    template = load_prompt("teacher")
    prompt = template.render(classes=class_list(spec.classes))
    matcher = ClassMatcher(spec.classes)
    judging = Judging(matcher, config.teacher.model, template.version)
    tasks = pending_tasks(selection, read_candidates(candidates_dir(folder)), config.plan)

    start = time.perf_counter()
    counters = Counters()
    if tasks:
        async with TeacherPool(config.teacher) as pool:
            await pool.check()
            async with CandidateWriter(
                candidates_dir(folder), config.flush_rows, config.flush_seconds
            ) as writer:
                with progress_bar(console, config.show_progress) as progress:
                    counters = await sample_all(
                        tasks, config, pool, writer, judging, prompt, progress
                    )
    run = RunInfo(
        dataset=spec.name,
        teacher=config.teacher.model,
        teacher_hosts=[url_host(url) for url in config.teacher.urls],
        candidates=config.plan.candidates,
        max_rounds=config.plan.max_rounds,
        temperatures=list(config.plan.temperatures),
        shard=str(config.shard),
        limit=config.limit,
        selected=selection.height,
        skipped_files=len(scan.skipped),
        requests=counters.requests,
        seconds=round(time.perf_counter() - start, 3),
    )
    return write_outputs(folder, manifest, read_candidates(candidates_dir(folder)), matcher, run)


def build_chains(config: BuildConfig, console: Console | None = None) -> dict:
    """Build (or resume) the chains of one dataset; returns the stats written to stats.json."""
    return asyncio.run(build_chains_async(config, console))

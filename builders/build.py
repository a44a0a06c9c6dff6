"""`dbr build-chains`: scan, pick this machine's share, sample the teacher, derive the outputs.

Answers stream into the candidate shards (sampling.py, in this process or in
`--workers` processes, workers.py), and chains/stats/report are derived from those
shards at the end (build_report.py). Re-running the same command resumes from the
shards, so a crash or a Ctrl-C costs only the requests that were in flight, and
retries exactly the images whose requests failed. The exit code says whether the
selection is resolved: EXIT_UNRESOLVED when some image is still pending because its
requests failed (or every replica stayed down and the build stopped).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from pathlib import Path

import polars as pl
from domainbed_reasoning.builders.batch.batch_mode import BatchPlan, runner_for, sample_in_batches
from domainbed_reasoning.builders.build_config import BuildConfig, Shard
from domainbed_reasoning.builders.build_report import RunInfo, write_outputs
from domainbed_reasoning.builders.cost.spending import (
    budget_left,
    dry_run_lines,
    folder_spend,
    pacing_plan,
)
from domainbed_reasoning.builders.progress import progress_bar
from domainbed_reasoning.builders.rejection_sampling import (
    Judging,
    pending_tasks,
    progress_by_image,
)
from domainbed_reasoning.builders.sampling import Counters, Share, check_teacher, sample_share
from domainbed_reasoning.builders.store.candidate_store import compact, scan_candidates, store_lock
from domainbed_reasoning.builders.store.rejudge import rejudge_and_summarise, require_current_judge
from domainbed_reasoning.builders.transport.teacher_client import (
    DEFAULT_KEY_ENV,
    MessagesTemplate,
    TeacherConfig,
    url_host,
    withheld_key_urls,
)
from domainbed_reasoning.builders.workers import sample_in_workers, split_shares, worker_count
from rich.console import Console

from domainbed_reasoning.artefacts import candidates_dir, chains_dir, manifest_path, report_path
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset, write_manifest
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console, err_console

EXIT_UNRESOLVED = 3


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


def sample(
    share: Share, config: BuildConfig, console: Console | None, selection: pl.DataFrame
) -> Counters:
    """Batches in batch mode; online, one process when one suffices (or is asked for), else
    `worker_count` spawned processes."""
    workers = worker_count(config.workers, len(share.tasks), config.teacher.concurrency)
    with progress_bar(console, config.show_progress) as progress:
        bar = progress.add_task(f"{config.dataset} chains", total=len(share.tasks), accepted=0)

        def show(counters: Counters) -> None:
            progress.update(
                bar,
                completed=counters.images,
                accepted=counters.accepted,
                failed=counters.failed,
                spend=counters.spend.describe(),
            )

        if config.mode == "batch":
            batch = BatchPlan(runner_for(config, share.folder.parent), selection, share.pacing.build())
            return sample_in_batches(share, batch, show)
        if workers == 1:
            return asyncio.run(sample_share(share, show, check=True))
        asyncio.run(check_teacher(config.teacher))
        return sample_in_workers(split_shares(share, workers), show)


def refuse_mixing(store: Path, teacher: str, prompt_version: str) -> None:
    """One folder, one teacher and one prompt: answers of another would silently mix."""
    seen = scan_candidates(store, ["teacher", "prompt_version"]).unique().collect()
    other = seen.filter(
        (pl.col("teacher") != teacher) | (pl.col("prompt_version") != prompt_version)
    )
    if other.height:
        old_teacher, old_version = other.row(0)
        raise UserError(
            f"{store} holds answers of teacher {old_teacher!r} with prompt version {old_version}; "
            f"this run asks teacher {teacher!r} with prompt version {prompt_version}: pass another "
            "--out, or --allow-mixed to add to them"
        )


def build_chains(config: BuildConfig, console: Console | None = None) -> dict | None:
    """Build (or resume) the chains of one dataset; returns the stats written to stats.json
    (None for a dry run, which prints its estimate and sends nothing)."""
    spec = get_spec(config.dataset)
    folder = chains_dir(config.out, spec)
    require_current_judge(folder, spec.name)
    store = candidates_dir(folder)
    scan = scan_dataset(spec, config.data_dir)
    template = load_prompt("teacher")
    with store_lock(folder):
        compact(store)
        if not config.allow_mixed:
            refuse_mixing(store, config.teacher.model, template.version)
        write_manifest(scan, manifest_path(folder))
        manifest = scan.frame
        selection = select_images(manifest, config.shard, config.limit)
        matcher = ClassMatcher(spec.classes)
        teacher = config.teacher
        prompt = template.render(classes=class_list(spec.classes))
        pending = pending_tasks(
            selection, progress_by_image(scan_candidates(store)), config.plan, config.policy
        )
        if config.dry_run:
            for line in dry_run_lines(config, store, prompt, selection, pending):
                err_console.print(line, highlight=False, soft_wrap=True)
            return None
        left = budget_left(folder_spend(store, config), config, folder)
        share = Share(
            config=config,
            tasks=pending,
            messages=MessagesTemplate.for_prompt(
                prompt, text_first=True, detail=teacher.detail if teacher.openai else None
            ),
            judging=Judging(
                matcher, teacher.model, template.version, teacher.top_p, teacher.max_tokens, config.mode
            ),
            folder=store,
            pacing=pacing_plan(config, store, prompt, selection, left),
        )
        warn_withheld_keys(config.teacher)
        start = time.perf_counter()
        counters = sample(share, config, console, selection) if len(share.tasks) else Counters()
        seconds = time.perf_counter() - start
        run = run_info(config, selection.height, len(scan.skipped), counters, seconds)
        return write_outputs(folder, manifest, selection["id"], store, matcher, run)


def warn_withheld_keys(teacher: TeacherConfig) -> None:
    for url in withheld_key_urls(teacher):
        err_console.print(
            f"[yellow]not sending {DEFAULT_KEY_ENV} to {url}: plain http to another machine;"
            f" pass --api-key-env {DEFAULT_KEY_ENV} to send it anyway[/]",
            highlight=False,
        )


def run_info(
    config: BuildConfig, selected: int, skipped_files: int, counters: Counters, seconds: float
) -> RunInfo:
    """What this run was asked and what it did, as stats.json records it."""
    teacher, plan = config.teacher, config.plan
    return RunInfo(
        dataset=get_spec(config.dataset).name,
        teacher=teacher.model,
        teacher_hosts=[url_host(url) for url in teacher.urls],
        candidates=plan.candidates,
        max_rounds=plan.max_rounds,
        temperatures=list(plan.temperatures),
        seed=plan.seed,
        top_p=teacher.top_p,
        max_tokens=teacher.max_tokens,
        shard=str(config.shard),
        limit=config.limit,
        selected=selected,
        skipped_files=skipped_files,
        requests=counters.requests,
        seconds=round(seconds, 3),
        stopped=counters.stopped,
        mode=config.mode,
        prices=config.spending.prices(teacher.model),
        spent_usd=round(counters.spend.usd, 4),
    )


def build_and_summarise(config: BuildConfig, rejudge: bool = False) -> int:
    """`dbr build-chains`: build (or resume), then what was accepted, what is left and why;
    returns the exit code, EXIT_UNRESOLVED while some image of the selection is pending. With
    `rejudge`, the stored candidates are judged again instead of sampling (nothing is sent)."""
    if rejudge:
        rejudge_and_summarise(config)
        return 0
    stats = build_chains(config, console=err_console)
    if stats is None:
        return 0
    images, run = stats["images"], stats["run"]
    report = report_path(chains_dir(config.out, get_spec(config.dataset)))
    console.print(
        f"[green]{config.dataset}[/]: {images.get('accepted', 0):,} of {images['attempted']:,} images "
        f"accepted, {images.get('exhausted', 0):,} exhausted; {run['requests']:,} requests this "
        f"run ({run['requests_per_s']} req/s). Report: {report}",
        highlight=False,
    )
    if run["stopped"]:
        err_console.print(
            f"[bold red]stopped:[/] {run['stopped']}", highlight=False, soft_wrap=True
        )
    if not run["unresolved"]:
        return 0
    failures = stats["request_failures"]
    example = next(iter(failures["errors"]), "none")
    why = f"{failures['pending_images']:,} of them after failed requests"
    if run["stopped"]:
        why += ", the rest not asked before the build stopped"
    err_console.print(
        f"[yellow]{run['unresolved']:,} images of this run unresolved[/] ({why}; commonest error: "
        f"{example}). Run the same command again to retry exactly those (exit code "
        f"{EXIT_UNRESOLVED}).",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_UNRESOLVED

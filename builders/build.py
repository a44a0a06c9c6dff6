"""`dbr build-chains`: scan, pick this machine's share, sample the teacher, derive the outputs.

Answers stream into the candidate shards (sampling.py, in this process or in
`--workers` processes, workers.py), and chains/stats/report are derived from those
shards at the end (build_report.py). Re-running the same command resumes from the
shards, so a crash or a Ctrl-C costs only the requests that were in flight. One
process is the default: on the 2-core benchmark machine a second one cost more in
start-up than it gained.
"""

from __future__ import annotations

import asyncio
import time
import zlib

import polars as pl
from rich.console import Console

from builders.build_config import BuildConfig, Shard
from builders.build_report import RunInfo, write_outputs
from builders.candidate_store import read_candidates
from builders.progress import progress_bar
from builders.rejection_sampling import Judging, pending_tasks
from builders.rejudge import rejudge_and_summarise, require_current_judge
from builders.sampling import Counters, Share, check_teacher, sample_share
from builders.teacher_client import url_host
from builders.workers import sample_in_workers, split_shares, worker_count
from domainbed_reasoning.artefacts import candidates_dir, chains_dir, manifest_path, report_path
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset, write_manifest
from domainbed_reasoning.terminal import console, err_console


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


def sample(share: Share, config: BuildConfig, console: Console | None) -> Counters:
    """One process when one suffices (or is asked for), else `worker_count` spawned processes."""
    workers = worker_count(config.workers, len(share.tasks), config.teacher.concurrency)
    with progress_bar(console, config.show_progress) as progress:
        bar = progress.add_task(f"{config.dataset} chains", total=len(share.tasks), accepted=0)

        def show(counters: Counters) -> None:
            progress.update(bar, completed=counters.images, accepted=counters.accepted)

        if workers == 1:
            return asyncio.run(sample_share(share, show, check=True))
        asyncio.run(check_teacher(config.teacher))
        return sample_in_workers(split_shares(share, workers), show)


def build_chains(config: BuildConfig, console: Console | None = None) -> dict:
    """Build (or resume) the chains of one dataset; returns the stats written to stats.json."""
    spec = get_spec(config.dataset)
    folder = chains_dir(config.out, spec)
    require_current_judge(folder, spec.name)
    scan = scan_dataset(spec, config.data_dir)
    write_manifest(scan, manifest_path(folder))
    manifest = scan.frame
    selection = select_images(manifest, config.shard, config.limit)
    template = load_prompt("teacher")
    matcher = ClassMatcher(spec.classes)
    share = Share(
        config=config,
        tasks=pending_tasks(
            selection, read_candidates(candidates_dir(folder)), config.plan, config.policy
        ),
        prompt=template.render(classes=class_list(spec.classes)),
        judging=Judging(matcher, config.teacher.model, template.version),
        folder=candidates_dir(folder),
    )

    start = time.perf_counter()
    counters = sample(share, config, console) if share.tasks else Counters()
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


def build_and_summarise(config: BuildConfig, rejudge: bool = False) -> None:
    """`dbr build-chains`: build (or resume), then one line of what was accepted and where the report
    is; with `rejudge`, judge the stored candidates again instead of sampling."""
    if rejudge:
        rejudge_and_summarise(config)
        return
    stats = build_chains(config, console=err_console)
    images = stats["images"]
    report = report_path(chains_dir(config.out, get_spec(config.dataset)))
    console.print(
        f"[green]{config.dataset}[/]: {images.get('accepted', 0):,} of {images['attempted']:,} images "
        f"accepted, {images.get('exhausted', 0):,} exhausted; {stats['run']['requests']:,} requests this "
        f"run ({stats['run']['requests_per_s']} req/s). Report: {report}",
        highlight=False,
    )

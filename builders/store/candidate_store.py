"""Every teacher answer (and every request that failed), kept in Parquet shards under `candidates/`.

The shards are the build's only state. A shard is written whole to a temporary file and
renamed into place (`atomic.py`), so a `kill -9` at any moment leaves only complete
shards behind and loses at most the records still buffered.

A week-long run flushes a small shard every few seconds, so shards are merged as they
pile up, like the levels of a log-structured store: `FANOUT` shards of one level become
one shard of the next, written whole (with the names it replaces in its Parquet
metadata) before its sources are deleted. A crash between the two leaves both; the next
start deletes the sources a merged shard lists (`finish_merges`), so a record is never
lost and never counted twice. Each writer merges only shards it wrote itself; leftovers
of killed runs are merged at start-up, under the store's lock, and so are shards written
before the store had levels: merged, they gain the newer columns (as nulls) and their
failed requests the current `candidate_index` of -1, so every shard has one schema.

Readers name the columns they need: start-up reads three of them, not the answers' text.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Annotated, Self, get_type_hints

import polars as pl

from domainbed_reasoning import atomic
from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.errors import UserError

KEY = ("id", "round", "candidate_index")
SHARD_GLOB = "part-*.parquet"
LEVEL = re.compile(r"^part-L(\d+)-")  # shards named before levels existed are level 0
FANOUT = 32
MERGED_FROM = "dbr_merged_from"
LOCK_NAME = ".lock"


@dataclass(frozen=True, slots=True)
class CandidateRecord:
    """One teacher answer and its verdict, or one request that failed after its retries
    (`reason` request_error, `candidate_index` -1): a record, not a teacher answer.

    Answers are unique by KEY. Token counts and latency belong to the request (one prefill, `n` samples), so
    every candidate of a request repeats them; totals sum `candidate_index == 0`.
    The fields from `seed` to `downscaled` make an answer reproducible: what was asked
    (seed, top_p, max_tokens, whether the image was downscaled), who answered (the
    server's model and fingerprint) and when. Each field declares its Parquet column's
    dtype, from which CANDIDATE_SCHEMA is read, so the record and the shards cannot drift.
    """

    id: Annotated[str, pl.String]
    round: Annotated[int, pl.Int32]
    candidate_index: Annotated[int, pl.Int32]
    temperature: Annotated[float, pl.Float64]
    text: Annotated[str, pl.String]
    finish_reason: Annotated[str | None, pl.String]
    reason: Annotated[str, pl.String]
    predicted: Annotated[str | None, pl.String]
    detail: Annotated[str | None, pl.String]
    prompt_tokens: Annotated[int, pl.Int64]
    completion_tokens: Annotated[int, pl.Int64]
    latency_s: Annotated[float, pl.Float64]
    teacher: Annotated[str, pl.String]
    teacher_url: Annotated[str, pl.String]
    prompt_version: Annotated[str, pl.String]
    seed: Annotated[int | None, pl.Int64]
    top_p: Annotated[float, pl.Float64]
    max_tokens: Annotated[int, pl.Int32]
    server_model: Annotated[str | None, pl.String]
    system_fingerprint: Annotated[str | None, pl.String]
    timestamp: Annotated[datetime, pl.Datetime("us", "UTC")]
    downscaled: Annotated[bool, pl.Boolean]
    mode: Annotated[str, pl.String]  # online, or batch (billed at the Batch API's price)


def polars_schema(record: type) -> dict[str, pl.DataType]:
    """The Parquet columns of a record dataclass: its fields, in order, with the dtype each declares."""
    hints = get_type_hints(record, include_extras=True)
    return {field.name: hints[field.name].__metadata__[0] for field in fields(record)}


CANDIDATE_SCHEMA = polars_schema(CandidateRecord)


def shards(folder: Path) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob(SHARD_GLOB)) if folder.is_dir() else []


def scan_candidates(folder: Path, columns: list[str] | None = None) -> pl.LazyFrame:
    """The store as one lazy frame of the named columns; older shards get nulls for newer columns."""
    columns = list(columns or CANDIDATE_SCHEMA)
    paths = shards(folder)
    if not paths:
        return pl.LazyFrame(schema={name: CANDIDATE_SCHEMA[name] for name in columns})
    return pl.scan_parquet(paths, schema=CANDIDATE_SCHEMA, missing_columns="insert").select(columns)


def read_candidates(folder: Path, columns: list[str] | None = None) -> pl.DataFrame:
    return scan_candidates(folder, columns).collect()


def level_of(path: Path) -> int:
    match = LEVEL.match(path.name)
    return int(match[1]) if match else 0


def shard_path(folder: Path, level: int) -> Path:
    return folder / f"part-L{level}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex}.parquet"


def write_shard(folder: Path, rows: list[CandidateRecord]) -> Path:
    """A new, uniquely named level-0 shard, made visible whole by an atomic rename."""
    frame = pl.DataFrame(rows, schema=CANDIDATE_SCHEMA, orient="row")
    return atomic.write_parquet(shard_path(folder, 0), frame)


def fsync_dir(folder: Path) -> None:
    """Make a rename durable before the files it replaces are deleted."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def merge_shards(folder: Path, sources: list[Path], level: int) -> Path:
    """One shard of `level` holding every row of `sources`, then the sources deleted."""
    target = shard_path(folder, level)
    metadata = {MERGED_FROM: json.dumps([path.name for path in sources])}
    failed = pl.col("reason") == RejectReason.REQUEST_ERROR.value
    with atomic.atomic_path(target) as tmp:
        scan = pl.scan_parquet(sources, schema=CANDIDATE_SCHEMA, missing_columns="insert")
        scan.with_columns(
            candidate_index=pl.when(failed).then(pl.lit(-1, pl.Int32)).otherwise("candidate_index")
        ).sink_parquet(tmp, metadata=metadata)
    fsync_dir(folder)
    for source in sources:
        source.unlink(missing_ok=True)
    return target


def finish_merges(folder: Path) -> int:
    """Delete the sources of merges a crash interrupted; returns how many were left over."""
    replaced = set()
    for path in shards(folder):
        if level_of(path) > 0:
            replaced.update(json.loads(pl.read_parquet_metadata(path).get(MERGED_FROM, "[]")))
    leftovers = [path for path in shards(folder) if path.name in replaced]
    for path in leftovers:
        path.unlink()
    return len(leftovers)


def compact(folder: Path) -> None:
    """Finish interrupted merges, bring shards of older builds to the current schema, then
    merge every level holding `FANOUT` shards or more."""
    folder = Path(folder)
    finish_merges(folder)
    if legacy := [path for path in shards(folder) if not LEVEL.match(path.name)]:
        merge_shards(folder, legacy, 1)
    level = 0
    while paths := [path for path in shards(folder) if level_of(path) >= level]:
        here = [path for path in paths if level_of(path) == level]
        if len(here) >= FANOUT:
            merge_shards(folder, here, level + 1)
        level += 1


@contextmanager
def store_lock(folder: Path) -> Iterator[None]:
    """One build per store at a time: merging is only safe when no other process appends."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"another `dbr build-chains` is writing to {folder}: wait for it to finish, "
                "or give this run another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class CandidateWriter:
    """Buffers records and writes a fresh shard every `flush_rows` records or `flush_seconds`.

    A request's records are added together and a flush takes the whole buffer, so a
    round of an image is on disk entirely or not at all. Shards are encoded, fsynced and
    merged in worker threads: the event loop keeps every request moving meanwhile.
    """

    def __init__(self, folder: Path, flush_rows: int = 2048, flush_seconds: float = 2.0) -> None:
        self.folder = Path(folder)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.buffer: list[CandidateRecord] = []
        self.levels: dict[int, list[Path]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._merging = False
        self._ticker: asyncio.Task | None = None

    async def __aenter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.flush()
        while not all(task.done() for task in self._tasks):
            await asyncio.gather(*self._tasks)
        await asyncio.gather(*self._tasks)
        if len(small := self.levels.get(0, [])) > 1:
            await asyncio.to_thread(merge_shards, self.folder, small, 1)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            self.flush()

    def add(self, records: list[CandidateRecord]) -> None:
        self.buffer.extend(records)
        if len(self.buffer) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the buffer to a writer thread; a failed earlier write or merge raises here or at exit."""
        for done in [task for task in self._tasks if task.done()]:
            self._tasks.discard(done)
            done.result()
        if not self.buffer:
            return
        rows, self.buffer = self.buffer, []
        self._start(self._write(rows))

    def _start(self, work: Coroutine[None, None, None]) -> None:
        self._tasks.add(asyncio.create_task(work))

    async def _write(self, rows: list[CandidateRecord]) -> None:
        path = await asyncio.to_thread(write_shard, self.folder, rows)
        self.levels.setdefault(0, []).append(path)
        self._merge_if_full()

    def _merge_if_full(self) -> None:
        """One merge at a time, of the lowest level that holds FANOUT of this writer's shards."""
        if self._merging:
            return
        for level, paths in sorted(self.levels.items()):
            if len(paths) >= FANOUT:
                batch, self.levels[level] = paths, []
                self._merging = True
                self._start(self._merge(batch, level + 1))
                return

    async def _merge(self, batch: list[Path], level: int) -> None:
        try:
            path = await asyncio.to_thread(merge_shards, self.folder, batch, level)
        finally:
            self._merging = False
        self.levels.setdefault(level, []).append(path)
        self._merge_if_full()

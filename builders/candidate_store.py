"""Every teacher answer, kept in append-only Parquet shards under `candidates/`.

The shards are the build's only state: a shard is written whole to a temporary
file and renamed into place (`atomic.py`), and an existing shard is never
rewritten, so a `kill -9` at any moment leaves only complete shards behind and
loses at most the answers still buffered. Readers dedupe on
(id, round, candidate_index), which keeps a record unique even if a shard were
ever written twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import polars as pl

from domainbed_reasoning import atomic

KEY = ("id", "round", "candidate_index")
SHARD_GLOB = "part-*.parquet"

CANDIDATE_SCHEMA = {
    "id": pl.String,
    "round": pl.Int32,
    "candidate_index": pl.Int32,
    "temperature": pl.Float64,
    "text": pl.String,
    "finish_reason": pl.String,
    "reason": pl.String,
    "predicted": pl.String,
    "detail": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "latency_s": pl.Float64,
    "teacher": pl.String,
    "teacher_url": pl.String,
    "prompt_version": pl.String,
}


@dataclass(frozen=True, slots=True)
class CandidateRecord:
    """One teacher answer and its verdict.

    Token counts and latency belong to the request (one prefill, `n` samples), so
    every candidate of a request repeats them; totals sum `candidate_index == 0`.
    """

    id: str
    round: int
    candidate_index: int
    temperature: float
    text: str
    finish_reason: str | None
    reason: str
    predicted: str | None
    detail: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    teacher: str
    teacher_url: str
    prompt_version: str


def empty_candidates() -> pl.DataFrame:
    return pl.DataFrame(schema=CANDIDATE_SCHEMA)


def read_candidates(folder: Path) -> pl.DataFrame:
    """All shards as one frame, one row per (id, round, candidate_index)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob(SHARD_GLOB)):
        return empty_candidates()
    frame = pl.read_parquet(folder / SHARD_GLOB, schema=CANDIDATE_SCHEMA)
    return frame.unique(subset=list(KEY), keep="first", maintain_order=True)


class CandidateWriter:
    """Buffers records and writes a fresh shard every `flush_rows` records or `flush_seconds`.

    A request's candidates are added together and a flush takes the whole buffer,
    so a round of an image is on disk entirely or not at all. Shards are encoded
    and fsynced in a worker thread: the event loop keeps every request moving
    while one is written.
    """

    def __init__(self, folder: Path, flush_rows: int = 2048, flush_seconds: float = 2.0) -> None:
        self.folder = Path(folder)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.buffer: list[CandidateRecord] = []
        self._writes: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None

    async def __aenter__(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.flush()
        await asyncio.gather(*self._writes)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            self.flush()

    def add(self, records: list[CandidateRecord]) -> None:
        self.buffer.extend(records)
        if len(self.buffer) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        """Hand the buffer to a writer thread; a failed earlier write raises here or at exit."""
        for done in [task for task in self._writes if task.done()]:
            self._writes.discard(done)
            done.result()
        if not self.buffer:
            return
        rows, self.buffer = self.buffer, []
        self._writes.add(asyncio.create_task(asyncio.to_thread(write_shard, self.folder, rows)))


def write_shard(folder: Path, rows: list[CandidateRecord]) -> Path:
    """A new, uniquely named shard, made visible whole by an atomic rename."""
    frame = pl.DataFrame(rows, schema=CANDIDATE_SCHEMA, orient="row")
    name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex}.parquet"
    return atomic.write_parquet(folder / name, frame)

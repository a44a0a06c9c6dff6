"""The candidate store at scale: shards merged as they pile up, a kill mid-merge loses and doubles
nothing, shards written before the store had levels or provenance columns still read."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.builders.store.candidate_store import (
    CANDIDATE_SCHEMA,
    FANOUT,
    KEY,
    CandidateRecord,
    CandidateWriter,
    compact,
    level_of,
    read_candidates,
    shards,
    write_shard,
)

REPO = Path(__file__).resolve().parents[1]
LEGACY_COLUMNS = list(CANDIDATE_SCHEMA)[:15]  # the schema before seeds, fingerprints and times


def record(index: int) -> CandidateRecord:
    return CandidateRecord(
        id=f"SynthDG/photo/circle/{index:05d}.png", round=1, candidate_index=0, temperature=0.7,
        text=f"<SUMMARY>{index}</SUMMARY>", finish_reason="stop", reason="wrong_class",
        predicted="star", detail="concluded 'star'", prompt_tokens=10, completion_tokens=20,
        latency_s=0.3, teacher="t", teacher_url="127.0.0.1:8000", prompt_version="v", seed=index,
        top_p=1.0, max_tokens=1024, server_model="t", system_fingerprint=None,
        timestamp=datetime.now(UTC), downscaled=False, mode="online",
    )  # fmt: skip


def ids(folder: Path) -> list[str]:
    return sorted(read_candidates(folder, ["id"])["id"].to_list())


def expected(count: int) -> list[str]:
    return sorted(record(index).id for index in range(count))


async def test_a_writer_merges_its_own_shards_and_keeps_every_record(tmp_path: Path) -> None:
    count = 3 * FANOUT + 5
    async with CandidateWriter(tmp_path, flush_rows=1, flush_seconds=60) as writer:
        for index in range(count):
            writer.add([record(index)])
            if index % 8 == 0:  # let the writer threads run, as requests would
                writer.flush()
                await writer_idle(writer)
    files = shards(tmp_path)
    assert len(files) <= 4, [path.name for path in files]
    assert max(level_of(path) for path in files) >= 1
    assert ids(tmp_path) == expected(count)


async def writer_idle(writer: CandidateWriter) -> None:
    while not all(task.done() for task in writer._tasks):
        await asyncio.sleep(0.001)


def legacy_shard(folder: Path, index: int, reason: str) -> None:
    """A shard as builds wrote it before this store had levels and provenance columns."""
    frame = (
        pl.DataFrame([record(index)], schema=CANDIDATE_SCHEMA, orient="row")
        .select(LEGACY_COLUMNS)
        .with_columns(reason=pl.lit(reason))
    )
    frame.write_parquet(folder / f"part-20250101T000000-{uuid.uuid4().hex}.parquet")


def test_start_up_merges_what_killed_runs_left(tmp_path: Path) -> None:
    for index in range(FANOUT + 3):
        write_shard(tmp_path, [record(index)])
    before = read_candidates(tmp_path)
    compact(tmp_path)
    assert [level_of(path) for path in shards(tmp_path)] == [1]
    assert read_candidates(tmp_path).sort("id").equals(before.sort("id"))


def test_shards_of_older_builds_are_read_and_brought_to_one_schema(tmp_path: Path) -> None:
    """An older build's shard had 15 columns, no level in its name, and a failed request's
    row was candidate 0; one merge at start-up gives every shard the current schema, so a
    reader that expects one schema (as export's does) reads the store whole."""
    for index in range(3):
        legacy_shard(tmp_path, index, reason="request_error" if index == 0 else "wrong_class")
    write_shard(tmp_path, [record(3)])
    old = read_candidates(tmp_path)
    assert old.filter(pl.col("seed").is_null()).height == 3
    compact(tmp_path)
    assert sorted(level_of(path) for path in shards(tmp_path)) == [0, 1]
    merged = read_candidates(tmp_path).sort("id")
    failed = pl.col("reason") == "request_error"
    assert merged.filter(failed)["candidate_index"].to_list() == [-1]
    assert merged.filter(~failed).equals(old.filter(~failed).sort("id"))
    frames = [pl.read_parquet(path) for path in shards(tmp_path)]
    assert all(frame.columns == list(CANDIDATE_SCHEMA) for frame in frames)


def test_levels_below_the_fanout_are_left_alone(tmp_path: Path) -> None:
    for index in range(FANOUT - 1):
        write_shard(tmp_path, [record(index)])
    before = sorted(path.name for path in shards(tmp_path))
    compact(tmp_path)
    assert sorted(path.name for path in shards(tmp_path)) == before


KILLER = """
import sys, time
from pathlib import Path
from domainbed_reasoning.builders.store import candidate_store as store

def pause(*args, **kwargs):
    print("ready", flush=True)
    time.sleep(60)

if sys.argv[2] == "after-rename":
    store.fsync_dir = pause
else:
    unlink, deleted = Path.unlink, []
    def counting_unlink(self, missing_ok=False):
        unlink(self, missing_ok=missing_ok)
        if self.name.startswith("part-"):
            deleted.append(self)
        if len(deleted) == 5:
            pause()
    Path.unlink = counting_unlink
store.compact(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("moment", ["after-rename", "after-five-deletes"])
def test_a_kill_in_the_middle_of_a_merge_loses_and_doubles_nothing(
    tmp_path: Path, moment: str
) -> None:
    count = FANOUT + 4
    for index in range(count):
        write_shard(tmp_path, [record(index)])
    child = subprocess.Popen(
        [sys.executable, "-c", KILLER, str(tmp_path), moment],
        stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert child.stdout.readline().strip() == "ready", "the merge never reached the kill point"
    child.send_signal(signal.SIGKILL)
    assert child.wait(10) == -signal.SIGKILL
    names = [path.name for path in shards(tmp_path)]
    assert sum(level_of(path) == 1 for path in shards(tmp_path)) == 1
    assert len(names) == 1 + count - (5 if moment == "after-five-deletes" else 0)

    compact(tmp_path)
    assert [level_of(path) for path in shards(tmp_path)] == [1]
    frame = read_candidates(tmp_path)
    assert frame.height == frame.unique(subset=list(KEY)).height == count
    assert ids(tmp_path) == expected(count)

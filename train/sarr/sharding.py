"""Generation work split across processes and into chunks: SARR self-labelling and evaluation.

Under `accelerate launch` every process is a rank with its own GPU. Generating with
rank 0 alone would leave the others idle at a barrier for as long as it takes to
label a training set (hours at the paper's scale, past any collective timeout), so
each rank takes a contiguous share of the rows, writes its own Parquet part, and
rank 0 concatenates the parts in rank order once everyone has finished. A part on
disk is a finished share: a killed run skips it when resumed with the same number
of processes.

Shares and chunks start on multiples of the engine's batch size, so a run cut into
2 shares generates exactly the batches a 1-process run does and, with the engine's
per-batch seeds, gives the same answers. Chunks bound memory: only one chunk's
image bytes are held at a time, whatever the size of the split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import datasets
import polars as pl
import torch
from accelerate import PartialState
from datasets import Dataset
from domainbed_reasoning.train.engines.base import (
    Generation,
    GenerationEngine,
    GenRequest,
    SamplingSpec,
)

from domainbed_reasoning import atomic
from domainbed_reasoning.errors import UserError

CHUNK_ROWS = 512  # rows per generate() call: enough to keep an engine's batches full, few in memory


def process_state(timeout_s: int | None = None) -> PartialState:
    """The run's processes; the first call creates the process group, with `timeout_s` as its
    collective timeout (every later call, the Trainer's included, reuses that group).

    Without CUDA the processes talk over gloo (`cpu=True`, as the Trainer's `use_cpu`); else
    accelerate would take a CPU-only launch for one process.
    """
    options = {"cpu": not torch.cuda.is_available()}
    if timeout_s is not None:
        options["timeout"] = timedelta(seconds=timeout_s)
    return PartialState(**options)


def shard_rows(total: int, rank: int, world: int, unit: int = 1) -> range:
    """Rank `rank`'s contiguous share of `range(total)`, cut on multiples of `unit`."""
    blocks = -(-total // unit)
    start, stop = blocks * rank // world, blocks * (rank + 1) // world
    return range(min(start * unit, total), min(stop * unit, total))


def chunk_size(unit: int) -> int:
    """About CHUNK_ROWS rows, a multiple of `unit` so that chunks never split a batch."""
    return max(unit, CHUNK_ROWS // unit * unit)


def part_path(target: Path, rank: int, world: int) -> Path:
    return target.with_name(f"{target.stem}.rank-{rank}-of-{world}{target.suffix}")


def _stale_parts(target: Path, world: int) -> list[Path]:
    pattern = re.compile(rf"{re.escape(target.stem)}\.rank-\d+-of-(\d+){re.escape(target.suffix)}")
    return [
        path
        for path in target.parent.glob(f"{target.stem}.rank-*")
        if (found := pattern.fullmatch(path.name)) and int(found.group(1)) != world
    ]


def sharded_table(
    state: PartialState,
    target: Path,
    total: int,
    unit: int,
    build: Callable[[range], pl.DataFrame],
) -> pl.DataFrame:
    """`build` run on this rank's share of `range(total)`; rank 0 writes the concatenation to `target`.

    Every rank returns the whole table. Parts of a run with another number of processes are
    ignored and removed: their shares do not line up with this run's.
    """
    world, rank = state.num_processes, state.process_index
    part = part_path(target, rank, world)
    if not target.is_file() and not part.is_file():
        atomic.write_parquet(part, build(shard_rows(total, rank, world, unit)))
    state.wait_for_everyone()
    if state.is_main_process and not target.is_file():
        parts = [part_path(target, index, world) for index in range(world)]
        atomic.write_parquet(target, pl.concat([pl.read_parquet(path) for path in parts]))
        for path in [*parts, *_stale_parts(target, world)]:
            path.unlink(missing_ok=True)
    state.wait_for_everyone()
    return pl.read_parquet(target)


def row_chunks(split: Dataset, rows: range, columns: list[str], size: int) -> Iterator[dict[str, list]]:
    """`columns` of `split[rows]`, `size` rows at a time, images as their encoded bytes (never decoded)."""
    view = split.select_columns(columns)
    if "image" in columns:
        view = view.cast_column("image", datasets.Image(decode=False))
    for start in range(rows.start, rows.stop, size):
        chunk = view[start : min(start + size, rows.stop)]
        if "image" in chunk:
            chunk["image"] = [_image_bytes(row_id, image) for row_id, image in zip(chunk["id"], chunk["image"], strict=True)]
        yield chunk


def _image_bytes(row_id: str, image: dict[str, Any] | None) -> bytes:
    image = image or {}
    if image.get("bytes"):
        return image["bytes"]
    if image.get("path") and Path(image["path"]).is_file():
        return Path(image["path"]).read_bytes()
    raise UserError(
        f"image {row_id} is missing (no bytes, no readable file): re-export the dataset with embedded images"
    )


@dataclass(frozen=True)
class Ask:
    """One question put to every image: `prompt` under `sampling`, and how a chunk's answers
    (the chunk's `columns`, its generations in order) become rows of the table."""

    prompt: str
    sampling: SamplingSpec
    columns: tuple[str, ...]
    read: Callable[[dict[str, list], list[Generation]], pl.DataFrame]
    schema: dict[str, Any]


def generate_rows(
    engine: GenerationEngine, split: Dataset, rows: range, ask: Ask, unit: int, progress: bool = True
) -> pl.DataFrame:
    """`ask` answered for `split[rows]`, one chunk of image bytes in memory at a time."""
    frames = [pl.DataFrame(schema=ask.schema)]
    for chunk in row_chunks(split, rows, ["id", "image", *ask.columns], chunk_size(unit)):
        requests = [
            GenRequest(row_id, image, ask.prompt)
            for row_id, image in zip(chunk["id"], chunk["image"], strict=True)
        ]
        frames.append(ask.read(chunk, engine.generate(requests, ask.sampling, progress)))
    return pl.concat(frames)


def generated_table(
    state: PartialState,
    target: Path,
    split: Dataset,
    ask: Ask,
    unit: int,
    engine: Callable[[], GenerationEngine],
    progress: bool = True,
) -> pl.DataFrame:
    """`ask` over every row of `split`, each rank its share (`sharded_table`); `engine()` is called
    only by a rank that still has a share to generate, so a finished table starts no engine."""
    return sharded_table(
        state, target, len(split), unit, lambda rows: generate_rows(engine(), split, rows, ask, unit, progress)
    )

"""Sampled answers for a split, each process its share, from a real vLLM server (the engine's
requests, seeded per image and round); rank 0's table lands at `<out>/answers.parquet`.

tests/test_distributed.py runs it with 2 processes, removes the table, puts back rank 0's part
as a killed run would have left it, and runs it again: rank 1 redoes its share alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import polars as pl
from domainbed_reasoning.train.engines.base import SamplingSpec
from domainbed_reasoning.train.engines.remote_engine import RemoteEngine
from domainbed_reasoning.train.sarr.sharding import Ask, generated_table, process_state
from PIL import Image

IMAGES = 6
COLOURS = ("red", "green", "blue", "yellow", "white", "black")
SCHEMA = {"id": pl.String, "texts": pl.List(pl.String)}


def split() -> datasets.Dataset:
    images = [Image.new("RGB", (48, 48), COLOURS[index]) for index in range(IMAGES)]
    return datasets.Dataset.from_dict(
        {"id": [f"image-{index}" for index in range(IMAGES)], "image": images},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()}),
    )


def read(chunk: dict[str, list], generations: list) -> pl.DataFrame:
    texts = [list(generation.texts) for generation in generations]
    return pl.DataFrame({"id": chunk["id"], "texts": texts}, schema=SCHEMA)


def main(base_url: str, model: str, out: Path) -> None:
    sampling = SamplingSpec(n=2, temperature=1.0, max_new_tokens=8, seed=3, round=1)
    ask = Ask("Describe the image.", sampling, (), read, SCHEMA)
    generated_table(
        process_state(), out / "answers.parquet", split(), ask, 1,
        lambda: RemoteEngine(model, base_url=base_url), progress=False,
    )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))

"""DomainBed-Reasoning rows -> TRL prompt/completion examples for one training method.

Every image gives a classification-path example (classify prompt -> class name), an
image with an accepted chain also a reasoning-path example (reason prompt -> the
five-stage chain); a method takes one path or both (MTCT),
each tagged with its `task` and the image `id` so the trainer can weigh the two
losses apart and keep an image's paths in one optimisation step. Images travel as
their stored bytes (`decode=False`): building the examples never decodes or
re-encodes a picture.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from domainbed_reasoning.train.config import METHODS
from domainbed_reasoning.train.mtct.mtct_loss import TASKS
from PIL import Image

from domainbed_reasoning.chains.prompt_templates import class_list, humanise, load_prompt
from domainbed_reasoning.errors import UserError

TASKS_OF_METHOD: dict[str, tuple[str, ...]] = {
    "cls": ("cls",),
    "reasoning": ("reasoning",),
    "mtct": TASKS,
    "rd-mldg": TASKS,  # every SARR round is an MTCT stage
}
PROMPT_OF_TASK = {"cls": "classify", "reasoning": "reason"}
REQUIRED_COLUMNS = ("id", "image", "label")


def class_names(split: Dataset) -> list[str]:
    """The label names, in label order, from the split's ClassLabel feature."""
    feature = split.features.get("label")
    if not isinstance(feature, datasets.ClassLabel):
        raise UserError(
            "the dataset's `label` column is not a ClassLabel: load DomainBed-Reasoning as exported"
        )
    return list(feature.names)


@dataclass(frozen=True)
class SplitCounts:
    """How many images a split has, and how many of them carry an accepted chain."""

    images: int
    with_chain: int


def has_chain(chains: pa.Array) -> pa.Array:
    """Per row: an accepted chain is present (the export leaves it null for exhausted/pending images)."""
    return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(chains), ""), False)


def check_split(split: Dataset, method: str, name: str = "train") -> SplitCounts:
    """Fail in one line on what would otherwise break training hours later; count the chains.

    Every image must be readable (the classification path, validation and test use them
    all); only the reasoning path needs a chain, so images without one are counted, and
    a reasoning method is refused only when no training image has any.
    """
    needs_chain = "reasoning" in TASKS_OF_METHOD[method]
    missing = [column for column in REQUIRED_COLUMNS if column not in split.column_names]
    if needs_chain and "chain" not in split.column_names:
        missing.append("chain")
    if missing:
        raise UserError(
            f"the {name} split has no {', '.join(missing)} column(s): pass a DomainBed-Reasoning dataset "
            "(`dbr export` output or its Hub repo)"
        )
    columns = ["id", "image", *(["chain"] if "chain" in split.column_names else [])]
    view = split.select_columns(columns).cast_column("image", datasets.Image(decode=False))
    with_chain = 0
    for batch in view.with_format("arrow").iter(batch_size=1024):
        _check_images(batch, name)
        if "chain" in columns:
            with_chain += pc.sum(has_chain(batch.column("chain"))).as_py() or 0
    counts = SplitCounts(len(split), with_chain)
    if needs_chain and name == "train" and counts.with_chain == 0:
        raise UserError(
            f"no image of the {name} split has an accepted reasoning chain: build chains first "
            "(`make build-chains`) or train with --method cls"
        )
    return counts


def _check_images(batch: Any, name: str) -> None:
    images = batch.column("image")
    for row_id, image in zip(batch.column("id").to_pylist(), images.to_pylist(), strict=True):
        if image is None or (
            image["bytes"] is None and not (image["path"] and Path(image["path"]).is_file())
        ):
            raise UserError(
                f"image {row_id} in the {name} split is missing (no bytes, no readable file): "
                "re-export the dataset with embedded images"
            )


def build_examples(
    split: Dataset,
    method: str,
    classes: Sequence[str],
    max_images: int | None = None,
    seed: int = 0,
) -> Dataset:
    """One row per (image, task of `method`), an image's rows adjacent, in split order.

    The classification path takes every image; the reasoning path only those with an
    accepted chain (DomainBed-Reasoning keeps exhausted images with a null chain).
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if max_images is not None and max_images < len(split):
        split = split.shuffle(seed=seed).select(range(max_images))
    tasks = TASKS_OF_METHOD[method]
    prompts = {task: task_prompt(task, classes) for task in tasks}
    columns = ["id", "image", "label", *(["chain"] if "reasoning" in tasks else [])]
    view = split.select_columns(columns).cast_column("image", datasets.Image(decode=False))
    examples = view.map(
        _expand,
        batched=True,
        remove_columns=columns,
        fn_kwargs={"tasks": tasks, "prompts": prompts, "classes": list(classes)},
        desc=f"{method} examples",
    )
    return examples.cast_column("images", datasets.List(datasets.Image()))


def task_prompt(task: str, classes: Sequence[str]) -> str:
    """The prompt text of one path; evaluation and SARR ask with exactly what training taught."""
    return load_prompt(PROMPT_OF_TASK[task]).render(classes=class_list(classes))


def _expand(
    batch: dict[str, list], tasks: tuple[str, ...], prompts: dict[str, str], classes: list[str]
) -> dict:
    rows: dict[str, list] = {"id": [], "task": [], "images": [], "prompt": [], "completion": []}
    for index, row_id in enumerate(batch["id"]):
        for task in tasks:
            chain = batch["chain"][index] if task == "reasoning" else None
            if task == "reasoning" and not (chain and chain.strip()):
                continue
            answer = humanise(classes[batch["label"][index]]) if task == "cls" else chain
            rows["id"].append(row_id)
            rows["task"].append(task)
            rows["images"].append([batch["image"][index]])
            rows["prompt"].append(user_message(prompts[task]))
            rows["completion"].append(
                [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            )
    return rows


def image_sizes(examples: Dataset, batch_size: int = 1024) -> list[tuple[int, int]]:
    """(height, width) of each example's image, read from the stored image's header (no pixels
    decoded), a batch of rows at a time: what the length-grouped sampler counts image tokens from.
    Read only there, so training without it pays nothing."""
    view = examples.select_columns(["images"]).cast_column(
        "images", datasets.List(datasets.Image(decode=False))
    )
    return [header_size(images[0]) for batch in view.iter(batch_size) for images in batch["images"]]


def header_size(image: dict[str, Any]) -> tuple[int, int]:
    source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    with Image.open(source) as opened:
        return opened.height, opened.width


def user_message(prompt: str) -> list[dict]:
    """The conversational prompt TRL's vision collator expects: one image part, then the text."""
    return [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}],
        }
    ]

"""DomainBed-Reasoning rows -> TRL prompt/completion examples for one training method.

Every image gives a classification-path example (classify prompt -> class name), a
reasoning-path example (reason prompt -> the five-stage chain), or both (MTCT),
each tagged with its `task` and the image `id` so the trainer can weigh the two
losses apart and keep an image's paths in one optimisation step. Images travel as
their stored bytes (`decode=False`): building the examples never decodes or
re-encodes a picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from datasets import Dataset

from domainbed_reasoning.chains.prompt_templates import class_list, humanise, load_prompt
from domainbed_reasoning.errors import UserError
from train.config import METHODS
from train.mtct_loss import TASKS

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


def check_split(split: Dataset, method: str, name: str = "train") -> None:
    """Fail in one line on what would otherwise break training hours later."""
    missing = [column for column in REQUIRED_COLUMNS if column not in split.column_names]
    if "reasoning" in TASKS_OF_METHOD[method] and "chain" not in split.column_names:
        missing.append("chain")
    if missing:
        raise UserError(
            f"the {name} split has no {', '.join(missing)} column(s): pass a DomainBed-Reasoning dataset "
            "(`dbr export` output or its Hub repo)"
        )
    needs_chain = "reasoning" in TASKS_OF_METHOD[method]
    columns = ["id", "image", *(["chain"] if needs_chain else [])]
    view = split.select_columns(columns).cast_column("image", datasets.Image(decode=False))
    for batch in view.with_format("arrow").iter(batch_size=1024):
        _check_batch(batch, name, needs_chain)


def _check_batch(batch: Any, name: str, needs_chain: bool) -> None:
    if needs_chain:
        chains = batch.column("chain")
        empty = pc.or_kleene(pc.is_null(chains), pc.equal(pc.utf8_trim_whitespace(chains), ""))
        if pc.any(empty).as_py():
            first = batch.column("id")[pc.index(empty, True).as_py()].as_py()
            raise UserError(
                f"image {first} in the {name} split has no reasoning chain: build chains first "
                "(`make build-chains`) or train with --method cls"
            )
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
    """One row per (image, task of `method`), an image's rows adjacent, in split order."""
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
            answer = (
                humanise(classes[batch["label"][index]]) if task == "cls" else batch["chain"][index]
            )
            rows["id"].append(row_id)
            rows["task"].append(task)
            rows["images"].append([batch["image"][index]])
            rows["prompt"].append(user_message(prompts[task]))
            rows["completion"].append(
                [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
            )
    return rows


def user_message(prompt: str) -> list[dict]:
    """The conversational prompt TRL's vision collator expects: one image part, then the text."""
    return [
        {
            "role": "user",
            "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}],
        }
    ]

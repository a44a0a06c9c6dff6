"""The base model with a LoRA adapter folded in, written once per machine for vLLM to serve.

vLLM applies LoRA to the language model only, so an adapter that also adapts the vision
encoder is served as a merged checkpoint. At an 8B model that is a ~16 GB load into
memory and a ~16 GB folder: several processes of one machine share one, made by the first
of them to take the folder's lock while the others wait, in a folder the caller chooses
(beside the run, or a cache folder with room) and removes once the step is done. The
merged weights are stored in the base's dtype, so the adapter's update is rounded to it,
as it is for the model vLLM serves.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from domainbed_reasoning.train.engines.transformers_engine import load_merged
from domainbed_reasoning.train.model.processor import ImageLimits, load_processor
from transformers.utils import cached_file

from domainbed_reasoning.errors import UserError

MERGED = "merged"
LOCK = ".merge.lock"
SOURCE = "merge_source.json"  # what a merged folder was made from, so it is never served for another
HEADROOM = 1.05  # safetensors' headers and the processor's files on top of the tensors


def merged_checkpoint(
    model: str, adapter: Path, folder: Path, limits: ImageLimits | None = None
) -> Path:
    """`folder/merged`, made by the first process to get here; the others wait on the lock, then
    reuse it. A merged folder made from other weights (a run trained again) is made anew."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / MERGED
    with open(folder / LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _source_of(out) != merge_source(model, adapter, limits):
            merge_adapter(model, adapter, out, limits)
    return out


def merge_source(model: str, adapter: Path, limits: ImageLimits | None) -> dict[str, Any]:
    """The inputs of a merge: the base, the adapter's weights file (path, size, time) and the image limits."""
    weights = next(Path(adapter).glob("adapter_model.*"), Path(adapter))
    stat = weights.stat()
    return {
        "model": model,
        "adapter": str(weights.resolve()),
        "adapter_bytes": stat.st_size,
        "adapter_mtime_ns": stat.st_mtime_ns,
        "image_limits": dataclasses.asdict(limits) if limits else None,
    }


def _source_of(merged: Path) -> dict[str, Any] | None:
    try:
        return json.loads((merged / SOURCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def merge_adapter(model: str, adapter: Path, out: Path, limits: ImageLimits | None = None) -> Path:
    """A full checkpoint (weights in the base's dtype, processor with `limits`) with the adapter
    folded in; written beside `out` and renamed into place, so `out` is complete or absent."""
    if (size := checkpoint_bytes(model)) is not None:
        check_space(out.parent, size)  # before a load that takes minutes at the paper's size
    merged = load_merged(model, adapter, dtype="auto")
    check_space(out.parent, sum(t.numel() * t.element_size() for t in merged.state_dict().values()))
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    load_processor(model, limits).save_pretrained(staging)
    (staging / SOURCE).write_text(json.dumps(merge_source(model, adapter, limits)), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def checkpoint_bytes(model: str) -> int | None:
    """The size of `model`'s safetensors weights (a folder, or a Hub id's index), None when unknown."""
    try:
        index = cached_file(model, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
        if index is not None:
            return json.loads(Path(index).read_text(encoding="utf-8"))["metadata"]["total_size"]
        single = cached_file(model, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    except (OSError, KeyError, ValueError):
        return None
    return Path(single).stat().st_size if single is not None else None


def check_space(folder: Path, needed_bytes: int) -> None:
    """Refuse in one line before writing a checkpoint that would fill the disk half-way."""
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * HEADROOM:
        gib = 2**30
        raise UserError(
            f"the merged checkpoint for vLLM needs {needed_bytes * HEADROOM / gib:.1f} GiB in {folder}, "
            f"which has {free / gib:.1f} GiB free: free space there, or set vllm_merge_dir to a folder with room"
        )


def discard_merged(folder: Path | None) -> None:
    """Remove a step's merged checkpoint (and its lock) once every process is done with it."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)

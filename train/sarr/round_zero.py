"""RD-MLDG's round 0 taken from a finished `--method mtct` run instead of trained again.

Round 0 of RD-MLDG *is* MTCT on the teacher's chains, so a user who has trained MTCT
(to report it beside RD-MLDG, as the paper's ablation does) would otherwise pay for
the same training twice. `sarr_round0_from: <mtct run folder>` copies that run's
weights and metrics into `round-0/`, after checking it was trained on the same data,
split, base model and training settings; any difference is named in the error,
because a round 0 from other settings would silently change what RD-MLDG means.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import polars as pl
from domainbed_reasoning.train.config import TrainConfig, load_config
from domainbed_reasoning.train.model.weights import stage_weights

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.errors import UserError

# Settings that shape only the SARR rounds or the bookkeeping, never round 0's weights.
NOT_ROUND_ZERO = frozenset(
    {
        "method",
        "sarr_rounds",
        "sarr_init",
        "sarr_round0_from",
        "self_label_candidates",
        "self_label_temperature",
        "self_label_max_new_tokens",
        "engine",
        "generation_batch_size",
        "vllm_max_model_len",
        "vllm_tensor_parallel_size",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "report_to",
        "dataloader_num_workers",
        "distributed_timeout_s",
        "model_selection",
    }
)
RUN_IDENTITY = ("dataset", "data", "target", "model")
# What a finished mtct run folder holds besides its weights, each a function of the folder.
FINISHED_RUN_FILES = (
    artefacts.metrics_path,
    artefacts.run_config_path,
    artefacts.run_info_path,
    artefacts.split_path,
)


def copy_folder(source: Path, target: Path) -> None:
    """`target` becomes a copy of `source` whole, or stays as it was: staged beside it, then renamed."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _same(a: object, b: object) -> bool:
    """Equal values, or two spellings of one existing path."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return False


def round_zero_mismatches(source: Path, run_dir: Path, config: TrainConfig) -> list[str]:
    """What differs between the MTCT run `source` and this RD-MLDG run's round 0; empty when it may be reused."""
    theirs = load_config(artefacts.run_config_path(source))
    problems = [] if theirs.method == "mtct" else [f"method is {theirs.method}, not mtct"]
    problems += [
        f"{field.name} {getattr(theirs, field.name)!r} vs {getattr(config, field.name)!r}"
        for field in fields(TrainConfig)
        if field.name not in NOT_ROUND_ZERO
        and getattr(theirs, field.name) != getattr(config, field.name)
    ]
    their_run = atomic.read_json(artefacts.run_info_path(source))
    our_run = atomic.read_json(artefacts.run_info_path(run_dir))
    problems += [
        f"{key} {their_run.get(key)!r} vs {our_run.get(key)!r}"
        for key in RUN_IDENTITY
        if not _same(their_run.get(key), our_run.get(key))
    ]
    if not pl.read_parquet(artefacts.split_path(source)).equals(
        pl.read_parquet(artefacts.split_path(run_dir))
    ):
        problems.append("the train/validation split differs")
    return problems


def adopt_round_zero(source: Path, run_dir: Path, config: TrainConfig, base_model: str) -> None:
    """Copy the MTCT run's weights and metrics.json into `run_dir/round-0/`, after checking it matches."""
    source = Path(source)
    needed = [path_of(source) for path_of in FINISHED_RUN_FILES]
    if not all(path.is_file() for path in needed):
        names = ", ".join(path.name for path in needed)
        raise UserError(
            f"sarr_round0_from {source} is not a finished mtct run (it lacks {names}): "
            "train it with `dbr train --method mtct`, or drop sarr_round0_from"
        )
    problems = round_zero_mismatches(source, run_dir, config)
    if problems:
        raise UserError(
            f"sarr_round0_from {source} cannot be this run's round 0 ({'; '.join(problems)}): "
            "train that mtct run with these settings, or drop sarr_round0_from"
        )
    weights = stage_weights(source, base_model).folder
    folder = artefacts.round_dir(run_dir, 0)
    folder.mkdir(parents=True, exist_ok=True)
    copy_folder(weights, folder / weights.name)
    shutil.copyfile(artefacts.metrics_path(source), artefacts.metrics_path(folder))

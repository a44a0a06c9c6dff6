"""Where every artefact lives on disk (docs/architecture.md, "Artefacts").

Stages find each other's files only through these functions, so a path is
decided in exactly one place.
"""

from __future__ import annotations

import re
from pathlib import Path

from domainbed_reasoning.data.registry import DatasetSpec

_EVAL = "eval"
_METRICS = "metrics.json"
_ROUND = "round-"


def dataset_root(data_dir: Path, spec: DatasetSpec) -> Path:
    """`data/<dirname>`: DomainBed's layout, `<domain>/<class>/<image>` below it."""
    return Path(data_dir) / spec.dirname


def chains_dir(out: Path, spec: DatasetSpec) -> Path:
    """`runs/chains/<DATASET>`: manifest, candidates/, chains.parquet, stats.json, report.md."""
    return Path(out) / spec.name


def manifest_path(chains: Path) -> Path:
    return chains / "manifest.parquet"


def candidates_dir(chains: Path) -> Path:
    return chains / "candidates"


def chains_path(chains: Path) -> Path:
    return chains / "chains.parquet"


def stats_path(chains: Path) -> Path:
    return chains / "stats.json"


def report_path(chains: Path) -> Path:
    return chains / "report.md"


def rejudge_path(chains: Path) -> Path:
    """What the last `--rejudge` changed; a readable rejudge.md sits beside it."""
    return chains / "rejudge.json"


def image_id(spec: DatasetSpec, domain: str, class_name: str, filename: str) -> str:
    """Stable record id `dataset/domain/class/file`: the key that joins every stage."""
    return f"{spec.name}/{domain}/{class_name}/{filename}"


def export_dataset_dir(export: Path, spec: DatasetSpec) -> Path:
    """`domainbed-reasoning/<DATASET>`: one Hub config, its shards and its build facts."""
    return Path(export) / spec.name


def build_facts_path(dataset_export: Path) -> Path:
    """How a dataset was built (teacher, prompt, acceptance), kept beside its shards for the card."""
    return dataset_export / "build.json"


def split_name(domain: str) -> str:
    """Hub split names must match `\\w+`: the domain "Real World" is published as `Real_World`."""
    return re.sub(r"\W+", "_", domain)


def shard_name(domain: str, index: int, count: int) -> str:
    """`<split>-NNNNN-of-NNNNN.parquet`, the Hub's own shard naming."""
    return f"{split_name(domain)}-{index:05d}-of-{count:05d}.parquet"


def split_files_pattern(spec: DatasetSpec, domain: str) -> str:
    """The `data_files` glob of one split, relative to the export folder."""
    return f"{spec.name}/{split_name(domain)}-*.parquet"


# --- training runs: <out>/<DATASET>/<target>/<method>/ -------------------------------------------
#
# A stage folder is a run folder or one of an rd-mldg run's rounds: both hold the trained weights
# (adapter/ or model/, named by train/model/weights.py), checkpoints/, logs/ and metrics.json.


def run_dir(out: Path, dataset: str, target: str, method: str) -> Path:
    """One `dbr train` run; `method` is `zeroshot-<name>` for a model evaluated as is."""
    return Path(out) / dataset / target / method


def run_config_path(run: Path) -> Path:
    """The resolved training settings, reusable with `--config`."""
    return run / "config.yaml"


def run_info_path(run: Path) -> Path:
    """run.json: dataset, data, target, base model and image counts (or a zero-shot model's identity)."""
    return run / "run.json"


def split_path(run: Path) -> Path:
    """Which image went to which split: the run's LODO split, checked again by evaluation."""
    return run / "split.parquet"


def metrics_path(folder: Path) -> Path:
    """A stage's, a whole run's or an evaluation's metrics.json: written last, it marks the folder finished."""
    return folder / _METRICS


def checkpoints_dir(folder: Path) -> Path:
    """A stage's Trainer checkpoints (`checkpoint-<step>/`), for --resume and model selection."""
    return folder / "checkpoints"


def logs_dir(folder: Path) -> Path:
    """A stage's TensorBoard logs."""
    return folder / "logs"


def sarr_state_path(run: Path) -> Path:
    """An rd-mldg run's finished steps, rewritten after each one."""
    return run / "state.json"


def round_dir(run: Path, round_: int) -> Path:
    """`round-<r>/`: one SARR round's stage folder."""
    return run / f"{_ROUND}{round_}"


def round_dirs(run: Path) -> list[Path]:
    """The round folders `run` holds, by name."""
    return sorted(run.glob(f"{_ROUND}*"))


def self_labels_path(round_folder: Path) -> Path:
    """The chains a round trains on: the previous round's model's label-consistent ones, merged."""
    return round_folder / "self_labels.parquet"


def self_label_stats_path(round_folder: Path) -> Path:
    """A round's self-labelling counts and settings."""
    return round_folder / "self_label_stats.json"


# --- evaluations: <run>/eval/ ---------------------------------------------------------------------


def eval_dir(run: Path) -> Path:
    """Predictions per (split, mode), settings.json, metrics.json (`metrics_path`), selection/."""
    return run / _EVAL


def eval_settings_path(evaluation: Path) -> Path:
    """What the predictions depend on, recorded before the first one: a resume must not mix two."""
    return evaluation / "settings.json"


def predictions_path(evaluation: Path, split: str, mode: str) -> Path:
    return evaluation / f"predictions-{split}-{mode}.parquet"


def selection_dir(evaluation: Path, checkpoint: str) -> Path:
    """The validation predictions of one kept checkpoint, under `training-domain` model selection."""
    return evaluation / "selection" / checkpoint


def evaluations_under(runs: Path) -> list[Path]:
    """The metrics.json of every finished evaluation below `runs`, at any depth, sorted."""
    return sorted(Path(runs).rglob(f"{_EVAL}/{_METRICS}"))


def evaluated_run(evaluation_metrics: Path) -> Path:
    """The run folder an evaluation's metrics.json belongs to."""
    return evaluation_metrics.parent.parent


# --- the report: runs/report/ ---------------------------------------------------------------------


def results_markdown_path(out: Path) -> Path:
    return Path(out) / "results.md"


def results_plot_path(out: Path) -> Path:
    return Path(out) / "results.png"


def results_data_path(out: Path) -> Path:
    return Path(out) / "results.json"

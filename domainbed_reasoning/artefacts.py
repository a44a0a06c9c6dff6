"""Where every artefact lives on disk (docs/architecture.md, "Artefacts").

Stages find each other's files only through these functions, so a path is
decided in exactly one place.
"""

from __future__ import annotations

import re
from pathlib import Path

from domainbed_reasoning.data.registry import DatasetSpec

SELF_LABEL_STATS = "self_label_stats.json"  # a SARR round's self-labelling counts, in its folder


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

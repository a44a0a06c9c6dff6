"""Where every artefact lives on disk (DESIGN.md, "Artefacts").

Stages find each other's files only through these functions, so a path is
decided in exactly one place.
"""

from __future__ import annotations

from pathlib import Path

from .registry import DatasetSpec


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


def image_id(spec: DatasetSpec, domain: str, class_name: str, filename: str) -> str:
    """Stable record id `dataset/domain/class/file`: the key that joins every stage."""
    return f"{spec.name}/{domain}/{class_name}/{filename}"

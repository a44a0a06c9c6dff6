"""Walk a DomainBed folder into a manifest: one row per image, the key every stage joins on.

The walk validates the layout against the registry (an unknown folder is a typo or
a wrong `--data-dir`, not data to guess about) and probes each image cheaply: the
header gives the size, the tail tells whether the file was cut short. Bad files are
listed, skipped and counted, never silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from PIL import Image, UnidentifiedImageError

from domainbed_reasoning import atomic
from domainbed_reasoning.artefacts import dataset_root, image_id
from domainbed_reasoning.data.registry import DatasetSpec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console, err_console

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TAIL_BYTES = 4096

MANIFEST_SCHEMA = {
    "id": pl.String,
    "dataset": pl.String,
    "domain": pl.String,
    "class_name": pl.String,
    "label": pl.Int32,
    "path": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "bytes": pl.Int64,
}


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class ScanResult:
    frame: pl.DataFrame
    skipped: list[SkippedFile] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        rows = self.frame.group_by("domain").len().sort("domain").iter_rows()
        return dict(rows)


class BadImage(Exception):
    """Why one file cannot be used; becomes a `SkippedFile` reason."""


def _is_complete(path: Path, fmt: str | None, size: int) -> bool:
    """A cut-off download keeps a valid header; only the end-of-image marker tells."""
    if fmt not in ("JPEG", "PNG"):
        return True
    with open(path, "rb") as handle:
        handle.seek(max(0, size - TAIL_BYTES))
        tail = handle.read()
    marker = b"\xff\xd9" if fmt == "JPEG" else b"IEND"
    return marker in tail


def probe_image(path: Path, size: int) -> tuple[int, int]:
    """Width and height from the header, after checking the file is whole."""
    if size == 0:
        raise BadImage("empty file")
    try:
        with Image.open(path) as image:
            width, height = image.size
            fmt = image.format
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise BadImage(f"unreadable image ({type(err).__name__})") from err
    if not _is_complete(path, fmt, size):
        raise BadImage(f"truncated {fmt} (no end marker)")
    return width, height


def _subdirs(folder: Path) -> list[os.DirEntry]:
    return sorted(
        (entry for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")),
        key=lambda entry: entry.name,
    )


def _check_folders(found: list[str], expected: tuple[str, ...], what: str, where: Path, fix: str) -> None:
    unknown = sorted(set(found) - set(expected))
    if unknown:
        raise UserError(
            f"unknown {what} folder {str(where / unknown[0])!r}: expected one of {', '.join(expected)}; {fix}"
        )


def _fix_hint(spec: DatasetSpec, data_dir: Path) -> str:
    if spec.name == "SynthDG":
        return f"generate it with `dbr synth --data-dir {data_dir}`"
    return f"fetch it with `dbr download {spec.name} --data-dir {data_dir}`"


def scan_dataset(spec: DatasetSpec, data_dir: Path) -> ScanResult:
    data_dir = Path(data_dir)
    root = dataset_root(data_dir, spec)
    fix = _fix_hint(spec, data_dir)
    if not root.is_dir():
        raise UserError(f"dataset folder {str(root)!r} not found: {fix}")
    domain_dirs = _subdirs(root)
    _check_folders([d.name for d in domain_dirs], spec.domains, "domain", root, fix)
    missing = [d for d in spec.domains if d not in {entry.name for entry in domain_dirs}]
    if missing:
        raise UserError(f"domain folder {str(root / missing[0])!r} is missing: {fix}")

    rows: list[tuple] = []
    skipped: list[SkippedFile] = []
    for domain_dir in domain_dirs:
        class_dirs = _subdirs(Path(domain_dir.path))
        _check_folders([c.name for c in class_dirs], spec.classes, "class", Path(domain_dir.path), fix)
        before = len(rows)
        for class_dir in class_dirs:
            label = spec.label_of(class_dir.name)
            for entry in sorted(os.scandir(class_dir.path), key=lambda e: e.name):
                if not entry.is_file() or entry.name.startswith("."):
                    continue
                path = Path(entry.path).resolve()
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append(SkippedFile(str(path), "not an image file"))
                    continue
                size = entry.stat().st_size
                try:
                    width, height = probe_image(path, size)
                except BadImage as bad:
                    skipped.append(SkippedFile(str(path), str(bad)))
                    continue
                rows.append(
                    (
                        image_id(spec, domain_dir.name, class_dir.name, entry.name),
                        spec.name,
                        domain_dir.name,
                        class_dir.name,
                        label,
                        str(path),
                        width,
                        height,
                        size,
                    )
                )
        if len(rows) == before:
            raise UserError(f"domain folder {domain_dir.path!r} holds no readable image: {fix}")
    frame = pl.DataFrame(rows, schema=MANIFEST_SCHEMA, orient="row")
    return ScanResult(frame=frame, skipped=skipped)


def write_manifest(result: ScanResult, path: Path) -> Path:
    return atomic.write_parquet(Path(path), result.frame)


def read_manifest(path: Path) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {str(path)!r} not found: create it with `dbr scan DATASET --out {path}`")
    return pl.read_parquet(path)


SKIPPED_SHOWN = 20


def scan_to_manifest(spec: DatasetSpec, data_dir: Path, out: Path) -> ScanResult:
    """`dbr scan`: write the manifest and say what was counted and what was skipped, and why."""
    result = scan_dataset(spec, data_dir)
    write_manifest(result, out)
    for domain, count in result.counts().items():
        console.print(f"  {domain}: {count:,} images")
    for bad in result.skipped[:SKIPPED_SHOWN]:
        err_console.print(f"[yellow]skipped[/] {bad.path}: {bad.reason}", highlight=False)
    if len(result.skipped) > SKIPPED_SHOWN:
        err_console.print(f"[yellow]... and {len(result.skipped) - SKIPPED_SHOWN} more skipped files[/]")
    console.print(
        f"[green]wrote[/] {out} ({result.frame.height:,} images, {len(result.skipped)} skipped)",
        highlight=False,
    )
    return result

"""`dbr download`: stage 1 of the data flow, DomainBed sources -> `data/<dirname>/<domain>/<class>/<image>`.

All work happens under `data/.dbr-download/<dirname>/` (archives, unpacked folders, the
layout being built), each step restartable. The finished layout gets a marker file and
is renamed to `data/<dirname>` in one step, so a dataset folder with the marker is
complete and a re-run skips it; anything less is resumed from the staging folder.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from domainbed_reasoning import atomic
from domainbed_reasoning.artefacts import dataset_root
from domainbed_reasoning.data.archive import extract
from domainbed_reasoning.data.fetch import fetch, make_client
from domainbed_reasoning.data.hub_copy import materialise
from domainbed_reasoning.data.prepare import arrange
from domainbed_reasoning.data.recipes import DatasetRecipe, RemoteFile, get_recipe
from domainbed_reasoning.data.registry import DatasetSpec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console, err_console

MARKER = ".dbr-download.json"
STAGING = ".dbr-download"


@dataclass(frozen=True)
class DownloadResult:
    dataset: str
    root: Path
    origin: str
    files: int
    skipped: bool


def marker_path(root: Path) -> Path:
    return Path(root) / MARKER


def staging_dir(data_dir: Path, spec: DatasetSpec) -> Path:
    return Path(data_dir) / STAGING / spec.dirname


def _count_files(root: Path) -> int:
    return sum(1 for path in root.rglob("*") if path.is_file() and path.name != MARKER)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )


def local_files(source: DatasetRecipe, paths: Sequence[Path]) -> dict[str, Path]:
    """Match `--from-archive` paths (files or folders holding them) to the source's files by name."""
    found: dict[str, Path] = {}
    by_name = {name: remote.filename for remote in source.files for name in remote.names}
    for path in map(Path, paths):
        if path.is_dir():
            found |= {
                by_name[name]: path / name for name in by_name if (path / name).is_file()
            }
        elif path.is_file():
            name = source.files[0].filename if len(source.files) == 1 else path.name
            if name not in by_name:
                expected = ", ".join(f.filename for f in source.files)
                raise UserError(
                    f"--from-archive {path}: {source.dataset} needs files named {expected}; rename it"
                )
            found[by_name[name]] = path
        else:
            raise UserError(f"--from-archive {path}: no such file or folder")
    missing = [f.filename for f in source.files if f.filename not in found]
    if missing:
        raise UserError(
            f"--from-archive lacks {', '.join(missing)} for {source.dataset}: pass each file, or a folder "
            f"holding them, with --from-archive"
        )
    return found


def _fetch_all(files: Sequence[RemoteFile], into: Path, progress: Progress) -> dict[str, Path]:
    with make_client() as client:
        return {
            remote.filename: fetch(remote, into / remote.filename, client, progress)
            for remote in files
        }


def _build_from_source(
    source: DatasetRecipe, staging: Path, from_archive: Sequence[Path], progress: Progress
) -> str:
    layout = staging / "layout"
    if from_archive:
        local, origin = local_files(source, from_archive), "archive"
    else:
        local, origin = _fetch_all(source.files, staging / "archives", progress), "http"
    unpacked = {
        remote.filename: extract(
            local[remote.filename], staging / "unpacked" / remote.filename, progress
        )
        for remote in source.files
        if remote.is_archive
    }
    arrange(source, local, unpacked, layout)
    return origin


def domain_counts(layout: Path, spec: DatasetSpec) -> dict[str, int]:
    """Files per domain folder, as DomainBed's ImageFolder would count them."""
    return {
        domain: sum(1 for path in (layout / domain).rglob("*") if path.is_file())
        for domain in spec.domains
    }


def count_warning(spec: DatasetSpec, counts: dict[str, int]) -> str | None:
    """One line when the images prepared differ from the count DomainBed reports for the dataset."""
    total = sum(counts.values())
    if not spec.num_images or total == spec.num_images:
        return None
    found = ", ".join(f"{domain} {count:,}" for domain, count in counts.items())
    return (
        f"{spec.name}: {total:,} images prepared ({found}), DomainBed reports {spec.num_images:,}: "
        f"the source differs from the one DomainBed used, so accuracies may not compare with "
        f"published ones"
    )


def _commit(layout: Path, root: Path, record: dict) -> None:
    """Marker first, then one rename: `root` appears complete or not at all."""
    atomic.write_json(marker_path(layout), record)
    os.replace(layout, root)


def download_dataset(
    spec: DatasetSpec,
    data_dir: Path,
    *,
    from_archive: Sequence[Path] = (),
    from_hub: str | None = None,
    source: DatasetRecipe | None = None,
) -> DownloadResult:
    """Fetch (or import) one dataset into DomainBed's layout; `source` overrides the built-in table."""
    root = dataset_root(data_dir, spec)
    if marker_path(root).is_file():
        record = json.loads(marker_path(root).read_text())
        return DownloadResult(spec.name, root, record["origin"], record["files"], skipped=True)
    if root.exists():
        raise UserError(
            f"{root} exists but was not completed by `dbr download` (no {MARKER}): use it as is with "
            f"`dbr scan {spec.name}`, or remove it to download again"
        )
    if from_archive and from_hub:
        raise UserError("--from-archive and --from-hub both given: choose one source")
    staging = staging_dir(data_dir, spec)
    layout = staging / "layout"
    try:
        with _progress() as progress:
            if from_hub:
                materialise(spec, from_hub, layout, progress)
                origin = f"hub:{from_hub}"
            else:
                origin = _build_from_source(
                    source or get_recipe(spec.name), staging, from_archive, progress
                )
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise UserError(
            f"no space left on the disk holding {staging}: free space (or pass --data-dir on a "
            f"larger disk) and run the same command again; it resumes where it stopped"
        ) from err
    warning = count_warning(spec, domain_counts(layout, spec))
    if warning:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    files = _count_files(layout)
    _commit(layout, root, {"dataset": spec.name, "origin": origin, "files": files})
    shutil.rmtree(staging)
    if not any(staging.parent.iterdir()):
        staging.parent.rmdir()
    return DownloadResult(spec.name, root, origin, files, skipped=False)


def download(
    spec: DatasetSpec, data_dir: Path, from_archive: Sequence[Path] = (), from_hub: str | None = None
) -> DownloadResult:
    """`dbr download`: fetch or import, then one line saying what is where."""
    result = download_dataset(spec, data_dir, from_archive=from_archive, from_hub=from_hub)
    verb = "already complete" if result.skipped else f"downloaded ({result.origin})"
    console.print(
        f"[green]{result.dataset}[/] {verb}: {result.root} ({result.files:,} files)", highlight=False
    )
    return result

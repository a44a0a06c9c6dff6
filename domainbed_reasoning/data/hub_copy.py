"""DomainBed's layout materialised from a Hub copy of a dataset (`dbr download --from-hub`).

Several DomainBed links are broken; copies such as flwrlabs/pacs hold the same images
with `image`/`domain`/`label` columns. Their spellings differ ("Real_World", "Dog"), so
names are matched to the registry loosely, and anything that still does not match stops
the run: a silent relabel would poison every later stage.
"""

from __future__ import annotations

import re
from io import BytesIO
from pathlib import Path

import datasets
from PIL import Image, UnidentifiedImageError
from rich.progress import Progress

from domainbed_reasoning import atomic
from domainbed_reasoning.data.registry import DatasetSpec
from domainbed_reasoning.errors import UserError

COLUMNS = ("image", "domain", "label")


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "_", name.strip()).casefold()


def _preview(names: tuple[str, ...], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def match_names(
    found: list[str], expected: tuple[str, ...], what: str, repo: str, spec: DatasetSpec
) -> dict[str, str]:
    """Map each hub spelling to the registry name it means."""
    by_key = {_key(name): name for name in expected}
    unknown = [name for name in found if _key(name) not in by_key]
    if unknown:
        raise UserError(
            f"{repo}: {what} {unknown[0]!r} is not in {spec.name}'s registry ({_preview(expected)}): "
            f"is it a copy of another dataset? pass the matching DATASET"
        )
    return {name: by_key[_key(name)] for name in found}


def _load(repo: str) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(repo)
    except (
        datasets.exceptions.DatasetNotFoundError,
        FileNotFoundError,
        ValueError,
        OSError,
    ) as err:
        raise UserError(
            f"cannot load {repo!r} with datasets.load_dataset ({type(err).__name__}: {err}): "
            f"check the repo id or local folder"
        ) from err
    return (
        loaded
        if isinstance(loaded, datasets.DatasetDict)
        else datasets.DatasetDict({"train": loaded})
    )


def _names(split: datasets.Dataset, column: str) -> tuple[list[str], list[str]]:
    """(every value as a string, the distinct ones), whether the column is a ClassLabel or text."""
    feature = split.features[column]
    values = split[column]
    if isinstance(feature, datasets.ClassLabel):
        values = [feature.int2str(value) for value in values]
    return [str(value) for value in values], sorted(set(map(str, values)))


def _suffix(data: bytes, path: str | None) -> str:
    if path and Path(path).suffix:
        return Path(path).suffix.lower()
    try:
        with Image.open(BytesIO(data)) as image:
            fmt = (image.format or "").lower()
    except UnidentifiedImageError as err:
        raise UserError(
            f"a row's image is not a readable image ({err}): the Hub copy is damaged"
        ) from err
    return ".jpg" if fmt == "jpeg" else f".{fmt}"


def _image_bytes(cell: dict) -> bytes:
    if cell.get("bytes"):
        return cell["bytes"]
    return Path(cell["path"]).read_bytes()


def materialise(spec: DatasetSpec, repo: str, layout: Path, progress: Progress) -> int:
    """Write every row's original image bytes to `<domain>/<class>/<split>-<row>.<ext>`; returns rows."""
    loaded = _load(repo)
    written = 0
    for split_name, split in loaded.items():
        missing = [column for column in COLUMNS if column not in split.column_names]
        if missing:
            raise UserError(
                f"{repo} split {split_name!r} lacks column(s) {', '.join(missing)} (has "
                f"{', '.join(split.column_names)}): --from-hub needs image, domain and label"
            )
        domains, distinct_domains = _names(split, "domain")
        labels, distinct_labels = _names(split, "label")
        domain_of = match_names(distinct_domains, spec.domains, "domain", repo, spec)
        class_of = match_names(distinct_labels, spec.classes, "class", repo, spec)
        images = split.cast_column("image", datasets.Image(decode=False)).select_columns(["image"])
        task = progress.add_task(f"{repo} [{split_name}]", total=None)
        for row, (record, domain, label) in enumerate(zip(images, domains, labels, strict=True)):
            cell = record["image"]
            data = _image_bytes(cell)
            folder = layout / domain_of[domain] / class_of[label]
            target = folder / f"{split_name}-{row:06d}{_suffix(data, cell.get('path'))}"
            if not target.exists():
                atomic.write_with(target, lambda tmp, data=data: tmp.write_bytes(data))
            written += 1
            progress.advance(task, len(data))
    return written

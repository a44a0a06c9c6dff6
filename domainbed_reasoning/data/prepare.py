"""Turn unpacked source files into DomainBed's layout `<domain>/<class>/<image>`, as DomainBed does.

Each step can run again after a crash: a move whose source is gone but whose target
exists is done, a copy never overwrites a finished file, a removal ignores what is
already gone. The caller renames the finished folder into place in one step.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from domainbed_reasoning import atomic
from domainbed_reasoning.data.archive import unsafe_reason
from domainbed_reasoning.data.recipes import (
    DOMAINNET_DUPLICATES,
    TERRA_ANNOTATIONS,
    TERRA_IMAGES,
    TERRA_LEGACY_ANNOTATIONS,
    DatasetRecipe,
)
from domainbed_reasoning.data.registry import DatasetSpec, get_spec
from domainbed_reasoning.errors import UserError

TERRA_LOCATIONS = ("38", "43", "46", "100")
TERRA_CATEGORIES = (
    "bird",
    "bobcat",
    "cat",
    "coyote",
    "dog",
    "empty",
    "opossum",
    "rabbit",
    "raccoon",
    "squirrel",
)
TERRA_IMAGES_FOLDER = "eccv_18_all_images_sm"
# The CCT20 benchmark's annotation files, merged as DomainBed merges them (commit 3cf2e20).
TERRA_SPLITS = ("cis_test", "cis_val", "train", "trans_test", "trans_val")
TERRA_FIX = f"pass LILA's {TERRA_ANNOTATIONS} (or the older {TERRA_LEGACY_ANNOTATIONS})"


def apply_moves(archive_name: str, unpacked: Path, moves: dict[str, str], layout: Path) -> None:
    """Rename archive folders into the layout (PACS's `kfold/`, `OfficeHomeDataset_10072016/`...)."""
    for inner, place in moves.items():
        source, target = unpacked / inner, (layout / place).resolve()
        if target.exists() and not source.exists():
            continue
        if not source.is_dir():
            raise UserError(
                f"{archive_name} has no folder {inner!r}: it is not the archive DomainBed uses; "
                f"pass the original file or use --from-hub REPO"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def terra_annotation_files(folder: Path) -> list[Path]:
    """The CCT20 benchmark's five split files, or the single JSON of the older recipe."""
    found = sorted(folder.rglob("*.json"))
    by_name = {path.name: path for path in found}
    split_files = [f"{split}_annotations.json" for split in TERRA_SPLITS]
    if any(name in by_name for name in split_files):
        missing = [name for name in split_files if name not in by_name]
        if missing:
            raise UserError(
                f"{TERRA_ANNOTATIONS}: {', '.join(missing)} missing: the archive is incomplete; "
                f"download it again"
            )
        return [by_name[name] for name in split_files]
    if len(found) != 1:
        raise UserError(
            f"TerraIncognita annotations: expected the five CCT20 split files or one COCO .json, "
            f"found {len(found)} .json file(s); {TERRA_FIX}"
        )
    return found


def merged_annotations(files: list[Path]) -> dict:
    """Every list of every file concatenated (images, annotations, categories), as DomainBed does."""
    merged: dict[str, list] = defaultdict(list)
    for path in files:
        try:
            content = json.loads(path.read_text())
            for key, values in content.items():
                if isinstance(values, list):
                    merged[key].extend(values)
        except (json.JSONDecodeError, AttributeError) as err:
            raise UserError(f"{path.name}: not a COCO annotation file ({err!r}); {TERRA_FIX}") from err
    return dict(merged)


def terra_incognita_plan(coco: dict) -> list[tuple[str, str, str]]:
    """(location, category, file_name) for every kept annotation, as DomainBed's loop selects them;
    an image annotated twice with one category is one file, as DomainBed's copy makes it."""
    names = {category["id"]: category["name"] for category in coco["categories"]}
    categories_of: dict[object, list[str]] = defaultdict(list)
    for annotation in coco["annotations"]:
        categories_of[annotation["image_id"]].append(names[annotation["category_id"]])
    plan = [
        (str(image["location"]), category, image["file_name"])
        for image in coco["images"]
        if str(image["location"]) in TERRA_LOCATIONS
        for category in categories_of[image["id"]]
        if category in TERRA_CATEGORIES
    ]
    return list(dict.fromkeys(plan))


def prepare_terra_incognita(images: Path, annotations: list[Path], layout: Path) -> int:
    """Copy each annotated image of the four locations to `location_<L>/<category>/`."""
    listed_in = ", ".join(path.name for path in annotations)
    try:
        plan = terra_incognita_plan(merged_annotations(annotations))
    except (KeyError, TypeError) as err:
        raise UserError(
            f"{listed_in}: not COCO camera-trap annotations ({err!r}); {TERRA_FIX}"
        ) from err
    for location, category, file_name in plan:
        if unsafe_reason(file_name):
            raise UserError(
                f"{listed_in}: image file_name {file_name!r} points outside the images folder"
            )
        source = images / file_name
        target = layout / f"location_{location}" / category / Path(file_name).name
        if target.exists():
            continue
        if not source.is_file():
            raise UserError(
                f"{TERRA_IMAGES}: image {file_name!r} listed in {listed_in} is missing: "
                f"the images archive is incomplete; download it again"
            )
        atomic.write_with(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
    return len(plan)


def listed_files(listing: Path, spec: DatasetSpec) -> list[str]:
    """The entries of a list of files to remove, each checked to be `<domain>/<class>/<file>` of
    `spec` before anything is removed: a wrong or damaged download is refused whole."""
    names = [line.strip() for line in listing.read_text(errors="replace").splitlines() if line.strip()]
    for name in names:
        if unsafe_reason(name):
            raise UserError(f"{listing.name}: entry {name!r} points outside the dataset folder")
        parts = name.split("/")
        if len(parts) != 3 or parts[0] not in spec.domains or parts[1] not in spec.classes:
            raise UserError(
                f"{listing.name}: entry {name!r} is not <domain>/<class>/<file> of {spec.name}: "
                f"the file is not DomainBed's list; delete it and download again"
            )
    return names


def remove_listed(listing: Path, spec: DatasetSpec, layout: Path) -> int:
    """Delete the files a list names (DomainNet's published duplicates), relative to the layout."""
    removed = 0
    for name in listed_files(listing, spec):
        path = layout / name
        if path.is_file():
            path.unlink()
            removed += 1
    return removed


def _terra_incognita(local: dict[str, Path], unpacked: dict[str, Path], layout: Path) -> None:
    images_root = unpacked[TERRA_IMAGES]
    images = (
        images_root / TERRA_IMAGES_FOLDER
        if (images_root / TERRA_IMAGES_FOLDER).is_dir()
        else images_root
    )
    prepare_terra_incognita(images, terra_annotation_files(unpacked[TERRA_ANNOTATIONS]), layout)


def _domainnet(local: dict[str, Path], unpacked: dict[str, Path], layout: Path) -> None:
    remove_listed(local[DOMAINNET_DUPLICATES], get_spec("DomainNet"), layout)


FINISHERS: dict[str, Callable[[dict[str, Path], dict[str, Path], Path], None]] = {
    "TerraIncognita": _terra_incognita,
    "DomainNet": _domainnet,
}


def arrange(
    source: DatasetRecipe, local: dict[str, Path], unpacked: dict[str, Path], layout: Path
) -> None:
    """`local`: every source file by name; `unpacked`: the extracted folder of every archive."""
    for remote in source.files:
        if remote.moves:
            apply_moves(remote.filename, unpacked[remote.filename], remote.moves, layout)
    layout.mkdir(parents=True, exist_ok=True)
    finisher = FINISHERS.get(source.dataset)
    if finisher:
        finisher(local, unpacked, layout)

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
    DatasetRecipe,
)
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


def _single_json(folder: Path) -> Path:
    found = sorted(folder.rglob("*.json"))
    if len(found) != 1:
        raise UserError(
            f"{TERRA_ANNOTATIONS}: expected one COCO annotation .json inside, found {len(found)}; "
            f"pass the LILA caltech_camera_traps.json.zip"
        )
    return found[0]


def terra_incognita_plan(coco: dict) -> list[tuple[str, str, str]]:
    """(location, category, file_name) for every kept annotation, as DomainBed's loop selects them."""
    names = {category["id"]: category["name"] for category in coco["categories"]}
    categories_of: dict[object, list[str]] = defaultdict(list)
    for annotation in coco["annotations"]:
        categories_of[annotation["image_id"]].append(names[annotation["category_id"]])
    return [
        (str(image["location"]), category, image["file_name"])
        for image in coco["images"]
        if str(image["location"]) in TERRA_LOCATIONS
        for category in categories_of[image["id"]]
        if category in TERRA_CATEGORIES
    ]


def prepare_terra_incognita(images: Path, annotations: Path, layout: Path) -> int:
    """Copy each annotated image of the four locations to `location_<L>/<category>/`."""
    try:
        coco = json.loads(annotations.read_text())
        plan = terra_incognita_plan(coco)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(
            f"{annotations.name}: not a COCO camera-trap annotation file ({err!r}); "
            f"pass the LILA caltech_camera_traps.json.zip"
        ) from err
    for location, category, file_name in plan:
        if unsafe_reason(file_name):
            raise UserError(
                f"{annotations.name}: image file_name {file_name!r} points outside the images folder"
            )
        source = images / file_name
        target = layout / f"location_{location}" / category / Path(file_name).name
        if target.exists():
            continue
        if not source.is_file():
            raise UserError(
                f"{TERRA_IMAGES}: image {file_name!r} listed in {annotations.name} is missing: "
                f"the images archive is incomplete; download it again"
            )
        atomic.write_with(target, lambda tmp, source=source: shutil.copyfile(source, tmp))
    return len(plan)


def remove_listed(listing: Path, layout: Path) -> int:
    """Delete the files a list names (DomainNet's published duplicates), relative to the layout."""
    removed = 0
    for line in listing.read_text().splitlines():
        name = line.strip()
        if not name:
            continue
        if unsafe_reason(name):
            raise UserError(f"{listing.name}: entry {name!r} points outside the dataset folder")
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
    prepare_terra_incognita(images, _single_json(unpacked[TERRA_ANNOTATIONS]), layout)


def _domainnet(local: dict[str, Path], unpacked: dict[str, Path], layout: Path) -> None:
    remove_listed(local[DOMAINNET_DUPLICATES], layout)


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

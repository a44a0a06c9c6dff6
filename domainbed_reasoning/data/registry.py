"""The DomainBed datasets, declared once.

One small declarative entry per dataset, as in DomainBed's own `datasets.py`:
folder name, domains and classes in DomainBed order (sorted folder names, the
torchvision ImageFolder order), so a `label` index means the same thing in every
stage and every published file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources

import yaml
from rich.table import Table

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    dirname: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    num_images: int
    description: str

    def to_json(self) -> dict:
        return asdict(self) | {"domains": list(self.domains), "classes": list(self.classes)}

    def label_of(self, class_name: str) -> int:
        return self.classes.index(class_name)


def _sorted(names: str | list[str]) -> tuple[str, ...]:
    return tuple(sorted(names.split() if isinstance(names, str) else names))


def _domainnet_classes() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("domainnet_classes.txt").read_text()
    return _sorted([line.strip() for line in text.splitlines() if line.strip()])


OFFICEHOME_CLASSES = """
Alarm_Clock Backpack Batteries Bed Bike Bottle Bucket Calculator Calendar Candles Chair
Clipboards Computer Couch Curtains Desk_Lamp Drill Eraser Exit_Sign Fan File_Cabinet Flipflops
Flowers Folder Fork Glasses Hammer Helmet Kettle Keyboard Knives Lamp_Shade Laptop Marker
Monitor Mop Mouse Mug Notebook Oven Pan Paper_Clip Pen Pencil Postit_Notes Printer Push_Pin
Radio Refrigerator Ruler Scissors Screwdriver Shelf Sink Sneakers Soda Speaker Spoon TV Table
Telephone ToothBrush Toys Trash_Can Webcam
"""

SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        name="PACS",
        dirname="PACS",
        domains=_sorted("art_painting cartoon photo sketch"),
        classes=_sorted("dog elephant giraffe guitar horse house person"),
        num_images=9991,
        description="Photo, Art painting, Cartoon, Sketch; 7 classes (Li et al., 2017).",
    ),
    DatasetSpec(
        name="VLCS",
        dirname="VLCS",
        domains=_sorted("Caltech101 LabelMe SUN09 VOC2007"),
        classes=_sorted("bird car chair dog person"),
        num_images=10729,
        description="Four photo datasets as domains; 5 classes (Fang et al., 2013).",
    ),
    DatasetSpec(
        name="OfficeHome",
        dirname="office_home",
        domains=_sorted(["Art", "Clipart", "Product", "Real World"]),
        classes=_sorted(OFFICEHOME_CLASSES),
        num_images=15588,
        description="Office and home objects in four styles; 65 classes (Venkateswara et al., 2017).",
    ),
    DatasetSpec(
        name="TerraIncognita",
        dirname="terra_incognita",
        domains=_sorted("location_100 location_38 location_43 location_46"),
        classes=_sorted("bird bobcat cat coyote dog empty opossum rabbit raccoon squirrel"),
        num_images=24788,
        description="Camera-trap images from four locations; 10 classes (Beery et al., 2018).",
    ),
    DatasetSpec(
        name="DomainNet",
        dirname="domain_net",
        domains=_sorted("clipart infograph painting quickdraw real sketch"),
        classes=_domainnet_classes(),
        num_images=586575,
        description="Six styles, 345 classes (Peng et al., 2019); duplicates removed as DomainBed does.",
    ),
    DatasetSpec(
        name="SynthDG",
        dirname="SynthDG",
        domains=_sorted("cartoon painting photo sketch"),
        classes=_sorted("circle cross square star triangle"),
        num_images=0,
        description="Synthetic shapes in four styles, generated offline by `dbr synth` (the demo default).",
    ),
)

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in SPECS}


def get_spec(name: str) -> DatasetSpec:
    """Look a dataset up by name, case-insensitively, with the fix in the error."""
    for key, spec in REGISTRY.items():
        if key.lower() == name.lower():
            return spec
    raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(REGISTRY)} (see `dbr datasets`)")


@dataclass(frozen=True)
class Credit:
    """Where a dataset comes from and on what terms, so the dataset card can credit it."""

    url: str
    terms: str
    citation: str


@cache
def _licences() -> dict:
    return yaml.safe_load(resources.files(__package__).joinpath("licences.yaml").read_text())


def credit_of(name: str) -> Credit:
    return Credit(**_licences()["datasets"][get_spec(name).name])


def citation(key: str) -> str:
    """A BibTeX entry every card cites: `domainbed` or `rd_mldg`."""
    return _licences()["citations"][key]


def print_datasets(as_json: bool = False) -> None:
    """`dbr datasets`: the registry as a table, or as JSON for scripts."""
    if as_json:
        print(json.dumps([spec.to_json() for spec in SPECS], indent=2))
        return
    table = Table(title="DomainBed datasets")
    for column in ("name", "folder", "domains", "classes", "images"):
        table.add_column(column)
    for spec in SPECS:
        classes = ", ".join(spec.classes[:5]) + (", ..." if len(spec.classes) > 5 else "")
        table.add_row(
            spec.name,
            spec.dirname,
            ", ".join(spec.domains),
            f"{len(spec.classes)}: {classes}",
            f"{spec.num_images:,}" if spec.num_images else "generated",
        )
    console.print(table)

"""The export folder's README.md, generated from the exported files and never edited by hand.

The card is the Hub's entry point: its YAML `configs` tell `load_dataset` which files
form which config and split, so it is rebuilt from what is actually on disk (every
dataset in the folder, not only the one just exported) and cannot drift from the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.parquet as pq
from datasets.info import DatasetInfosDict
from huggingface_hub import DatasetCard, DatasetCardData

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.data.registry import SPECS, DatasetSpec, citation, credit_of
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.templates import render

CARD_NAME = "README.md"
CARD_TEMPLATE = "dataset_card.md.j2"
PAPER = "RD-MLDG (ICLR 2026), arXiv:2602.23777, https://arxiv.org/abs/2602.23777"


@dataclass(frozen=True)
class ExportedSplit:
    domain: str
    name: str
    num_examples: int
    num_bytes: int
    download_bytes: int


@dataclass(frozen=True)
class ExportedDataset:
    """One config, as found in the export folder or as already published on the Hub: what the
    YAML and the body are generated from."""

    spec: DatasetSpec
    splits: tuple[ExportedSplit, ...]
    features: datasets.Features
    build: dict

    @property
    def num_examples(self) -> int:
        return sum(split.num_examples for split in self.splits)


def _split(folder: Path, spec: DatasetSpec, domain: str) -> ExportedSplit | None:
    files = sorted(folder.glob(Path(artefacts.split_files_pattern(spec, domain)).name))
    if not files:
        return None
    metadata = [pq.read_metadata(file) for file in files]
    return ExportedSplit(
        domain=domain,
        name=artefacts.split_name(domain),
        num_examples=sum(meta.num_rows for meta in metadata),
        num_bytes=sum(
            meta.row_group(i).total_byte_size
            for meta in metadata
            for i in range(meta.num_row_groups)
        ),
        download_bytes=sum(file.stat().st_size for file in files),
    )


def find_exported(export: Path) -> list[ExportedDataset]:
    """Every complete dataset in the folder, in registry order."""
    found = []
    for spec in SPECS:
        folder = artefacts.export_dataset_dir(export, spec)
        facts = artefacts.build_facts_path(folder)
        splits = tuple(split for domain in spec.domains if (split := _split(folder, spec, domain)))
        if not (facts.is_file() and splits):
            continue
        first = next(folder.glob(Path(artefacts.split_files_pattern(spec, splits[0].domain)).name))
        found.append(
            ExportedDataset(
                spec=spec,
                splits=splits,
                features=datasets.Features.from_arrow_schema(pq.read_schema(first)),
                build=json.loads(facts.read_text()),
            )
        )
    return found


def published_dataset(
    spec: DatasetSpec, info: datasets.DatasetInfo, build: dict, file_sizes: dict[str, int]
) -> ExportedDataset:
    """A dataset already on the Hub, rebuilt from its card's `dataset_info`, its build facts and
    the sizes of its files, so a card that adds another dataset keeps describing this one."""
    splits = []
    for domain in spec.domains:
        name = artefacts.split_name(domain)
        if name not in info.splits:
            continue
        prefix = artefacts.split_files_pattern(spec, domain).removesuffix("*.parquet")
        splits.append(
            ExportedSplit(
                domain=domain,
                name=name,
                num_examples=info.splits[name].num_examples,
                num_bytes=info.splits[name].num_bytes,
                download_bytes=sum(
                    size for path, size in file_sizes.items() if path.startswith(prefix)
                ),
            )
        )
    return ExportedDataset(spec, tuple(splits), info.features, build)


def _size_category(rows: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < limit:
            return name
    return "1M<n<10M"


def card_default(text: str) -> str | None:
    """The config a card marks `default`: what `load_dataset(repo)` loads when no name is given."""
    configs = DatasetCard(text).data.get("configs") or []
    return next((config["config_name"] for config in configs if config.get("default")), None)


def choose_default(exported: list[ExportedDataset], *preferred: str | None) -> str:
    """The first preferred config still described, so adding a dataset never moves the default:
    the card's own default first, then the dataset exported first into an empty folder."""
    names = [item.spec.name for item in exported]
    return next((name for name in preferred if name in names), names[0])


def card_data(exported: list[ExportedDataset], default: str) -> DatasetCardData:
    data = DatasetCardData(
        pretty_name="DomainBed-Reasoning",
        license="other",
        license_name="source-dataset-terms",
        language=["en"],
        task_categories=["image-classification", "image-text-to-text"],
        tags=["domain-generalization", "domainbed", "reasoning", "chain-of-thought", "multimodal"],
        size_categories=[_size_category(sum(item.num_examples for item in exported))],
        configs=[
            {
                "config_name": item.spec.name,
                "data_files": [
                    {
                        "split": split.name,
                        "path": artefacts.split_files_pattern(item.spec, split.domain),
                    }
                    for split in item.splits
                ],
                **({"default": True} if item.spec.name == default else {}),
            }
            for item in exported
        ],
    )
    infos = DatasetInfosDict(
        {
            item.spec.name: datasets.DatasetInfo(
                features=item.features,
                splits=datasets.SplitDict.from_split_dict(
                    [
                        {"name": s.name, "num_bytes": s.num_bytes, "num_examples": s.num_examples}
                        for s in item.splits
                    ]
                ),
                download_size=sum(s.download_bytes for s in item.splits),
                dataset_size=sum(s.num_bytes for s in item.splits),
            )
            for item in exported
        }
    )
    infos.to_dataset_card_data(data)
    return data


ACCEPTANCE_COLUMNS = ("images", "accepted", "exhausted", "pending", "answered")


def count_cells(counts: dict) -> str:
    """A row of the acceptance table; counts an older export did not record show as `-`."""
    cells = [f"{counts[key]:,}" if counts.get(key) is not None else "-" for key in ACCEPTANCE_COLUMNS]
    answered = counts.get("answered")
    rate = f"{counts['accepted'] / answered:.1%}" if answered else "-"
    return " | ".join([*cells, rate])


def acceptance_totals(rows: list[dict]) -> dict:
    """A dataset's row of the acceptance table: each count summed where every domain has it."""
    return {
        key: sum(row[key] for row in rows) if all(key in row for row in rows) else None
        for key in ACCEPTANCE_COLUMNS
    }


def citations(exported: list[ExportedDataset]) -> list[str]:
    return [citation("rd_mldg"), citation("domainbed")] + [
        credit_of(item.spec.name).citation for item in exported if credit_of(item.spec.name).citation
    ]


def card_text(exported: list[ExportedDataset], default: str) -> str:
    """The whole README.md for these datasets, listed in registry order whatever the input order."""
    ordered = sorted(exported, key=lambda item: [spec.name for spec in SPECS].index(item.spec.name))
    text = render(
        __package__,
        CARD_TEMPLATE,
        front_matter=card_data(ordered, default).to_yaml(),
        default=default,
        paper=PAPER,
        exported=ordered,
        first=ordered[0].spec.name,
        first_split=ordered[0].splits[0].name,
        split_name=artefacts.split_name,
        count_cells=count_cells,
        totals=acceptance_totals,
        credit_of=credit_of,
        citations=citations(ordered),
    )
    return str(DatasetCard(text))


def folder_default(export: Path) -> str | None:
    """The default config of the card already in the folder, if there is one."""
    card = Path(export) / CARD_NAME
    return card_default(card.read_text()) if card.is_file() else None


def render_card(export: Path, exported_now: tuple[str, ...] = ()) -> str:
    """The folder's card; its default config is the one it had, or else the first of `exported_now`."""
    exported = find_exported(export)
    if not exported:
        raise UserError(
            f"{export} holds no exported dataset: run `dbr export DATASET --out {export}` first"
        )
    return card_text(exported, choose_default(exported, folder_default(export), *exported_now))


def write_card(export: Path, exported_now: tuple[str, ...] = ()) -> Path:
    return atomic.write_text(Path(export) / CARD_NAME, render_card(Path(export), exported_now))

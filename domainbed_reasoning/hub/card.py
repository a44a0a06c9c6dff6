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

CARD_NAME = "README.md"
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


def _count_cells(counts: dict) -> str:
    """A row of the acceptance table; counts an older export did not record show as `-`."""
    cells = [f"{counts[key]:,}" if counts.get(key) is not None else "-" for key in ACCEPTANCE_COLUMNS]
    answered = counts.get("answered")
    rate = f"{counts['accepted'] / answered:.1%}" if answered else "-"
    return " | ".join([*cells, rate])


def _acceptance_table(exported: list[ExportedDataset]) -> str:
    lines = [
        "| dataset | domain (split) | images | with a chain | exhausted | pending | answered | acceptance |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for item in exported:
        rows = item.build["acceptance"]
        for row in rows:
            lines.append(
                f"| {item.spec.name} | {row['domain']} (`{artefacts.split_name(row['domain'])}`) "
                f"| {_count_cells(row)} |"
            )
        totals = {
            key: sum(row[key] for row in rows) if all(key in row for row in rows) else None
            for key in ACCEPTANCE_COLUMNS
        }
        lines.append(f"| **{item.spec.name}** | all | {_count_cells(totals)} |")
    return "\n".join(lines)


def _provenance(item: ExportedDataset) -> str:
    build = item.build
    lines = [
        f"### {item.spec.name}",
        "",
        f"- Teacher model(s): {', '.join(f'`{t}`' for t in build['teachers'])}",
        f"- Prompt version(s): {', '.join(f'`{v}`' for v in build['prompt_versions'])}",
    ]
    lines += [f"- {label.capitalize()}: {value}" for label, value in build["builder"].items()]
    if build["prompt"]:
        lines += [
            "",
            f"Teacher prompt (version `{build['prompt']['version']}`), verbatim:",
            "",
            "```text",
        ]
        lines += [build["prompt"]["text"].rstrip(), "```"]
    else:
        lines += [
            "",
            "The text of this prompt version was not in the toolkit checkout that exported it.",
        ]
    return "\n".join(lines)


def _example(item: ExportedDataset) -> str:
    example = item.build.get("example")
    if example is None:
        return f"**{item.spec.name}**: re-export it to show an example here."
    return "\n".join(
        [
            f"**{item.spec.name}** `{example['id']}` (domain {example['domain']}, class {example['class_name']}):",
            "",
            "```text",
            example["chain"].rstrip(),
            "```",
        ]
    )


def _splits_table(exported: list[ExportedDataset]) -> str:
    lines = ["| config | splits (domain -> split name: rows) | classes |", "|---|---|---:|"]
    for item in exported:
        splits = ", ".join(
            f"{s.domain}{'' if s.name == s.domain else f' -> `{s.name}`'}: {s.num_examples:,}"
            for s in item.splits
        )
        lines.append(f"| `{item.spec.name}` | {splits} | {len(item.spec.classes)} |")
    return "\n".join(lines)


def _sources(exported: list[ExportedDataset]) -> str:
    lines = []
    for item in exported:
        source = credit_of(item.spec.name)
        lines.append(
            f"- **{item.spec.name}** ({source.url}): {item.spec.description} Terms: {source.terms}."
        )
    return "\n".join(lines)


def _citations(exported: list[ExportedDataset]) -> str:
    entries = [citation("rd_mldg"), citation("domainbed")] + [
        credit_of(item.spec.name).citation for item in exported if credit_of(item.spec.name).citation
    ]
    return "```bibtex\n" + "\n\n".join(entries) + "\n```"


INTRO = f"""# DomainBed-Reasoning

Every image of the DomainBed domain-generalisation benchmarks, each paired with a five-stage reasoning
chain written by a teacher multimodal LLM where the teacher produced a label-consistent one, as introduced
by {PAPER}. It is the training data of RD-MLDG (multi-task cross-training and self-aligned reasoning
regularisation). Every image of every domain is a row, so it is a strict superset of DomainBed and a
held-out domain can be scored whole, as DomainBed's protocol requires.

This card is generated by `dbr export` from the exported files; do not edit it by hand.
"""

SPLITS_NOTE = """## Configs and splits

One config per source dataset, one split per domain. Split names must be word characters, so a domain
name with spaces or punctuation is published with `_` in their place (e.g. OfficeHome's `Real World` is
the split `Real_World`); the `domain` column keeps the original name.
"""

BUILD_NOTE = """## How it was built

For each image the teacher saw the image and the dataset's class names, never the label. Several
candidate chains were sampled per image (rejection sampling, over several rounds where the first ones
failed); a candidate was kept only if all five stages parse and its conclusion names exactly the true
class. An image for which no candidate was accepted keeps its row with null chain fields;
`chain_status` says why. The table counts, per domain, the images with a chain, the exhausted ones
(every allowed round sampled, none label-consistent), the pending ones (never sent, e.g. outside a
trial run, or not yet resolved), and the images the teacher answered at least once; acceptance is
taken over those answered images, so a trial run on part of a dataset is not read as a low rate.
"""

RECORD_FORMAT = """## Record format

| field | type | meaning |
|---|---|---|
| `id` | string | stable key `dataset/domain/class/file` |
| `dataset`, `domain`, `class_name` | string | where the image comes from (original domain name) |
| `label` | ClassLabel | class index in DomainBed order (sorted class folder names) |
| `image` | Image | the original file's bytes, not re-encoded |
| `chain` | string | the full chain `<SUMMARY>..</SUMMARY> <CAPTION>..</CAPTION> <REASONING>..</REASONING> \
<REFLECTION>..</REFLECTION> <CONCLUSION>..</CONCLUSION>` |
| `summary`, `caption`, `reasoning`, `reflection`, `conclusion` | string | the five stages' text |
| `teacher`, `prompt_version` | string | which model and prompt wrote the chain (for an image without a chain: the ones that were tried; null if none was) |
| `attempts` | int32 | teacher answers (candidates) sampled for this image in total, including any sampled in the same request after the accepted one; requests that failed in transport are not counted; 0 when none |
| `chain_status` | string | `accepted` (chain fields set), `exhausted` (every allowed round sampled, none label-consistent) or `pending` (not resolved: never sent, or only transport failures so far); chain fields are null unless `accepted` |
| `round`, `temperature` | int32, float32 | the sampling round (as the builder numbers it, the first is 1) and temperature of the accepted candidate; null unless `accepted` |
"""

LICENCE_NOTE = """## Source datasets and licences

The images belong to their source datasets and keep those datasets' terms; the chains are released for
research use alongside them.
"""

LIMITATIONS = """## Known limitations

- Chains are model-written: they can describe details that are not in the image even when the
  conclusion is right; the filter checks only the format and the conclusion's class.
- Only label-consistent chains are kept, so the images the teacher found hardest have no chain (see
  the acceptance table): training on chains under-represents them. Evaluate on every row of a domain,
  not only on rows with a chain.
- Class names come from folder names (e.g. `Alarm_Clock`); the teacher saw them as written.
- Source datasets carry their own biases and label noise (TerraIncognita especially).
"""


def _usage(exported: list[ExportedDataset], default: str) -> str:
    first, split = exported[0].spec.name, exported[0].splits[0].name
    return f"""## Usage

Without a config name, `load_dataset("USER/domainbed-reasoning")` loads **{default}**, the default
config; it stays the default when other datasets are exported or published beside it. Name a config
to load another:

```python
from datasets import load_dataset

ds = load_dataset("USER/domainbed-reasoning", "{first}")  # or the local folder "domainbed-reasoning"
row = ds["{split}"][0]
row["image"], row["label"], row["chain"], row["chain_status"]
with_chains = ds["{split}"].filter(lambda row: row["chain_status"] == "accepted")
```

Leave-one-domain-out splits (train = the other domains minus a seeded 20% validation holdout of each,
test = every image of the held-out domain) come with the toolkit:
`domainbed_reasoning.hub.loading.load_lodo("domainbed-reasoning", "{first}", "<target domain>")`.
"""


def card_body(exported: list[ExportedDataset], default: str) -> str:
    sections = [
        INTRO,
        SPLITS_NOTE,
        _splits_table(exported) + "\n",
        BUILD_NOTE,
        _acceptance_table(exported) + "\n",
        *[_provenance(item) + "\n" for item in exported],
        RECORD_FORMAT,
        "### Examples\n",
        *[_example(item) + "\n" for item in exported],
        _usage(exported, default),
        LICENCE_NOTE,
        _sources(exported) + "\n",
        LIMITATIONS,
        "## Citation\n",
        _citations(exported) + "\n",
    ]
    return "\n".join(sections)


def card_text(exported: list[ExportedDataset], default: str) -> str:
    """The whole README.md for these datasets, listed in registry order whatever the input order."""
    ordered = sorted(exported, key=lambda item: [spec.name for spec in SPECS].index(item.spec.name))
    front = card_data(ordered, default).to_yaml()
    return str(DatasetCard(f"---\n{front}\n---\n\n{card_body(ordered, default)}"))


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

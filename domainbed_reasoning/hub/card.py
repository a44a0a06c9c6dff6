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
import polars as pl
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
    files: tuple[Path, ...]
    num_examples: int
    num_bytes: int


@dataclass(frozen=True)
class ExportedDataset:
    """One config as found on disk: what the YAML and the body are generated from."""

    spec: DatasetSpec
    splits: tuple[ExportedSplit, ...]
    features: datasets.Features
    build: dict
    example: dict

    @property
    def num_examples(self) -> int:
        return sum(split.num_examples for split in self.splits)


def _split(folder: Path, spec: DatasetSpec, domain: str) -> ExportedSplit | None:
    files = tuple(sorted(folder.glob(Path(artefacts.split_files_pattern(spec, domain)).name)))
    if not files:
        return None
    metadata = [pq.read_metadata(file) for file in files]
    return ExportedSplit(
        domain=domain,
        name=artefacts.split_name(domain),
        files=files,
        num_examples=sum(meta.num_rows for meta in metadata),
        num_bytes=sum(
            meta.row_group(i).total_byte_size
            for meta in metadata
            for i in range(meta.num_row_groups)
        ),
    )


def find_exported(export: Path) -> list[ExportedDataset]:
    """Every complete dataset in the folder, in registry order (the first is the default config)."""
    found = []
    for spec in SPECS:
        folder = artefacts.export_dataset_dir(export, spec)
        facts = artefacts.build_facts_path(folder)
        splits = tuple(split for domain in spec.domains if (split := _split(folder, spec, domain)))
        if not (facts.is_file() and splits):
            continue
        first = splits[0].files[0]
        example = pl.read_parquet(
            first, columns=["id", "domain", "class_name", "chain"], n_rows=1
        ).row(0, named=True)
        found.append(
            ExportedDataset(
                spec=spec,
                splits=splits,
                features=datasets.Features.from_arrow_schema(pq.read_schema(first)),
                build=json.loads(facts.read_text()),
                example=example,
            )
        )
    return found


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


def card_data(exported: list[ExportedDataset]) -> DatasetCardData:
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
                **({"default": True} if index == 0 else {}),
            }
            for index, item in enumerate(exported)
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
                download_size=sum(file.stat().st_size for s in item.splits for file in s.files),
                dataset_size=sum(s.num_bytes for s in item.splits),
            )
            for item in exported
        }
    )
    infos.to_dataset_card_data(data)
    return data


def _counts(images: int, accepted: int) -> str:
    return f"{images:,} | {accepted:,} | {accepted / images if images else 0.0:.1%}"


def _acceptance_table(exported: list[ExportedDataset]) -> str:
    lines = [
        "| dataset | domain (split) | images | accepted chains | acceptance |",
        "|---|---|---:|---:|---:|",
    ]
    for item in exported:
        rows = item.build["acceptance"]
        for row in rows:
            lines.append(
                f"| {item.spec.name} | {row['domain']} (`{artefacts.split_name(row['domain'])}`) "
                f"| {_counts(row['images'], row['accepted'])} |"
            )
        images, accepted = sum(r["images"] for r in rows), sum(r["accepted"] for r in rows)
        lines.append(f"| **{item.spec.name}** | all | {_counts(images, accepted)} |")
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
    example = item.example
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

Every image of the DomainBed domain-generalisation benchmarks paired with a five-stage reasoning chain
written by a teacher multimodal LLM, as introduced by {PAPER}. It is the training data of RD-MLDG
(multi-task cross-training and self-aligned reasoning regularisation).

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
class. Images for which no candidate was accepted are absent.
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
| `teacher`, `prompt_version` | string | which model and prompt wrote the chain |
| `attempts` | int32 | candidates sampled before one was accepted |
"""

LICENCE_NOTE = """## Source datasets and licences

The images belong to their source datasets and keep those datasets' terms; the chains are released for
research use alongside them.
"""

LIMITATIONS = """## Known limitations

- Chains are model-written: they can describe details that are not in the image even when the
  conclusion is right; the filter checks only the format and the conclusion's class.
- Keeping only label-consistent chains drops the images the teacher found hardest, so the data
  under-represents them (see the acceptance table); evaluate on the full source datasets.
- Class names come from folder names (e.g. `Alarm_Clock`); the teacher saw them as written.
- Source datasets carry their own biases and label noise (TerraIncognita especially).
"""


def _usage(exported: list[ExportedDataset]) -> str:
    first, split = exported[0].spec.name, exported[0].splits[0].name
    return f"""## Usage

```python
from datasets import load_dataset

ds = load_dataset("USER/domainbed-reasoning", "{first}")  # or the local folder "domainbed-reasoning"
row = ds["{split}"][0]
row["image"], row["label"], row["chain"]
```

Leave-one-domain-out splits (train = the other domains minus a seeded 20% validation holdout of each,
test = the held-out domain) come with the toolkit:
`domainbed_reasoning.loading.load_lodo("domainbed-reasoning", "{first}", "<target domain>")`.
"""


def card_body(exported: list[ExportedDataset]) -> str:
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
        _usage(exported),
        LICENCE_NOTE,
        _sources(exported) + "\n",
        LIMITATIONS,
        "## Citation\n",
        _citations(exported) + "\n",
    ]
    return "\n".join(sections)


def render_card(export: Path) -> str:
    exported = find_exported(export)
    if not exported:
        raise UserError(
            f"{export} holds no exported dataset: run `dbr export DATASET --out {export}` first"
        )
    return str(DatasetCard(f"---\n{card_data(exported).to_yaml()}\n---\n\n{card_body(exported)}"))


def write_card(export: Path) -> Path:
    return atomic.write_text(Path(export) / CARD_NAME, render_card(Path(export)))

"""Chains + images -> the Hub layout `domainbed-reasoning/<DATASET>/<split>-NNNNN-of-NNNNN.parquet`.

Every image of the manifest is a record, so DomainBed-Reasoning is a strict superset of DomainBed
and evaluation can score whole domains: an image without an accepted chain has null chain fields
and a `chain_status` saying why (`exhausted`: every allowed round was sampled; `pending`: not
resolved yet, e.g. outside a `--limit` trial).

Everything a reader needs travels in the Parquet files themselves (original image
bytes, `ClassLabel` names in the schema metadata), so `load_dataset` works on the
folder with nothing of this project installed. A dataset is planned and checked
completely before a byte is written, then written into a hidden folder beside its
target and swapped in, so a failed or killed export leaves the previous one intact
and never touches the other datasets.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import polars as pl
from rich.progress import track

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.chains.prompt_templates import load_prompt
from domainbed_reasoning.data.registry import DatasetSpec, get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.card import write_card
from domainbed_reasoning.hub.chain_run import (
    CHAIN_FIELDS,
    MANIFEST_COLUMNS,
    ChainRun,
    image_outcomes,
    read_chain_run,
    status_counts,
)
from domainbed_reasoning.terminal import console

DEFAULT_MAX_SHARD_BYTES = 256 * 1024**2
# stats.json entries the card reports, where the builder wrote them (absent ones are skipped).
BUILDER_FACTS = {
    ("run", "candidates"): "candidates sampled per request",
    ("run", "max_rounds"): "requests per image at most (rounds)",
    ("run", "temperatures"): "sampling temperature per round",
    ("candidates",): "teacher answers sampled in total",
}


def features(spec: DatasetSpec) -> datasets.Features:
    """The record fields (docs/architecture.md); `label` carries the registry's class names so indices never drift."""
    text = datasets.Value("string")
    return datasets.Features(
        {
            "id": text,
            "dataset": text,
            "domain": text,
            "label": datasets.ClassLabel(names=list(spec.classes)),
            "class_name": text,
            "image": datasets.Image(),
            **{field: text for field in CHAIN_FIELDS},
            "teacher": text,
            "prompt_version": text,
            "attempts": datasets.Value("int32"),
            "chain_status": text,
            "round": datasets.Value("int32"),
            "temperature": datasets.Value("float32"),
        }
    )


@dataclass(frozen=True)
class Shard:
    filename: str
    rows: pl.DataFrame  # the records of this shard, with a `source` column of image paths


@dataclass(frozen=True)
class DatasetExport:
    """A dataset fully checked and planned: writing it cannot fail on bad input any more."""

    spec: DatasetSpec
    shards: tuple[Shard, ...]
    build: dict


def _check_chains(run: ChainRun, fix: str) -> None:
    spec, chains, where = run.spec, run.chains, artefacts.chains_path(run.folder)
    if chains.is_empty():
        raise UserError(f"{where} holds no accepted chains: {fix}")
    duplicated = chains.filter(pl.col("id").is_duplicated())["id"]
    if len(duplicated):
        raise UserError(
            f"{where} has several chains for {duplicated[0]!r}: expected one accepted chain per image; {fix}"
        )
    for column, allowed in (("domain", spec.domains), ("class_name", spec.classes)):
        unknown = chains.filter(~pl.col(column).is_in(list(allowed)))[column]
        if len(unknown):
            raise UserError(
                f"{where} has {column} {unknown[0]!r}, which {spec.name} does not have: {fix}"
            )
    stray = chains.filter(~pl.col("id").is_in(run.manifest["id"].implode()))["id"]
    if len(stray):
        raise UserError(
            f"{where} has a chain for {stray[0]!r}, which its manifest does not list: {fix}"
        )


def _records(run: ChainRun, data_dir: Path) -> pl.DataFrame:
    """One row per manifest image (chain fields null where none was accepted), with the image's
    path under `data_dir` found from its stable id."""
    spec = run.spec
    root = artefacts.dataset_root(data_dir, spec)
    prefix = f"{spec.name}/"
    chains = run.chains.select(
        "id", *CHAIN_FIELDS, pl.col("teacher").cast(pl.Utf8), pl.col("prompt_version").cast(pl.Utf8)
    )
    return (
        run.manifest.select(MANIFEST_COLUMNS)
        .join(chains, on="id", how="left")
        .join(image_outcomes(run), on="id", how="left")
        .sort("id")
        .select(
            "id",
            pl.lit(spec.name).alias("dataset"),
            "domain",
            pl.col("class_name")
            .replace_strict(list(spec.classes), list(range(len(spec.classes))))
            .alias("label"),
            "class_name",
            *CHAIN_FIELDS,
            pl.coalesce("teacher", "tried_teacher").alias("teacher"),
            pl.coalesce("prompt_version", "tried_prompt_version").alias("prompt_version"),
            "attempts",
            "chain_status",
            "round",
            "temperature",
            pl.concat_str(pl.lit(f"{root}/"), pl.col("id").str.strip_prefix(prefix)).alias("source"),
        )
    )


def _image_sizes(records: pl.DataFrame, spec: DatasetSpec, data_dir: Path) -> list[int]:
    sizes, missing = [], []
    for source in records["source"]:
        path = Path(source)
        if path.is_file():
            sizes.append(path.stat().st_size)
        else:
            missing.append(path)
    if missing:
        raise UserError(
            f"{len(missing)} image(s) of {spec.name} are gone since the chains were built, e.g. {missing[0]}: "
            f"restore them (`dbr download {spec.name} --data-dir {data_dir}`) or pass the right --data-dir"
        )
    return sizes


def _plan_shards(
    records: pl.DataFrame, sizes: list[int], max_shard_bytes: int
) -> tuple[Shard, ...]:
    """Greedy by file size per domain: shards stay under the Hub-friendly limit, one image at least."""
    records = records.with_columns(pl.Series("bytes", sizes))
    shards: list[Shard] = []
    for (domain,), rows in records.group_by("domain", maintain_order=True):
        groups, total = [0], 0
        for size in rows["bytes"]:
            if total and total + size > max_shard_bytes:
                groups.append(groups[-1] + 1)
                total = 0
            else:
                groups.append(groups[-1])
            total += size
        rows = rows.with_columns(pl.Series("shard", groups[1:])).drop("bytes")
        count = groups[-1] + 1
        shards += [
            Shard(artefacts.shard_name(domain, index, count), part.drop("shard"))
            for (index,), part in rows.group_by("shard", maintain_order=True)
        ]
    return tuple(shards)


def _example(records: pl.DataFrame) -> dict:
    """The first record with a chain, shown in the card (kept here so a card can be rendered
    without this dataset's files, e.g. when another dataset is published to the same repo)."""
    return (
        records.filter(pl.col("chain").is_not_null())
        .select("id", "domain", "class_name", "chain")
        .row(0, named=True)
    )


def _lookup(stats: dict, keys: tuple[str, ...]) -> object:
    for key in keys:
        stats = stats.get(key) if isinstance(stats, dict) else None
    return stats


def _build_facts(run: ChainRun, records: pl.DataFrame) -> dict:
    """What the card says about how a dataset was built; kept beside its files so re-exporting
    another dataset can rewrite the whole card without this dataset's run folder."""
    prompt = load_prompt("teacher")
    chains = run.chains
    versions = sorted(chains["prompt_version"].cast(pl.Utf8).unique())
    return {
        "dataset": run.spec.name,
        "teachers": sorted(chains["teacher"].cast(pl.Utf8).unique()),
        "prompt_versions": versions,
        "prompt": {"version": prompt.version, "text": prompt.text}
        if prompt.version in versions
        else None,
        "acceptance": status_counts(records, "domain").to_dicts(),
        "example": _example(records),
        "builder": {
            label: value
            for keys, label in BUILDER_FACTS.items()
            if (value := _lookup(run.stats, keys)) is not None
        },
    }


def plan_dataset(
    chains_root: Path, data_dir: Path, name: str, max_shard_bytes: int
) -> DatasetExport:
    spec = get_spec(name)
    run = read_chain_run(Path(chains_root), spec)
    _check_chains(run, f"build them first (`dbr build-chains {spec.name} --out {chains_root}`)")
    records = _records(run, data_dir)
    shards = _plan_shards(records, _image_sizes(records, spec, data_dir), max_shard_bytes)
    return DatasetExport(spec, shards, _build_facts(run, records))


def _write_shard(shard: Shard, spec_features: datasets.Features, target: Path) -> None:
    """Images go in as their original file bytes: no decode, no re-encode, no quality loss."""
    images = [
        {"bytes": Path(source).read_bytes(), "path": Path(source).name}
        for source in shard.rows["source"]
    ]
    columns = {
        name: images if name == "image" else shard.rows[name].to_list() for name in spec_features
    }
    datasets.Dataset.from_dict(columns, features=spec_features).to_parquet(str(target))


def _swap_in(staged: Path, target: Path) -> None:
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(retired)
    staged.rename(target)
    shutil.rmtree(retired, ignore_errors=True)


def write_dataset(plan: DatasetExport, out: Path, progress: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{plan.spec.name}.", suffix=".tmp", dir=out))
    try:
        spec_features = features(plan.spec)
        for shard in track(
            plan.shards, description=f"export {plan.spec.name}", disable=not progress
        ):
            _write_shard(shard, spec_features, staged / shard.filename)
        atomic.write_json(artefacts.build_facts_path(staged), plan.build)
        target = artefacts.export_dataset_dir(out, plan.spec)
        _swap_in(staged, target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return target


def export(
    chains_root: Path,
    data_dir: Path,
    out: Path,
    names: Iterable[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> list[Path]:
    """Plan every requested dataset before writing any, then rewrite the card for all datasets in `out`."""
    if max_shard_bytes <= 0:
        raise UserError(
            f"the shard size limit (--max-shard-mb) must be positive, got {max_shard_bytes} bytes"
        )
    plans = [
        plan_dataset(Path(chains_root), Path(data_dir), name, max_shard_bytes) for name in names
    ]
    if not plans:
        raise UserError("no dataset to export: name at least one, e.g. `dbr export PACS`")
    written = [write_dataset(plan, Path(out), progress) for plan in plans]
    write_card(Path(out), tuple(plan.spec.name for plan in plans))
    return written


def export_and_report(
    chains_root: Path,
    data_dir: Path,
    out: Path,
    names: Iterable[str],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> list[Path]:
    """`dbr export`: export, then say where each dataset went and how to load it."""
    datasets.disable_progress_bars()
    written = export(chains_root, data_dir, out, names, max_shard_bytes, progress)
    for folder in written:
        console.print(f"[green]exported[/] {folder}", highlight=False)
    console.print(
        f"card: {Path(out) / 'README.md'}; try `load_dataset({str(out)!r}, {written[0].name!r})`",
        highlight=False,
    )
    return written

"""A chain build folder (`runs/chains/<DATASET>`), read from the outside through its files only.

Export and `dbr browse` both need what became of every image of the manifest: accepted (and with
which candidate), exhausted, or still pending. They read it from the files `dbr build-chains`
writes (manifest, chains.parquet, stats.json, the candidate shards) rather than from the builder's
code, so the data flow stays one way; which images are exhausted is taken from stats.json, where
the builder itself decided it, so the rule lives in one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from domainbed_reasoning import artefacts
from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.data.registry import DatasetSpec
from domainbed_reasoning.errors import UserError

ACCEPTED, EXHAUSTED, PENDING = "accepted", "exhausted", "pending"
CANDIDATE_KEY = ("id", "round", "candidate_index")
MANIFEST_COLUMNS = ("id", "domain", "class_name")
CHAIN_FIELDS = ("chain", "summary", "caption", "reasoning", "reflection", "conclusion")
CHAINS_COLUMNS = ("id", "domain", "class_name", *CHAIN_FIELDS, "teacher", "prompt_version", "round")
OUTCOME_SCHEMA = {
    "id": pl.String,
    "chain_status": pl.String,
    "attempts": pl.Int32,
    "round": pl.Int32,
    "temperature": pl.Float32,
    "tried_teacher": pl.String,
    "tried_prompt_version": pl.String,
}


@dataclass(frozen=True)
class ChainRun:
    """The files of one build folder, checked; `candidates` holds only the columns asked for."""

    spec: DatasetSpec
    folder: Path
    manifest: pl.DataFrame
    chains: pl.DataFrame
    candidates: pl.DataFrame
    stats: dict

    @property
    def exhausted_ids(self) -> list[str]:
        return list(self.stats.get("exhausted", {}))


def _read_table(path: Path, columns: Sequence[str], fix: str) -> pl.DataFrame:
    if not path.is_file():
        raise UserError(f"{path} does not exist: {fix}")
    frame = pl.read_parquet(path)
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}: {fix}")
    return frame


def read_candidates(folder: Path, columns: Sequence[str]) -> pl.DataFrame:
    """Every stored teacher answer (the shards, deduplicated on their key), only `columns`.

    Shards written by different builder versions may differ in columns; only the asked-for
    ones, which every version wrote, are read."""
    wanted = list(dict.fromkeys([*CANDIDATE_KEY, *columns]))
    shards = sorted(Path(folder).glob("*.parquet"))
    if not shards:
        return pl.DataFrame(schema={column: pl.String for column in wanted}).cast(
            {"round": pl.Int32, "candidate_index": pl.Int32}
        )
    return (
        pl.scan_parquet(shards, missing_columns="insert", extra_columns="ignore")
        .select(wanted)
        .unique(subset=list(CANDIDATE_KEY), keep="first", maintain_order=True)
        .collect()
    )


def read_chain_run(
    chains_root: Path, spec: DatasetSpec, candidate_columns: Sequence[str] = ()
) -> ChainRun:
    """Refuses a folder `dbr build-chains` did not finish (its fix is to run that command)."""
    folder = artefacts.chains_dir(chains_root, spec)
    fix = f"build them first (`dbr build-chains {spec.name} --out {chains_root}`)"
    manifest = _read_table(artefacts.manifest_path(folder), MANIFEST_COLUMNS, fix)
    chains = _read_table(artefacts.chains_path(folder), CHAINS_COLUMNS, fix)
    stats_file = artefacts.stats_path(folder)
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    if "exhausted" not in stats:
        raise UserError(
            f"{stats_file} does not list the exhausted images: run `dbr build-chains {spec.name} "
            f"--out {chains_root}` again, which rewrites it without asking the teacher for finished images"
        )
    columns = ("temperature", "reason", "teacher", "prompt_version", *candidate_columns)
    candidates = read_candidates(artefacts.candidates_dir(folder), columns)
    return ChainRun(spec, folder, manifest, chains, candidates, stats)


def image_outcomes(run: ChainRun) -> pl.DataFrame:
    """Per manifest image: chain_status, attempts (teacher answers sampled in total, transport
    failures not counted), and the round and temperature of the accepted candidate."""
    answers = run.candidates.filter(pl.col("reason") != RejectReason.REQUEST_ERROR.value)
    per_image = answers.group_by("id").agg(
        pl.len().cast(pl.Int32).alias("attempts"),
        pl.col("teacher").sort_by("round").last().alias("tried_teacher"),
        pl.col("prompt_version").sort_by("round").last().alias("tried_prompt_version"),
    )
    temperatures = run.candidates.group_by("id", "round").agg(pl.col("temperature").first())
    accepted = (
        run.chains.select("id", pl.col("round").cast(pl.Int32))
        .join(temperatures.with_columns(pl.col("round").cast(pl.Int32)), on=["id", "round"], how="left")
        .with_columns(pl.col("temperature").cast(pl.Float32))
    )
    exhausted = pl.Series("id", run.exhausted_ids, dtype=pl.String).implode()
    status = (
        pl.when(pl.col("id").is_in(run.chains["id"].implode()))
        .then(pl.lit(ACCEPTED))
        .when(pl.col("id").is_in(exhausted))
        .then(pl.lit(EXHAUSTED))
        .otherwise(pl.lit(PENDING))
    )
    return (
        run.manifest.select("id")
        .join(per_image, on="id", how="left")
        .join(accepted, on="id", how="left")
        .with_columns(status.alias("chain_status"), pl.col("attempts").fill_null(0))
        .select(list(OUTCOME_SCHEMA))
        .cast(OUTCOME_SCHEMA)
    )


def status_counts(outcomes: pl.DataFrame, by: str) -> pl.DataFrame:
    """Per group of `image_outcomes` rows: every image, how many the teacher answered at least
    once (the base of an acceptance rate, so a `--limit` trial is not read as a low rate), and
    how many are accepted, exhausted and pending."""
    return (
        outcomes.group_by(by)
        .agg(
            images=pl.len(),
            answered=(pl.col("attempts") > 0).sum(),
            accepted=(pl.col("chain_status") == ACCEPTED).sum(),
            exhausted=(pl.col("chain_status") == EXHAUSTED).sum(),
            pending=(pl.col("chain_status") == PENDING).sum(),
        )
        .sort(by)
    )

"""`dbr build-chains DATASET --rejudge`: every stored candidate judged again, without the teacher.

The candidate shards keep each answer's full text, so a changed judge (its rules or
lexicon.yaml) can be applied to a finished or half-done build for free. Each shard
is rewritten whole by an atomic rename with only its verdict columns changed;
request failures stay as they are (they have no answer to judge). A crash part-way
leaves every shard judged by one judge or the other, and running `--rejudge` again
finishes the job. chains.parquet, stats.json and report.md are then derived again,
and rejudge.json/rejudge.md say what changed. An image that lost its chain and has
rounds left is pending: the next normal build asks the teacher for its next round.

A build records its judge's version in stats.json, and a normal build refuses to add
candidates to a store another judge decided, so two judges are never mixed silently.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
from domainbed_reasoning.builders.build_config import BuildConfig
from domainbed_reasoning.builders.build_report import RunInfo, image_status, write_outputs
from domainbed_reasoning.builders.rejection_sampling import ACCEPTED, progress_by_image
from domainbed_reasoning.builders.store.candidate_store import (
    KEY,
    SHARD_GLOB,
    compact,
    read_candidates,
    scan_candidates,
    shards,
    store_lock,
)
from rich.table import Table

from domainbed_reasoning import atomic
from domainbed_reasoning.artefacts import (
    candidates_dir,
    chains_dir,
    manifest_path,
    rejudge_path,
    stats_path,
)
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.rules import RejectReason
from domainbed_reasoning.chains.verdict import judge, judge_version
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console

VERDICT_COLUMNS = ("reason", "predicted", "detail")
# Stored reasons a judge gave; any other (a failed request) has no answer to judge and stays.
JUDGED = frozenset(
    {ACCEPTED} | {r.value for r in RejectReason if r is not RejectReason.REQUEST_ERROR}
)
LISTED = 50


@dataclass(frozen=True)
class Changes:
    """What re-judging changed, per candidate and per image."""

    dataset: str
    judge_version: str
    previous_judge_version: str | None
    candidates: int
    changed: int
    shards_rewritten: int
    transitions: dict[str, int]  # "old -> new": candidates
    # candidates accepted before, counted by the rule that rejects them now
    newly_rejected_by_rule: dict[str, int]
    images_newly_accepted: list[str]
    images_newly_pending: list[str]  # lost their chain, rounds left: the next build samples them
    images_newly_exhausted: list[str]  # lost their chain, no rounds left


def stored_judge_version(folder: Path) -> str | None:
    """The judge version the last build of `folder` recorded (None before versions were recorded)."""
    path = stats_path(folder)
    return json.loads(path.read_text()).get("judge_version") if path.is_file() else None


def require_current_judge(folder: Path, dataset: str) -> None:
    """Refuse to add candidates to a store whose verdicts another judge decided."""
    if not stats_path(folder).is_file() or not any(candidates_dir(folder).glob(SHARD_GLOB)):
        return
    stored = stored_judge_version(folder)
    if stored != judge_version():
        raise UserError(
            f"the candidates in {folder} were judged by judge {stored or 'of an older dbr'}, this dbr's"
            f" judge is {judge_version()}: run `dbr build-chains {dataset} --rejudge` with the same"
            " options first (no teacher calls), then this command again"
        )


def _rejudge_frame(
    frame: pl.DataFrame, labels: dict[str, str], matcher: ClassMatcher
) -> pl.DataFrame:
    """The shard with its verdict columns recomputed; rows no judge decided, or whose image left
    the manifest, stay as they are."""
    verdicts = []
    for id_, text, finish_reason, reason, predicted, detail in frame.select(
        "id", "text", "finish_reason", *VERDICT_COLUMNS
    ).iter_rows():
        label = labels.get(id_)
        if label is None or reason not in JUDGED:
            verdicts.append((reason, predicted, detail))
            continue
        verdict = judge(text, matcher, label, finish_reason)
        verdicts.append(
            (
                ACCEPTED if verdict.accepted else str(verdict.reason),
                verdict.predicted,
                verdict.detail,
            )
        )
    new = pl.DataFrame(verdicts, schema={c: pl.String for c in VERDICT_COLUMNS}, orient="row")
    return frame.with_columns(new.get_columns())


def rejudge_shards(folder: Path, labels: dict[str, str], matcher: ClassMatcher) -> int:
    """Rewrite every shard whose verdicts change; return how many were rewritten."""
    rewritten = 0
    for path in shards(candidates_dir(folder)):
        frame = pl.read_parquet(path)
        judged = _rejudge_frame(frame, labels, matcher)
        if not judged.equals(frame):
            atomic.write_parquet(path, judged)
            rewritten += 1
    return rewritten


def _changes(
    before: pl.DataFrame,
    after: pl.DataFrame,
    status_before: pl.DataFrame,
    status_after: pl.DataFrame,
) -> dict:
    pairs = before.select(*KEY, old="reason").join(after.select(*KEY, new="reason"), on=list(KEY))
    moved = pairs.filter(pl.col("old") != pl.col("new"))
    transitions = (
        moved.group_by("old", "new")
        .len()
        .sort("len", "old", "new", descending=[True, False, False])
    )
    lost = moved.filter(pl.col("old") == ACCEPTED).group_by("new").len().sort("new")
    statuses = status_before.select("id", old="status").join(
        status_after.select("id", "status"), on="id"
    )
    was_accepted = pl.col("old") == ACCEPTED

    def ids(condition: pl.Expr) -> list[str]:
        return sorted(statuses.filter(condition)["id"].to_list())

    return {
        "changed": moved.height,
        "transitions": {f"{old} -> {new}": count for old, new, count in transitions.iter_rows()},
        "newly_rejected_by_rule": dict(lost.iter_rows()),
        "images_newly_accepted": ids(~was_accepted & (pl.col("status") == ACCEPTED)),
        "images_newly_pending": ids(was_accepted & (pl.col("status") == "pending")),
        "images_newly_exhausted": ids(was_accepted & (pl.col("status") == "exhausted")),
    }


def rejudge(config: BuildConfig) -> Changes:
    """Judge every stored candidate of `config.dataset` again; rewrite shards and outputs."""
    spec = get_spec(config.dataset)
    folder = chains_dir(config.out, spec)
    if not manifest_path(folder).is_file() or not any(candidates_dir(folder).glob(SHARD_GLOB)):
        raise UserError(
            f"nothing to re-judge in {folder}: no manifest or candidates there; run"
            f" `dbr build-chains {spec.name}` (check --out) first"
        )
    start = time.perf_counter()
    previous = stored_judge_version(folder)
    manifest = pl.read_parquet(manifest_path(folder))
    labels = dict(manifest.select("id", "class_name").iter_rows())
    matcher = ClassMatcher(spec.classes)
    store = candidates_dir(folder)
    rounds = config.plan.max_rounds
    with store_lock(folder):
        compact(store)  # one schema, no half-finished merge, before shards are rewritten
        before = read_candidates(store, ["id", "round", "candidate_index", "reason"])
        status_before = image_status(manifest, progress_by_image(scan_candidates(store)), rounds)
        rewritten = rejudge_shards(folder, labels, matcher)
        after = read_candidates(store, [*KEY, "reason", "teacher", "teacher_url"])
        progress = progress_by_image(scan_candidates(store))
        changes = _changes(before, after, status_before, image_status(manifest, progress, rounds))
        run = RunInfo(
            dataset=spec.name,
            teacher=", ".join(sorted(after["teacher"].unique().drop_nulls().to_list())),
            teacher_hosts=sorted(after["teacher_url"].unique().drop_nulls().to_list()),
            candidates=config.plan.candidates,
            max_rounds=rounds,
            temperatures=list(config.plan.temperatures),
            seed=config.plan.seed,
            top_p=config.teacher.top_p,
            max_tokens=config.teacher.max_tokens,
            shard=str(config.shard),
            limit=config.limit,
            selected=0,
            skipped_files=0,
            requests=0,
            seconds=round(time.perf_counter() - start, 3),
            action="rejudge",
        )
        write_outputs(folder, manifest, progress["id"], store, matcher, run)
    result = Changes(
        dataset=spec.name,
        judge_version=judge_version(),
        previous_judge_version=previous,
        candidates=after.height,
        shards_rewritten=rewritten,
        **changes,
    )
    atomic.write_json(rejudge_path(folder), asdict(result))
    atomic.write_text(rejudge_path(folder).with_suffix(".md"), render_changes(result))
    return result


def _listed(ids: list[str]) -> str:
    more = f" ... and {len(ids) - LISTED} more (rejudge.json)" if len(ids) > LISTED else ""
    return ", ".join(f"`{id_}`" for id_ in ids[:LISTED]) + more if ids else "none"


def render_changes(changes: Changes) -> str:
    rows = "\n".join(f"| {move} | {count} |" for move, count in changes.transitions.items())
    lost = ", ".join(f"{rule} x{n}" for rule, n in changes.newly_rejected_by_rule.items())
    return (
        "\n\n".join(
            [
                f"# Re-judged: {changes.dataset}",
                (
                    f"Judge {changes.previous_judge_version or '(unrecorded)'} -> {changes.judge_version}:"
                    f" {changes.changed} of {changes.candidates} stored candidates changed verdict"
                    f" ({changes.shards_rewritten} shards rewritten); no teacher requests."
                ),
                "## Verdict changes\n\n| old -> new | candidates |\n|---|---|\n" + rows
                if rows
                else "## Verdict changes\n\nnone",
                f"Accepted candidates now rejected, by rule: {lost or 'none'}.",
                f"## Images newly accepted ({len(changes.images_newly_accepted)})\n\n"
                + _listed(changes.images_newly_accepted),
                f"## Images that lost their chain, rounds left: pending"
                f" ({len(changes.images_newly_pending)})\n\n"
                + _listed(changes.images_newly_pending),
                f"## Images that lost their chain, no rounds left: exhausted"
                f" ({len(changes.images_newly_exhausted)})\n\n"
                + _listed(changes.images_newly_exhausted),
            ]
        )
        + "\n"
    )


def rejudge_and_summarise(config: BuildConfig) -> Changes:
    """`dbr build-chains --rejudge`: re-judge, then print what changed and where it is written."""
    changes = rejudge(config)
    table = Table(title=f"{changes.dataset}: verdict changes (judge {changes.judge_version})")
    table.add_column("old -> new")
    table.add_column("candidates", justify="right")
    for move, count in changes.transitions.items():
        table.add_row(move, f"{count:,}")
    console.print(table)
    folder = chains_dir(config.out, get_spec(config.dataset))
    console.print(
        f"[green]{changes.dataset}[/]: {changes.changed:,} of {changes.candidates:,} candidates changed;"
        f" images newly accepted {len(changes.images_newly_accepted):,}, newly pending"
        f" {len(changes.images_newly_pending):,} (the next build samples them), newly exhausted"
        f" {len(changes.images_newly_exhausted):,}. Details: {rejudge_path(folder).with_suffix('.md')}",
        highlight=False,
    )
    return changes

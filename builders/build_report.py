"""chains.parquet, stats.json and report.md, derived from the candidate shards.

They are recomputed from scratch at the end of every run rather than updated,
so whatever happened before (crashes, resumed runs, several shards of work)
they always agree with the shards, which stay the one source of truth. Each
query reads only the columns it needs, and the answers' text only for the
accepted candidates, so a store of millions of candidates derives in seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
from domainbed_reasoning.builders.cost.budget import spend_by_mode
from domainbed_reasoning.builders.cost.pricing import Price, unknown_price_note
from domainbed_reasoning.builders.rejection_sampling import (
    ACCEPTED,
    REQUEST_ERROR,
    progress_by_image,
)
from domainbed_reasoning.builders.store.candidate_store import scan_candidates

from domainbed_reasoning import atomic
from domainbed_reasoning.artefacts import chains_path, report_path, stats_path
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.rules import RULES
from domainbed_reasoning.chains.verdict import judge, judge_version

STAGE_COLUMNS = ("summary", "caption", "reasoning", "reflection", "conclusion")
CHAIN_COLUMNS = (
    "id", "dataset", "domain", "class_name", "label", "path", "chain", *STAGE_COLUMNS,
    "teacher", "prompt_version", "attempts", "round",
)  # fmt: skip
EXHAUSTED_LISTED = 50
ERRORS_LISTED = 5
RATE_HEADER = ("group", "images", "accepted", "rate")
TOKEN_HEADER = ("requests", "prompt tokens", "completion tokens", "tokens per accepted chain")
REQUEST_ERROR_NOTE = (
    "Only teacher answers use up rounds. A request that still fails after its retries (on every replica)"
    " is stored as one `request_error` row and leaves its image pending at the same round; running the"
    " same command again retries exactly those images."
)


@dataclass(frozen=True)
class RunInfo:
    """What only the run itself knows: its settings and how fast it went."""

    dataset: str
    teacher: str
    teacher_hosts: list[str]
    candidates: int
    max_rounds: int
    temperatures: list[float]
    seed: int
    top_p: float
    max_tokens: int
    shard: str
    limit: int | None
    selected: int
    skipped_files: int
    requests: int
    seconds: float
    stopped: str | None = None
    action: str = "sample"  # or "rejudge": stored candidates judged again, no teacher requests
    mode: str = "online"  # or "batch": each pending image's next round sent as a batch
    prices: dict[str, Price | None] = field(default_factory=dict)  # per mode; None: unknown
    spent_usd: float = 0.0  # measured over this run's answers


def derive_chains(manifest: pl.DataFrame, store: Path, matcher: ClassMatcher) -> pl.DataFrame:
    """The first accepted candidate of each image, its stages, and how many answers came up to it."""
    accepted = (
        scan_candidates(
            store,
            [
                "id",
                "round",
                "candidate_index",
                "reason",
                "text",
                "finish_reason",
                "teacher",
                "prompt_version",
            ],
        )
        .filter(pl.col("reason") == ACCEPTED)
        .sort("id", "round", "candidate_index")
        .unique("id", keep="first", maintain_order=True)
        .collect()
    )
    first = accepted.select("id", accepted_round="round", accepted_index="candidate_index")
    answers_until = (
        scan_candidates(store, ["id", "round", "candidate_index", "reason"])
        .filter(pl.col("reason") != REQUEST_ERROR)
        .join(first.lazy(), on="id")
        .filter(
            (pl.col("round") < pl.col("accepted_round"))
            | (
                (pl.col("round") == pl.col("accepted_round"))
                & (pl.col("candidate_index") <= pl.col("accepted_index"))
            )
        )
        .group_by("id")
        .agg(attempts=pl.len())
        .collect()
    )
    rows = accepted.join(answers_until, on="id").join(
        manifest.select("id", "dataset", "domain", "class_name", "label", "path"), on="id"
    )
    stages = []
    for text, class_name, finish_reason in rows.select(
        "text", "class_name", "finish_reason"
    ).iter_rows():
        chain = judge(text, matcher, class_name, finish_reason).chain
        stages.append({"chain": chain.text, **chain.as_dict()})
    stage_frame = pl.DataFrame(
        stages, schema={"chain": pl.String, **{c: pl.String for c in STAGE_COLUMNS}}
    )
    return pl.concat([rows, stage_frame], how="horizontal").select(CHAIN_COLUMNS).sort("id")


def image_status(manifest: pl.DataFrame, progress: pl.DataFrame, max_rounds: int) -> pl.DataFrame:
    """Every attempted image with its status: accepted, exhausted (every round answered, none
    accepted), or pending (rounds left; `failed` when a request of its next round failed)."""
    status = (
        pl.when(pl.col("accepted"))
        .then(pl.lit("accepted"))
        .when(pl.col("rounds") >= max_rounds)
        .then(pl.lit("exhausted"))
        .otherwise(pl.lit("pending"))
    )
    return progress.join(manifest, on="id").with_columns(
        status=status, failed=pl.col("failed_round") > pl.col("rounds")
    )


def _rates(status: pl.DataFrame, by: str) -> dict[str, dict]:
    grouped = status.group_by(by).agg(images=pl.len(), accepted=pl.col("accepted").sum()).sort(by)
    return {
        key: {"images": images, "accepted": accepted, "rate": round(accepted / images, 4)}
        for key, images, accepted in grouped.iter_rows()
    }


def _counts(frame: pl.DataFrame, column: str) -> dict[str, int]:
    return {str(key): count for key, count in frame.group_by(column).len().sort(column).iter_rows()}


def request_failures(store: Path, status: pl.DataFrame) -> dict:
    """The failed requests in the store, the images they leave pending, and their commonest errors."""
    failures = (
        scan_candidates(store, ["reason", "detail"])
        .filter(pl.col("reason") == REQUEST_ERROR)
        .collect()
    )
    errors = failures.group_by("detail").len().sort(["len", "detail"], descending=[True, False])
    return {
        "requests": failures.height,
        "pending_images": status.filter((pl.col("status") == "pending") & pl.col("failed")).height,
        "errors": dict(errors.head(ERRORS_LISTED).iter_rows()),
    }


def compute_stats(
    manifest: pl.DataFrame,
    selected: pl.Series,
    store: Path,
    progress: pl.DataFrame,
    chains: pl.DataFrame,
    run: RunInfo,
) -> dict:
    status = image_status(manifest, progress, run.max_rounds)
    columns = [
        "id", "candidate_index", "reason", "prompt_version", "prompt_tokens", "completion_tokens", "mode",
    ]  # fmt: skip
    answers = scan_candidates(store, columns).filter(pl.col("reason") != REQUEST_ERROR).collect()
    requests = answers.filter(pl.col("candidate_index") == 0)
    prompt_tokens = int(requests["prompt_tokens"].sum())
    completion_tokens = int(requests["completion_tokens"].sum())
    exhausted_ids = status.filter(pl.col("status") == "exhausted")["id"]
    exhausted = (
        answers.filter(pl.col("id").is_in(exhausted_ids.implode()))
        .group_by("id", "reason")
        .len()
        .sort("id", "reason")
        .group_by("id", maintain_order=True)
        .agg(pl.struct("reason", "len"))
    )
    resolved = status.filter(pl.col("status") != "pending")["id"]
    unresolved = selected.len() - selected.is_in(resolved.implode()).sum()
    images = status.height
    accepted = int(status["accepted"].sum())
    return {
        "run": asdict(run)
        | {
            "requests_per_s": round(run.requests / run.seconds, 2) if run.seconds else 0.0,
            "request_errors_retire_a_round": False,
            "unresolved": int(unresolved),
        },
        "images": {"attempted": images, **_counts(status, "status")},
        "acceptance_rate": round(accepted / images, 4) if images else 0.0,
        "per_domain": _rates(status, "domain"),
        "per_class": _rates(status, "class_name"),
        "judge_version": judge_version(),
        "prompt_versions": _counts(answers, "prompt_version"),
        "candidates": answers.height,
        "requests": requests.height,
        "request_failures": request_failures(store, status),
        "reasons": _counts(answers, "reason"),
        "rejections_by_rule": _counts(answers.filter(pl.col("reason") != ACCEPTED), "reason"),
        "rounds_needed": {str(k): v for k, v in _counts(chains, "round").items()},
        "attempts_mean": round(float(chains["attempts"].mean()), 3) if chains.height else None,
        "tokens": {
            "prompt": prompt_tokens,
            "completion": completion_tokens,
            "per_accepted_chain": round((prompt_tokens + completion_tokens) / chains.height, 1)
            if chains.height
            else None,
        },
        "cost": spend_by_mode(requests, run.prices),
        "exhausted": {
            id_: {row["reason"]: row["len"] for row in reasons}
            for id_, reasons in exhausted.iter_rows()
        },
    }


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _rate_rows(rates: dict[str, dict]) -> list[tuple]:
    return [
        (key, r["images"], r["accepted"], f"{100 * r['rate']:.1f}%") for key, r in rates.items()
    ]


def _verdict_rows(stats: dict) -> list[tuple]:
    """Accepted first, then every rejecting rule with what it means, most frequent first."""
    rows = []
    if ACCEPTED in stats["reasons"]:
        rows.append((ACCEPTED, stats["reasons"][ACCEPTED], "a label-consistent chain"))
    rules = sorted(stats["rejections_by_rule"].items(), key=lambda item: (-item[1], item[0]))
    return rows + [(rule, count, RULES.get(rule, "")) for rule, count in rules]


def _settings_line(run: dict) -> str:
    limit = "" if run["limit"] is None else f", limit {run['limit']}"
    return (
        f"Teacher `{run['teacher']}` at {', '.join(run['teacher_hosts'])}; {run['candidates']} candidates"
        f" per request, at most {run['max_rounds']} rounds, temperatures {run['temperatures']},"
        f" top_p {run['top_p']}, max_tokens {run['max_tokens']}, seed {run['seed']};"
        f" shard {run['shard']}{limit}."
    )


def _exhausted_section(exhausted: dict[str, dict[str, int]]) -> str:
    rows = [
        (id_, ", ".join(f"{r} x{n}" for r, n in reasons.items()))
        for id_, reasons in exhausted.items()
    ]
    more = len(rows) - EXHAUSTED_LISTED
    tail = f"\n\n... and {more} more (all in stats.json)." if more > 0 else ""
    return (
        f"## Exhausted images ({len(rows)})\n\n"
        + _table(("id", "reject reasons"), rows[:EXHAUSTED_LISTED])
        + tail
    )


def _failures_section(stats: dict) -> str:
    failures, run = stats["request_failures"], stats["run"]
    stopped = f"\n\n**The build stopped early:** {run['stopped']}" if run["stopped"] else ""
    return (
        f"## Failed requests\n\n{failures['requests']} requests failed after their retries;"
        f" {failures['pending_images']} images wait for a re-run because of them, and {run['unresolved']}"
        f" images of this run's selection are unresolved.{stopped}\n\n"
        + _table(("error", "requests"), list(failures["errors"].items()))
    )


def _cost_section(stats: dict) -> str:
    """Tokens and dollars per mode over the whole folder, and the prices they were taken at."""
    cost, run = stats["cost"], stats["run"]
    rows = [
        (mode, row["requests"], row["prompt"], row["completion"], _usd(row["usd"]))
        for mode, row in cost["by_mode"].items()
    ]
    prices = [
        f"- {mode}: "
        + (unknown_price_note(run["teacher"]) if price is None else Price(**price).describe())
        for mode, price in run["prices"].items()
        if mode in cost["by_mode"]
    ]
    total = (
        f"Cost of every answer in this folder: {_usd(cost['usd'])} (measured `usage`;"
        f" this run: ${run['spent_usd']:,.2f}). Prices:"
    )
    header = ("mode", "requests", "prompt tokens", "completion tokens", "cost")
    return "\n\n".join(
        ["## Tokens and cost", _table(header, rows), "\n".join([total, *prices])]
    )


def _usd(amount: float | None) -> str:
    return "unknown" if amount is None else f"${amount:,.2f}"


def render_report(stats: dict) -> str:
    run, images, tokens = stats["run"], stats["images"], stats["tokens"]
    headline = (
        f"**{images.get('accepted', 0)} of {images['attempted']} attempted images accepted"
        f" ({100 * stats['acceptance_rate']:.1f}%)**; exhausted {images.get('exhausted', 0)},"
        f" pending {images.get('pending', 0)}."
    )
    token_row = (
        stats["requests"],
        tokens["prompt"],
        tokens["completion"],
        tokens["per_accepted_chain"],
    )
    throughput = (
        f"This run: {run['requests']} requests in {run['seconds']:.1f} s ({run['requests_per_s']} requests/s)"
        f" over {run['selected']} selected images; {run['skipped_files']} unreadable files skipped by the scan."
        if run["action"] == "sample"
        else f"This run re-judged the {stats['candidates']} stored candidates in {run['seconds']:.1f} s"
        " without asking the teacher (`--rejudge`)."
    )
    judged = (
        f"Judge version `{stats['judge_version']}`; teacher prompt version(s)"
        f" {', '.join(f'`{v}`' for v in stats['prompt_versions']) or 'none yet'}."
    )
    parts = [
        f"# Chain build report: {run['dataset']}",
        _settings_line(run),
        headline,
        REQUEST_ERROR_NOTE,
        "## Acceptance per domain\n\n" + _table(RATE_HEADER, _rate_rows(stats["per_domain"])),
        "## Acceptance per class\n\n" + _table(RATE_HEADER, _rate_rows(stats["per_class"])),
        "## Candidate verdicts, by rule\n\n"
        + _table(("verdict", "candidates", "rule"), _verdict_rows(stats))
        + "\n\n"
        + judged,
        "## Rounds needed\n\n" + _table(("round", "images"), list(stats["rounds_needed"].items())),
        f"Mean candidates seen until acceptance: {stats['attempts_mean']}.",
        "## Tokens and throughput\n\n" + _table(TOKEN_HEADER, [token_row]),
        throughput,
        _cost_section(stats),
        _failures_section(stats),
        _exhausted_section(stats["exhausted"]),
    ]
    return "\n\n".join(parts) + "\n"


def write_outputs(
    chains_dir: Path,
    manifest: pl.DataFrame,
    selected: pl.Series,
    store: Path,
    matcher: ClassMatcher,
    run: RunInfo,
) -> dict:
    """Rewrite chains.parquet, stats.json and report.md atomically; return the stats."""
    progress = progress_by_image(scan_candidates(store))
    chains = derive_chains(manifest, store, matcher)
    stats = compute_stats(manifest, selected, store, progress, chains, run)
    atomic.write_parquet(chains_path(chains_dir), chains)
    atomic.write_json(stats_path(chains_dir), stats)
    atomic.write_text(report_path(chains_dir), render_report(stats))
    return stats

"""`dbr browse runs/chains/PACS`: one self-contained HTML page to judge a build's chains by eye.

After a trial run (`--limit 200`) the question is whether the chains are any good. The page shows
acceptance per domain and class, then a sample of images per domain and class with the accepted
chain's five stages and every rejected candidate with its reject reason, filterable by domain,
class, status and reason. Thumbnails are inline (data: URLs) and the script is inline, so the file
can be mailed or opened offline, and its Content-Security-Policy forbids any network request.

It lives beside `export` because it reads the build folder the same way, through its files only
(`chain_run.py`), and shows what an export would publish.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from PIL import Image, UnidentifiedImageError

from domainbed_reasoning import atomic
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.chain_run import (
    ACCEPTED,
    CHAIN_FIELDS,
    EXHAUSTED,
    PENDING,
    ChainRun,
    image_outcomes,
    read_chain_run,
    status_counts,
)
from domainbed_reasoning.templates import render
from domainbed_reasoning.terminal import console

PAGE_NAME = "browse.html"
TEMPLATE = "browse.html.j2"
STAGES = CHAIN_FIELDS[1:]
MAX_TEXT = 4000  # characters of a rejected answer shown; longer ones are cut with a note


@dataclass(frozen=True)
class BrowseOptions:
    per_class: int = 6
    seed: int = 0
    thumb_size: int = 192

    def __post_init__(self) -> None:
        if self.per_class < 1:
            raise UserError(
                f"--per-class {self.per_class}: show at least 1 image per domain and class"
            )
        if not 16 <= self.thumb_size <= 1024:
            raise UserError(f"--thumb-size {self.thumb_size}: choose 16 to 1024 pixels")


def thumbnail(path: str, size: int) -> str | None:
    """The image as a small inline JPEG (a data: URL), or None when the file is gone or unreadable."""
    try:
        with Image.open(path) as image:
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=80)
    except (FileNotFoundError, UnidentifiedImageError, OSError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def rates(outcomes: pl.DataFrame, by: str) -> list[dict]:
    """Per group: every image, what became of it, and acceptance over the answered images."""
    return (
        status_counts(outcomes, by)
        .with_columns(
            rate=pl.when(pl.col("answered") > 0).then(pl.col("accepted") / pl.col("answered"))
        )
        .rename({by: "group"})
        .to_dicts()
    )


def sample(outcomes: pl.DataFrame, options: BrowseOptions) -> pl.DataFrame:
    """Up to `per_class` answered images per domain and class, the same ones for the same seed."""
    return (
        outcomes.filter(pl.col("attempts") > 0)
        .sort(pl.col("id").hash(options.seed), "id")
        .group_by("domain", "class_name", maintain_order=True)
        .head(options.per_class)
        .sort("domain", "class_name", "id")
    )


def _candidates_by_image(run: ChainRun, ids: pl.Series) -> dict[str, list[dict]]:
    rejected = (
        run.candidates.filter(pl.col("id").is_in(ids.implode()) & (pl.col("reason") != ACCEPTED))
        .sort("id", "round", "candidate_index")
        .with_columns(
            cut=pl.col("text").str.len_chars() > MAX_TEXT,
            text=pl.col("text").str.slice(0, MAX_TEXT),
        )
    )
    grouped: dict[str, list[dict]] = {}
    for row in rejected.iter_rows(named=True):
        grouped.setdefault(row["id"], []).append(row)
    return grouped


def _cards(run: ChainRun, picked: pl.DataFrame, options: BrowseOptions) -> list[dict]:
    chains = {row["id"]: row for row in run.chains.select("id", *STAGES).iter_rows(named=True)}
    rejected = _candidates_by_image(run, picked["id"])
    cards = []
    for row in picked.iter_rows(named=True):
        candidates = rejected.get(row["id"], [])
        chain = chains.get(row["id"])
        cards.append(
            row
            | {
                "thumbnail": thumbnail(row["path"], options.thumb_size),
                "stages": [(stage, chain[stage]) for stage in STAGES] if chain else None,
                "rejected": candidates,
                "reasons": sorted({candidate["reason"] for candidate in candidates}),
            }
        )
    return cards


def render_page(run: ChainRun, options: BrowseOptions) -> tuple[str, int]:
    """The HTML, and how many images it shows."""
    outcomes = image_outcomes(run).join(
        run.manifest.select("id", "domain", "class_name", "path"), on="id"
    )
    cards = _cards(run, sample(outcomes, options), options)
    reasons = (
        run.candidates.filter(pl.col("reason") != ACCEPTED).group_by("reason").len().sort("reason")
    )
    html = render(
        __package__,
        TEMPLATE,
        dataset=run.spec.name,
        folder=str(run.folder),
        totals=rates(outcomes.with_columns(pl.lit("all").alias("all")), "all")[0],
        per_domain=rates(outcomes, "domain"),
        per_class=rates(outcomes, "class_name"),
        reasons=reasons.iter_rows(),
        cards=cards,
        domains=sorted({card["domain"] for card in cards}),
        classes=sorted({card["class_name"] for card in cards}),
        statuses=[s for s in (ACCEPTED, EXHAUSTED, PENDING) if any(c["chain_status"] == s for c in cards)],
        card_reasons=sorted({reason for card in cards for reason in card["reasons"]}),
        options=options,
        max_text=MAX_TEXT,
    )
    return html, len(cards)


def write_browser_page(
    folder: Path, out: Path | None = None, options: BrowseOptions = BrowseOptions()
) -> Path:
    """`dbr browse`: write the page and say where it is and what it holds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: pass a build folder, e.g. runs/chains/PACS")
    spec = get_spec(folder.name)
    run = read_chain_run(folder.parent, spec, candidate_columns=("text", "predicted", "detail"))
    html, shown = render_page(run, options)
    target = atomic.write_text(out or folder / PAGE_NAME, html)
    console.print(
        f"[green]{spec.name}[/]: {target} shows {shown:,} of {run.manifest.height:,} images "
        f"(up to {options.per_class} per domain and class); open it in a browser",
        highlight=False,
    )
    return target

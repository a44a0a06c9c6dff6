"""SARR's self-labelling: the student's own chains, judged by the builder's filter, become its supervision.

An image's K generated chains go through `verdict.judge` - the same strict parser
and label matcher that accepted the teacher's chains - so a self-label is kept
under exactly the rule a teacher chain was. The first accepted chain (in its
canonical form, as the builder stores chains) replaces the image's chain; an image
with none keeps the chain it had, because dropping it would shrink the reasoning
path to the images the model already gets right. Every candidate's verdict is
kept per image so the round's statistics can be recomputed from the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
from domainbed_reasoning.train.engines.base import Generation

from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.verdict import judge

ACCEPTED = "accepted"
SELF, PREVIOUS = "self", "previous"
UNLABELLED_POLICY = "an image with no label-consistent chain keeps its previous chain"
SCHEMA = {
    "id": pl.String,
    "class_name": pl.String,
    "chain": pl.String,
    "source": pl.String,
    "accepted": pl.Int64,
    "reasons": pl.List(pl.String),
}


@dataclass(frozen=True)
class Supervised:
    """A training image's current reasoning supervision: the teacher's chain, or a previous round's."""

    id: str
    class_name: str
    chain: str | None  # None: no accepted chain yet, the image trains the classification path only


def merge_self_labels(
    images: Sequence[Supervised], generations: Sequence[Generation], matcher: ClassMatcher
) -> pl.DataFrame:
    """One row per image (SCHEMA): the chain it trains on next, where it came from, every candidate's verdict."""
    if len(images) != len(generations):
        raise ValueError(f"{len(generations)} generations for {len(images)} images")
    rows = [
        _merge_one(image, generation, matcher)
        for image, generation in zip(images, generations, strict=True)
    ]
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def _merge_one(image: Supervised, generation: Generation, matcher: ClassMatcher) -> tuple:
    if generation.error is not None:
        return (
            image.id,
            image.class_name,
            image.chain,
            PREVIOUS,
            0,
            [RejectReason.REQUEST_ERROR.value],
        )
    verdicts = [
        judge(text, matcher, image.class_name, finish_reason)
        for text, finish_reason in zip(generation.texts, generation.finish_reasons, strict=True)
    ]
    reasons = [ACCEPTED if verdict.accepted else str(verdict.reason) for verdict in verdicts]
    kept = [verdict.chain.text for verdict in verdicts if verdict.accepted and verdict.chain]
    if kept:
        return (image.id, image.class_name, kept[0], SELF, len(kept), reasons)
    return (image.id, image.class_name, image.chain, PREVIOUS, 0, reasons)


def self_label_stats(frame: pl.DataFrame) -> dict:
    """The round's counts, all derived from the self-label table so they always agree with it."""
    images = frame.height
    replaced = frame.filter(pl.col("source") == SELF).height
    reasons = frame["reasons"].explode().drop_nulls().value_counts(sort=True)
    return {
        "images": images,
        "candidates": int(frame["reasons"].list.len().sum()),
        "accepted_candidates": int(frame["accepted"].sum()),
        "kept": replaced,
        "kept_pct": round(100.0 * replaced / images, 2) if images else 0.0,
        "replaced": replaced,
        "kept_previous": images - replaced,
        "request_errors": int(
            frame["reasons"].list.contains(RejectReason.REQUEST_ERROR.value).sum()
        ),
        "reasons": dict(zip(reasons["reasons"].to_list(), reasons["count"].to_list(), strict=True)),
        "unlabelled_policy": UNLABELLED_POLICY,
    }

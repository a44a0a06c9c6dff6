"""`dbr judge`: the builder's judge applied to one text, so a user can see what it keeps and why.

A bare conclusion is judged as the CONCLUSION of an otherwise well-formed chain, so
the answer printed is exactly the one the builder and SARR would reach.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from domainbed_reasoning.chains.chain_format import (
    STAGES,
    ChainFormatError,
    format_chain,
    parse_chain,
)
from domainbed_reasoning.chains.matching import matcher_for
from domainbed_reasoning.chains.rules import RULES, ReadBy, RejectReason
from domainbed_reasoning.chains.verdict import judge, judge_version
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console

_CONCLUSION_TAG = re.compile(r"<\s*/?\s*conclusion\s*>", re.IGNORECASE)
_PLACEHOLDER = "(not given)"


@dataclass(frozen=True)
class Judgement:
    """What `dbr judge` prints: kept or not, the class read, and the rule that decided."""

    kept: bool
    rule: ReadBy | RejectReason
    class_name: str | None
    detail: str


def as_chain(text: str) -> str:
    """`text` itself if it has CONCLUSION tags, else a chain concluding with `text`."""
    if _CONCLUSION_TAG.search(text):
        return text
    stages = {stage: _PLACEHOLDER for stage in STAGES} | {"CONCLUSION": text}
    return format_chain(stages)


def judgement(classes: Sequence[str], text: str, label: str | None = None) -> Judgement:
    """The verdict for `label`, or without one, the class the text is read as (or why none)."""
    matcher = matcher_for(tuple(classes))
    if label is not None and label not in matcher.class_set:
        raise UserError(
            f"--label {label!r} is not a class of this dataset: choose one of {', '.join(classes)}"
        )
    answer = as_chain(text)
    if label is not None:
        verdict = judge(answer, matcher, label)
        return Judgement(verdict.accepted, verdict.rule, verdict.predicted, verdict.detail)
    try:
        chain = parse_chain(answer)
    except ChainFormatError as err:
        return Judgement(False, err.reason, None, err.detail)
    reading = matcher.read(chain.conclusion)
    return Judgement(
        reading.class_name is not None, reading.rule, reading.class_name, reading.detail
    )


def print_judgement(classes: Sequence[str], text: str, label: str | None = None) -> Judgement:
    """`dbr judge`: one line each for the verdict, the rule (and what it means), the class, the detail."""
    result = judgement(classes, sys.stdin.read() if text == "-" else text, label)
    verdict = ("accepted" if label is not None else "read") if result.kept else "rejected"
    console.print(f"verdict  [{'green' if result.kept else 'red'}]{verdict}[/]")
    lines = [
        f"class    {result.class_name or '-'}",
        f"rule     {result.rule}: {RULES[result.rule]}",
        f"detail   {result.detail}",
        f"judge    {judge_version()}",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return result

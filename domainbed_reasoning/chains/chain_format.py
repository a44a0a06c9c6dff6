"""The five-stage reasoning chain: its canonical text and its strict parser.

A chain enters the dataset only if it parses here, so this module is the single
definition of "well formed" for the builder, the exporter and SARR alike. The
parser is strict on structure (all five stages, once each, in order, non-empty,
nothing but markup after </CONCLUSION>) and lenient on surface (tag case,
whitespace inside tags, prose before the first tag), because teachers vary in
surface but a malformed chain would teach the student a malformed format. A chain
that goes on after its conclusion may revise it ("On second thought, a horse"),
so it is rejected rather than cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from domainbed_reasoning.chains.rules import RejectReason

STAGES = ("SUMMARY", "CAPTION", "REASONING", "REFLECTION", "CONCLUSION")


class ChainFormatError(ValueError):
    """A malformed chain; `reason` is machine-readable, `detail` says where."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Chain:
    summary: str
    caption: str
    reasoning: str
    reflection: str
    conclusion: str

    def as_dict(self) -> dict[str, str]:
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @property
    def text(self) -> str:
        """The canonical form, so chains from different teachers look alike to the student."""
        return format_chain(self.as_dict())


def format_chain(stages: dict[str, str]) -> str:
    """Write the five stages in canonical form, one tagged stage per line."""
    by_name = {key.upper(): value for key, value in stages.items()}
    missing = [stage for stage in STAGES if stage not in by_name]
    unknown = sorted(set(by_name) - set(STAGES))
    if missing or unknown:
        raise ChainFormatError(
            RejectReason.MISSING_STAGE,
            f"format_chain needs exactly the stages {', '.join(STAGES)} "
            f"(missing: {', '.join(missing) or 'none'}; unknown: {', '.join(unknown) or 'none'})",
        )
    return "\n".join(f"<{stage}>{by_name[stage].strip()}</{stage}>" for stage in STAGES)


_TAG = re.compile(r"<\s*(/?)\s*(" + "|".join(STAGES) + r")\s*>", re.IGNORECASE)
# A well-formed chain in one match: the builder judges every candidate, so the common case
# must not pay for the tag-by-tag walk that explains what is wrong with a malformed one.
_WELL_FORMED = re.compile(
    r".*?".join(rf"<\s*{stage}\s*>(.*?)<\s*/\s*{stage}\s*>" for stage in STAGES),
    re.IGNORECASE | re.DOTALL,
)


# After </CONCLUSION> only whitespace and markup (`**`, a code fence) may follow.
_WORDS = re.compile(r"[^\W_]")


def _check_end(text: str, end: int) -> None:
    if found := _WORDS.search(text, end):
        tail = text[found.start() :].strip()
        quoted = repr(tail[:40] + ("..." if len(tail) > 40 else ""))
        raise ChainFormatError(RejectReason.TRAILING_TEXT, f"{quoted} follows </CONCLUSION>")


@dataclass(frozen=True)
class _Span:
    stage: str
    body: str


def _spans(text: str) -> tuple[list[_Span], int]:
    """Pair every opening tag with the next tag, which must be its own closing tag; also return
    where the last closing tag ends."""
    tags = list(_TAG.finditer(text))
    spans: list[_Span] = []
    index = 0
    while index < len(tags):
        opening = tags[index]
        stage = opening.group(2).upper()
        if opening.group(1):
            raise ChainFormatError(
                RejectReason.UNCLOSED_TAG, f"</{stage}> closes a tag that was never opened"
            )
        closing = tags[index + 1] if index + 1 < len(tags) else None
        if closing is None or not closing.group(1) or closing.group(2).upper() != stage:
            reason = (
                RejectReason.NO_CONCLUSION if stage == "CONCLUSION" else RejectReason.UNCLOSED_TAG
            )
            found = (
                f"<{closing.group(1)}{closing.group(2).upper()}>"
                if closing
                else "the end of the text"
            )
            raise ChainFormatError(reason, f"<{stage}> is not closed before {found}")
        spans.append(_Span(stage, text[opening.end() : closing.start()].strip()))
        index += 2
    return spans, tags[-1].end() if tags else 0


def parse_chain(text: str) -> Chain:
    """Parse a teacher or student answer into a `Chain`, or say precisely why it is malformed."""
    if not text or not text.strip():
        raise ChainFormatError(RejectReason.EMPTY_RESPONSE, "the answer is empty")
    if len(_TAG.findall(text)) == 2 * len(STAGES) and (match := _WELL_FORMED.search(text)):
        bodies = [body.strip() for body in match.groups()]
        if all(bodies):
            _check_end(text, match.end())
            return Chain(*bodies)
    spans, end = _spans(text)
    order = [span.stage for span in spans]
    duplicated = sorted({stage for stage in order if order.count(stage) > 1}, key=STAGES.index)
    if duplicated:
        verb = "appears" if len(duplicated) == 1 else "appear"
        raise ChainFormatError(
            RejectReason.DUPLICATE_STAGE, f"{', '.join(duplicated)} {verb} more than once"
        )
    if "CONCLUSION" not in order:
        raise ChainFormatError(RejectReason.NO_CONCLUSION, "no <CONCLUSION>...</CONCLUSION> stage")
    missing = [stage for stage in STAGES if stage not in order]
    if missing:
        raise ChainFormatError(RejectReason.MISSING_STAGE, f"missing {', '.join(missing)}")
    if tuple(order) != STAGES:
        raise ChainFormatError(RejectReason.ORDER, f"stages appear as {' > '.join(order)}")
    empty = [span.stage for span in spans if not span.body]
    if empty:
        raise ChainFormatError(RejectReason.EMPTY_STAGE, f"{', '.join(empty)} is empty")
    _check_end(text, end)
    return Chain(*(span.body for span in spans))

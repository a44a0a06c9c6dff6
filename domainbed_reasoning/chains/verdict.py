"""The label-consistency filter: keep a chain only if it is well formed and concludes the label.

The builder judges every teacher candidate with `judge`, and SARR judges the
student's own chains with the same function, so "accepted" means one thing
across the whole pipeline. The label is used only here, after generation; it
never reaches a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from domainbed_reasoning.chains.chain_format import (
    Chain,
    ChainFormatError,
    RejectReason,
    parse_chain,
)
from domainbed_reasoning.chains.matching import ClassMatcher, MatchError
from domainbed_reasoning.errors import UserError


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: RejectReason | None
    chain: Chain | None
    predicted: str | None
    detail: str

    @classmethod
    def rejected(
        cls,
        reason: RejectReason,
        detail: str,
        chain: Chain | None = None,
        predicted: str | None = None,
    ) -> Verdict:
        """A rejection; also how callers record failures judge never sees, such as request_error."""
        return cls(False, reason, chain, predicted, detail)


def judge(
    text: str | None, matcher: ClassMatcher, label: str, finish_reason: str | None = None
) -> Verdict:
    """Decide whether one generated answer is kept for an image whose true class is `label`."""
    if label not in matcher.classes:
        raise UserError(
            f"label {label!r} is not one of the dataset's classes: check the image's class folder"
        )
    if not text or not text.strip():
        return Verdict.rejected(RejectReason.EMPTY_RESPONSE, "the answer is empty")
    if finish_reason == "length":
        return Verdict.rejected(
            RejectReason.TRUNCATED, "generation hit the token limit (finish_reason 'length')"
        )
    try:
        chain = parse_chain(text)
    except ChainFormatError as err:
        return Verdict.rejected(err.reason, err.detail)
    try:
        predicted = matcher.match(chain.conclusion)
    except MatchError as err:
        return Verdict.rejected(err.reason, err.detail, chain)
    if predicted != label:
        return Verdict.rejected(
            RejectReason.WRONG_CLASS,
            f"concluded {predicted!r}, label is {label!r}",
            chain,
            predicted,
        )
    return Verdict(True, None, chain, predicted, f"concluded {predicted!r}")

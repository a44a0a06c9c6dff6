"""The label-consistency filter: keep a chain only if it is well formed and concludes the label.

The builder judges every teacher candidate with `judge`, and SARR judges the
student's own chains with the same function, so "accepted" means one thing
across the whole pipeline. The label is used only here, after generation; it
never reaches a prompt. Every verdict names the rule that decided it (rules.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from domainbed_reasoning.chains.chain_format import Chain, ChainFormatError, parse_chain
from domainbed_reasoning.chains.lexicon import LEXICON_FILE
from domainbed_reasoning.chains.matching import ClassMatcher
from domainbed_reasoning.chains.rules import ReadBy, RejectReason
from domainbed_reasoning.errors import UserError

# What the judge's behaviour is made of: a change to any of these may change a verdict.
JUDGE_FILES = (
    "chain_format.py",
    "lexicon.py",
    "matching.py",
    "rules.py",
    "verdict.py",
    LEXICON_FILE,
)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: RejectReason | None
    chain: Chain | None
    predicted: str | None
    detail: str
    read_by: ReadBy | None = None  # how the conclusion's class was read, when one was

    @classmethod
    def rejected(
        cls,
        reason: RejectReason,
        detail: str,
        chain: Chain | None = None,
        predicted: str | None = None,
        read_by: ReadBy | None = None,
    ) -> Verdict:
        """A rejection; also how callers record failures judge never sees, such as request_error."""
        return cls(False, reason, chain, predicted, detail, read_by)

    @property
    def rule(self) -> ReadBy | RejectReason | None:
        """The rule that decided: the rejecting one, or for an acceptance the one that read the class."""
        return self.reason if self.reason is not None else self.read_by


@cache
def judge_version() -> str:
    """A content hash of the judge's sources and word tables, recorded with every build's stats so
    verdicts stored by another judge are noticed (`dbr build-chains --rejudge` re-reads them)."""
    digest = hashlib.sha256()
    for name in JUDGE_FILES:
        digest.update(resources.files(__package__).joinpath(name).read_bytes())
    return digest.hexdigest()[:12]


def judge(
    text: str | None, matcher: ClassMatcher, label: str, finish_reason: str | None = None
) -> Verdict:
    """Decide whether one generated answer is kept for an image whose true class is `label`."""
    if label not in matcher.class_set:
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
    reading = matcher.read(chain.conclusion)
    if reading.class_name is None:
        return Verdict.rejected(RejectReason(reading.rule), reading.detail, chain)
    read_by = ReadBy(reading.rule)
    if reading.class_name != label:
        return Verdict.rejected(
            RejectReason.WRONG_CLASS,
            f"concluded {reading.class_name!r}, label is {label!r}",
            chain,
            reading.class_name,
            read_by,
        )
    return Verdict(True, None, chain, reading.class_name, f"concluded {label!r}", read_by)

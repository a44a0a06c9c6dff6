"""Every rule the judge decides by, named once, with the line a report or `dbr judge` prints for it.

A rejected candidate stores the rule that rejected it (the `reason` column of the
candidate shards, SARR's self-label table), so these names are a file format: a rule
may be added, never renamed.
"""

from __future__ import annotations

from enum import StrEnum


class RejectReason(StrEnum):
    """Why a generated answer was not kept: the rule that rejected it."""

    EMPTY_RESPONSE = "empty_response"
    TRUNCATED = "truncated"
    MISSING_STAGE = "missing_stage"
    ORDER = "order"
    EMPTY_STAGE = "empty_stage"
    DUPLICATE_STAGE = "duplicate_stage"
    NO_CONCLUSION = "no_conclusion"
    UNCLOSED_TAG = "unclosed_tag"
    TRAILING_TEXT = "trailing_text"
    UNCERTAIN = "uncertain"
    NEGATED = "negated"
    MODIFIER = "modifier"
    NO_CLASS = "no_class"
    AMBIGUOUS = "ambiguous"
    WRONG_CLASS = "wrong_class"
    REQUEST_ERROR = "request_error"


class ReadBy(StrEnum):
    """How the class of a conclusion was read (accepted and wrong_class answers)."""

    EXACT = "exact"
    ANSWER_PHRASE = "answer_phrase"
    ONE_CLASS = "one_class"


RULES: dict[str, str] = {
    RejectReason.EMPTY_RESPONSE: "the answer is None, empty or only whitespace",
    RejectReason.TRUNCATED: "generation stopped at the token limit (finish_reason 'length')",
    RejectReason.MISSING_STAGE: "a stage other than CONCLUSION never appears",
    RejectReason.ORDER: "all five stages appear, but not in SUMMARY..CONCLUSION order",
    RejectReason.EMPTY_STAGE: "a stage's tags enclose only whitespace",
    RejectReason.DUPLICATE_STAGE: "a stage appears more than once",
    RejectReason.NO_CONCLUSION: "the CONCLUSION tag is missing or never closed",
    RejectReason.UNCLOSED_TAG: "another stage's tag is left open, or closed but never opened",
    RejectReason.TRAILING_TEXT: "words follow </CONCLUSION>: the chain goes on after its end",
    RejectReason.UNCERTAIN: "the conclusion hedges (maybe, might, cannot tell whether, ?...)",
    RejectReason.NEGATED: "every class the conclusion names is denied (not, no, rather than...)",
    RejectReason.MODIFIER: "every class word modifies another noun or names a medium (a fish tank)",
    RejectReason.NO_CLASS: "the conclusion names none of the dataset's classes",
    RejectReason.AMBIGUOUS: "the conclusion names several classes and no answer phrase picks one",
    RejectReason.WRONG_CLASS: "the conclusion names one class, not the (withheld) label",
    RejectReason.REQUEST_ERROR: "the request itself failed after the client's retries",
    ReadBy.EXACT: "the whole conclusion is one class name (or a synonym)",
    ReadBy.ANSWER_PHRASE: "the class after an answer phrase ('The answer is X', 'Answer: X')",
    ReadBy.ONE_CLASS: "the one class the conclusion names, once modifiers and denials are set aside",
}

"""Which class a conclusion names: the label-consistency half of rejection sampling.

Matching runs on every candidate of every image, so a `ClassMatcher` indexes a
class list once and each `match` is a normalise plus a few dictionary look-ups.

The rule, in order:
1. The whole conclusion, normalised, is one class name -> that class.
2. Otherwise every class named by whole words anywhere in the conclusion is
   collected; a match lying inside a longer match is dropped, so "desk lamp"
   names Desk_Lamp and not a lamp, "hot dog" is not a dog and "paint can" is
   not a can. Words are also matched when written together or apart
   ("toothbrush" / "tooth brush", "flip-flops" / "flipflops").
3. Exactly one class left -> that class; none -> no_class; several -> ambiguous.
   "It is a dog, not a cat" is ambiguous on purpose: negation is not parsed, and
   the teacher is asked for the class name alone, so rejecting such an answer
   costs one candidate, while guessing would put a wrong label in the dataset.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.errors import UserError

_ARTICLES = frozenset({"a", "an", "the"})
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`\u00b4]")
_NON_WORD = re.compile(r"[^0-9a-z]+")
# Plurals no suffix rule gets right; the -oes entries are nouns whose singular ends in -o.
_IRREGULAR = {
    "people": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
    "geese": "goose",
    "teeth": "tooth",
    "feet": "foot",
    "knives": "knife",
    "leaves": "leaf",
    "wolves": "wolf",
    "shelves": "shelf",
    "scarves": "scarf",
    "axes": "axe",
    "potatoes": "potato",
    "tomatoes": "tomato",
    "mosquitoes": "mosquito",
    "tornadoes": "tornado",
    "volcanoes": "volcano",
}
_ES_PLURALS = ("sses", "xes", "ches", "shes", "zzes")
_NOT_PLURAL = ("ss", "us", "is")
# Spans up to this many words past a class's own length, so split compounds ("post it notes") match.
_EXTRA_WORDS = 2
MEMO_LIMIT = 65_536


class MatchError(ValueError):
    """The conclusion names no class or several; `reason` is no_class or ambiguous."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _singular(word: str) -> str:
    """Map singular and plural to one key; both sides go through it, so the key need not be English."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 3 and word.endswith("s") and not word.endswith(_NOT_PLURAL):
        word = word[:-2] if word.endswith(_ES_PLURALS) else word[:-1]
    if len(word) >= 4 and word.endswith("ie"):
        word = word[:-2] + "y"
    return word


def _words(text: str) -> list[str]:
    folded = unicodedata.normalize("NFKC", text).casefold()
    words = [_singular(word) for word in _NON_WORD.sub(" ", _APOSTROPHES.sub("", folded)).split()]
    while words and words[0] in _ARTICLES:
        words.pop(0)
    return words


def normalise(text: str) -> str:
    """Fold case, separators (`_`, `-`, spaces), punctuation, quotes, leading articles and plurals."""
    return " ".join(_words(text))


class ClassMatcher:
    """A class list indexed for matching; build once per dataset, call `match` per candidate."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = tuple(classes)
        self._by_key: dict[str, str] = {}  # words run together, so "tooth brush" finds ToothBrush
        self._max_words = 0
        self._memo: dict[str, str] = {}
        for name in self.classes:
            words = _words(name)
            if not words:
                raise UserError(f"class name {name!r} has no letters or digits: rename its folder")
            other = self._by_key.setdefault("".join(words), name)
            if other != name:
                raise UserError(
                    f"classes {other!r} and {name!r} read the same once normalised: rename one folder"
                )
            self._max_words = max(self._max_words, len(words) + _EXTRA_WORDS)

    def match(self, conclusion: str) -> str:
        """Return the one class `conclusion` names, or raise `MatchError`.

        A teacher concludes with the same few strings over and over, so a successful match is
        remembered by its exact text (up to MEMO_LIMIT of them) and costs one look-up next time.
        """
        if (known := self._memo.get(conclusion)) is not None:
            return known
        name = self._match(conclusion)
        if len(self._memo) < MEMO_LIMIT:
            self._memo[conclusion] = name
        return name

    def _match(self, conclusion: str) -> str:
        words = _words(conclusion)
        if exact := self._by_key.get("".join(words)):
            return exact
        found = self._mentions(words)
        names = sorted({name for _, _, name in found}, key=self.classes.index)
        quoted = repr(conclusion.strip()[:80])
        if not names:
            raise MatchError(RejectReason.NO_CLASS, f"{quoted} names none of the classes")
        if len(names) > 1:
            raise MatchError(RejectReason.AMBIGUOUS, f"{quoted} names {', '.join(names)}")
        return names[0]

    def _mentions(self, words: list[str]) -> list[tuple[int, int, str]]:
        """Every (start, end, class) word span naming a class, minus spans inside a longer one."""
        spans = [
            (start, end, name)
            for start in range(len(words))
            for end in range(start + 1, min(len(words), start + self._max_words) + 1)
            if (name := self._by_key.get("".join(words[start:end])))
        ]
        return [
            (start, end, name)
            for start, end, name in spans
            if not any(s <= start and end <= e and (s, e) != (start, end) for s, e, _ in spans)
        ]


@lru_cache(maxsize=32)
def matcher_for(classes: tuple[str, ...]) -> ClassMatcher:
    return ClassMatcher(classes)


def match_class(conclusion: str, classes: Sequence[str]) -> str:
    """One-off convenience over `ClassMatcher`; the index is cached per class list."""
    return matcher_for(tuple(classes)).match(conclusion)

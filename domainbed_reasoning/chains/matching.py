"""Which class a conclusion names, read as a careful reader would: the label half of the judge.

Matching runs on every candidate of every image, so a `ClassMatcher` indexes a class
list once (class names, their synonyms, and the compounds that hide class words) and
remembers each conclusion's reading by its text.

The rules, in order; the first that decides is recorded with the reading:
1. uncertain: a hedge anywhere ("maybe", "cannot tell whether", a question mark)
   rejects the conclusion: it does not commit to a class.
2. exact: the whole conclusion is one class name or synonym -> that class.
3. answer_phrase: after the last answer phrase ("The answer is", "Answer:", "the
   category"), the class named in the rest of its clause is the answer, whatever
   else the conclusion mentions.
4. one_class: otherwise every class named by whole words is collected (word runs
   written together or apart: "tooth brush" / "toothbrush"; a name inside a longer
   name is not a mention: "hot dog" is no dog), and a mention is set aside when
   - negated: a denial opens its clause before it ("not a dog", "a cat rather than a dog");
   - modifier: it modifies the noun after it ("a fish tank", "a computer mouse" is a
     mouse, "a pencil sketch of a house"), lies inside a compound that names
     something else ("a line drawing"), or names a picture's medium ("drawn in pencil");
   - a class word that is also a verb is followed by a determiner ("it matches the
     ...", "I saw a ..."): it is the verb, no class.
   One class left -> that class; several -> ambiguous; none -> the rule that set the
   last mention aside (negated, modifier), or no_class when nothing was mentioned.
The word lists each rule uses are the tables of lexicon.yaml.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from domainbed_reasoning.chains.lexicon import (
    ARTICLES,
    MARK,
    Lexicon,
    Tokens,
    content_words,
    lexicon,
    tokenise,
    words,
)
from domainbed_reasoning.chains.rules import ReadBy, RejectReason
from domainbed_reasoning.errors import UserError

# Spans up to this many words past a name's own length, so split compounds ("post it notes") match.
_EXTRA_WORDS = 2
MEMO_LIMIT = 65_536
COMPOUND = ""  # the index value of a compound that names no class


class MatchError(ValueError):
    """The conclusion names no class, or not one clearly; `reason` is the rule that decided."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Reading:
    """What a conclusion names: `class_name` and the ReadBy rule, or None and the RejectReason."""

    class_name: str | None
    rule: ReadBy | RejectReason
    detail: str


@dataclass(frozen=True, slots=True)
class Mention:
    start: int
    end: int
    name: str


@dataclass(frozen=True, slots=True)
class SetAside:
    """A mention a rule does not count, and why."""

    reason: RejectReason
    detail: str


def synonym_index(classes: Sequence[str], table: Lexicon) -> dict[str, str]:
    """Synonym key -> class, for every group of lexicon.yaml that names exactly one of `classes`."""
    by_key = {"".join(words(name)): name for name in classes}
    index: dict[str, str] = {}
    for group in table.synonyms:
        keys = ["".join(words(word)) for word in group]
        named = {by_key[key] for key in keys if key in by_key}
        if len(named) == 1:
            (name,) = named
            index |= {key: name for key in keys if key not in by_key}
    return index


class ClassMatcher:
    """A class list indexed for reading; build once per dataset, call `read` or `match` per candidate."""

    def __init__(self, classes: Sequence[str]) -> None:
        self.classes = tuple(classes)
        self.class_set = frozenset(self.classes)
        self._position = {name: index for index, name in enumerate(self.classes)}
        self.lexicon = lexicon()
        self._index: dict[str, str] = {}  # words run together, so "tooth brush" finds ToothBrush
        self._memo: dict[str, Reading] = {}
        for name in self.classes:
            keys = words(name)
            if not keys:
                raise UserError(f"class name {name!r} has no letters or digits: rename its folder")
            other = self._index.setdefault("".join(keys), name)
            if other != name:
                raise UserError(
                    f"classes {other!r} and {name!r} read the same once normalised: rename one folder"
                )
        self.synonyms = synonym_index(self.classes, self.lexicon)
        self._index |= self.synonyms
        for compound in self.lexicon.compounds:
            self._index.setdefault("".join(words(compound)), COMPOUND)
        named = (*self.classes, *self.lexicon.compounds, *sum(self.lexicon.synonyms, ()))
        self._max_words = max(len(words(text)) for text in named) + _EXTRA_WORDS
        # Every leading part of an indexed key: a span stops growing as soon as it is none.
        self._prefixes = {key[:end] for key in self._index for end in range(1, len(key) + 1)}

    def read(self, conclusion: str) -> Reading:
        """The reading of `conclusion`, remembered by its exact text (up to MEMO_LIMIT of them):
        a teacher concludes with the same few strings over and over."""
        if (known := self._memo.get(conclusion)) is not None:
            return known
        reading = self._read(conclusion)
        if len(self._memo) < MEMO_LIMIT:
            self._memo[conclusion] = reading
        return reading

    def match(self, conclusion: str) -> str:
        """The one class `conclusion` names, or `MatchError` with the rule that rejected it."""
        reading = self.read(conclusion)
        if reading.class_name is None:
            raise MatchError(RejectReason(reading.rule), reading.detail)
        return reading.class_name

    def _read(self, conclusion: str) -> Reading:
        tokens = tokenise(conclusion)
        quoted = repr(conclusion.strip()[:80])
        if hedge := self._hedge(conclusion, tokens):
            return Reading(None, RejectReason.UNCERTAIN, f"{quoted} hedges ({hedge!r})")
        if name := self._index.get("".join(content_words(tokens))):
            return Reading(name, ReadBy.EXACT, f"{quoted} is {name!r}")
        if (scope := self._answer_scope(tokens)) is not None:
            reading = self._read_span(tokens, *scope, ReadBy.ANSWER_PHRASE)
            if reading is not None:
                return _quoted(reading, quoted)
        reading = self._read_span(tokens, 0, len(tokens.raw), ReadBy.ONE_CLASS)
        if reading is None:
            return Reading(None, RejectReason.NO_CLASS, f"{quoted} names none of the classes")
        return _quoted(reading, quoted)

    def _hedge(self, conclusion: str, tokens: Tokens) -> str | None:
        """Rule uncertain: the hedge phrase that makes the conclusion uncommitted, if any."""
        if "?" in conclusion:
            return "?"
        found = self.lexicon.hedges.search(tokens.text)
        return found.group() if found else None

    def _answer_scope(self, tokens: Tokens) -> tuple[int, int] | None:
        """Rule answer_phrase: the clause after the last answer phrase ("Answer: dog (...)")."""
        text = tokens.text
        ends = [found.end() for found in self.lexicon.answer_phrase.finditer(text)]
        if not ends:
            return None
        start = text.count(" ", 0, ends[-1]) + 1
        while start < len(tokens.raw) and tokens.raw[start] == MARK:
            start += 1
        end = next((i for i in range(start, len(tokens.raw)) if tokens.raw[i] == MARK), None)
        return start, len(tokens.raw) if end is None else end

    def _read_span(self, tokens: Tokens, lo: int, hi: int, read_by: ReadBy) -> Reading | None:
        """Read tokens[lo:hi]; None when no class word occurs there at all."""
        mentions, aside = self._mentions(tokens, lo, hi)
        if not mentions and not aside:
            return None
        negations = self._negations(tokens, lo, hi)
        kept = []
        for index, mention in enumerate(mentions):
            following = mentions[index + 1] if index + 1 < len(mentions) else None
            why = (
                _negated(tokens, mention, negations)
                or self._modifier(tokens, mention, following, hi)
                or self._medium(tokens, mention, lo)
                or self._verb(tokens, mention, hi)
            )
            if why is None:
                kept.append(mention)
            else:
                aside.append(why)
        names = sorted({mention.name for mention in kept}, key=self._position.__getitem__)
        if len(names) == 1:
            return Reading(names[0], read_by, f" names {names[0]!r}")
        if names:
            return Reading(None, RejectReason.AMBIGUOUS, f" names {', '.join(names)}")
        last = aside[-1]
        return Reading(None, last.reason, f": {last.detail}")

    def _mentions(self, tokens: Tokens, lo: int, hi: int) -> tuple[list[Mention], list[SetAside]]:
        """Every class named in tokens[lo:hi], in text order, minus names inside a longer name; a
        class word inside a compound that names something else is set aside as a modifier."""
        keys = tokens.keys
        spans = []
        prefixes = self._prefixes
        for start in range(lo, hi):
            if keys[start] not in prefixes:
                continue
            joined = ""
            for end in range(start + 1, min(hi, start + self._max_words) + 1):
                joined += keys[end - 1]
                if joined not in prefixes:
                    break
                if (name := self._index.get(joined)) is not None:
                    spans.append(Mention(start, end, name))
        mentions, aside = [], []
        for span in spans:
            outer = next(
                (
                    other
                    for other in spans
                    if other.start <= span.start and span.end <= other.end and other != span
                ),
                None,
            )
            if outer is None and span.name != COMPOUND:
                mentions.append(span)
            elif outer is not None and outer.name == COMPOUND and span.name != COMPOUND:
                compound = " ".join(tokens.raw[outer.start : outer.end])
                word = " ".join(tokens.raw[span.start : span.end])
                aside.append(SetAside(RejectReason.MODIFIER, f"{word!r} is part of {compound!r}"))
        return mentions, aside

    def _negations(self, tokens: Tokens, lo: int, hi: int) -> list[str | None]:
        """Rule negated: for each token, the denial whose scope it lies in (None outside any)."""
        cues, ends = self.lexicon.negation_cues, self.lexicon.scope_ends
        raw = tokens.raw
        scope: list[str | None] = [None] * len(raw)
        if cues.keys().isdisjoint(raw[lo:hi]):
            return scope
        active: str | None = None
        index = lo
        while index < hi:
            scope[index] = active
            word = raw[index]
            cue = next(
                (cue for cue in cues.get(word, ()) if raw[index : index + len(cue)] == cue), None
            )
            if cue is not None:
                active = " ".join(cue)
                index += len(cue)
                continue
            if word == MARK or word in ends:
                active = None
            index += 1
        return scope

    def _modifier(
        self, tokens: Tokens, mention: Mention, following: Mention | None, hi: int
    ) -> SetAside | None:
        """Rule modifier: the mention is the first noun of a compound whose head comes next."""
        after = mention.end
        if after >= hi or tokens.keys[after] == MARK:
            return None
        word = " ".join(tokens.raw[mention.start : mention.end])
        if following is not None and following.start == after:
            head = " ".join(tokens.raw[following.start : following.end])
            return SetAside(RejectReason.MODIFIER, f"{word!r} modifies {head!r}")
        head = tokens.keys[after]
        if head in self.lexicon.modifier_heads:
            return SetAside(RejectReason.MODIFIER, f"{word!r} modifies {tokens.raw[after]!r}")
        if head in self.lexicon.depictions and after + 1 < hi and tokens.raw[after + 1] == "of":
            return SetAside(
                RejectReason.MODIFIER, f"{word!r} is the medium of a {tokens.raw[after]} of ..."
            )
        return None

    def _medium(self, tokens: Tokens, mention: Mention, lo: int) -> SetAside | None:
        """Rule modifier, too: right after "drawn in", "sketched with (a)" a class word is the medium."""
        before = mention.start
        if before > lo and tokens.raw[before - 1] in ARTICLES:
            before -= 1
        if before == lo or tokens.raw[before - 1] not in self.lexicon.medium_cue_ends:
            return None
        for cue in self.lexicon.medium_cues:
            if before - len(cue) >= lo and tokens.raw[before - len(cue) : before] == cue:
                word = " ".join(tokens.raw[mention.start : mention.end])
                return SetAside(
                    RejectReason.MODIFIER, f"{word!r} is the medium ({' '.join(cue)!r})"
                )
        return None

    def _verb(self, tokens: Tokens, mention: Mention, hi: int) -> SetAside | None:
        """A class word that is also a verb, right before a determiner, is a verb ("it matches the ...",
        "I saw a ...")."""
        after = mention.end
        verb = mention.end - mention.start == 1 and tokens.keys[mention.start] in self.lexicon.verbs
        if verb and after < hi and tokens.raw[after] in self.lexicon.determiners:
            word = " ".join(tokens.raw[mention.start : mention.end])
            return SetAside(
                RejectReason.NO_CLASS, f"{word!r} is a verb before {tokens.raw[after]!r}"
            )
        return None


def _negated(tokens: Tokens, mention: Mention, negations: list[str | None]) -> SetAside | None:
    cue = negations[mention.start]
    if cue is None:
        return None
    word = " ".join(tokens.raw[mention.start : mention.end])
    return SetAside(RejectReason.NEGATED, f"{word!r} is denied by {cue!r}")


def _quoted(reading: Reading, quoted: str) -> Reading:
    return Reading(reading.class_name, reading.rule, quoted + reading.detail)


@lru_cache(maxsize=32)
def matcher_for(classes: tuple[str, ...]) -> ClassMatcher:
    return ClassMatcher(classes)


def match_class(conclusion: str, classes: Sequence[str]) -> str:
    """One-off convenience over `ClassMatcher`; the index is cached per class list."""
    return matcher_for(tuple(classes)).match(conclusion)

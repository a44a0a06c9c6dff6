"""The judge's word knowledge (lexicon.yaml) and the one normalisation both sides of a match use.

Class names, synonyms and conclusions all go through `tokenise`, so a table entry,
a folder name and a teacher's wording meet in one form: case, quotes, hyphens and
plurals folded, punctuation kept only as one clause mark (the rules need to know
where a clause ends).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

LEXICON_FILE = "lexicon.yaml"
MARK = ","  # the token every clause-ending punctuation becomes
ARTICLES = frozenset({"a", "an", "the"})
KEYS_LIMIT = 200_000  # words remembered with their key (some tens of MB at most)

_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`\u00b4]")
# A dash between spaces ends a clause ("Elephant - the trunk ..."); one inside a word joins it.
_SPACED_DASH = re.compile(r"\s-+\s")
_TOKEN = re.compile(r"[0-9a-z]+|[.!?,;:()\[\]{}/&+|\n\u2013\u2014]")
_ES_PLURALS = ("sses", "xes", "ches", "shes", "zzes")
_NOT_PLURAL = ("ss", "us", "is")


@dataclass(frozen=True)
class Singular:
    """Map singular and plural to one key; both sides go through it, so the key need not be English."""

    irregular: dict[str, str]
    pluralia: frozenset[str]

    def __call__(self, word: str) -> str:
        if word in self.irregular:
            return self.irregular[word]
        if word in self.pluralia:
            return word
        if len(word) > 3 and word.endswith("s") and not word.endswith(_NOT_PLURAL):
            word = word[:-2] if word.endswith(_ES_PLURALS) else word[:-1]
        if len(word) >= 4 and word.endswith("ie"):
            word = word[:-2] + "y"
        return word


class Keys(dict[str, str]):
    """Word -> key, filled as words are met: a teacher's vocabulary is small and repeats."""

    def __init__(self, singular: Singular) -> None:
        super().__init__({MARK: MARK})
        self.singular = singular

    def add(self, word: str) -> str:
        key = self.singular(word)
        if len(self) < KEYS_LIMIT:
            self[word] = key
        return key


@dataclass(frozen=True)
class Lexicon:
    """lexicon.yaml, with every word list in the form the rules compare against."""

    singular: Singular
    keys: Keys
    synonyms: tuple[tuple[str, ...], ...]
    compounds: tuple[str, ...]
    modifier_heads: frozenset[str]
    depictions: frozenset[str]
    medium_cues: tuple[tuple[str, ...], ...]
    medium_cue_ends: frozenset[str]  # last words of the medium cues, to skip most mentions fast
    negation_cues: dict[str, tuple[tuple[str, ...], ...]]  # first word -> whole cues, longest first
    scope_ends: frozenset[str]
    hedges: re.Pattern[str]
    answer_phrase: re.Pattern[str]
    verbs: frozenset[str]
    determiners: frozenset[str]


def _phrases(words: list[str]) -> re.Pattern[str]:
    """Any of `words` (single words or phrases) as whole words of a tokenised text."""
    alternatives = sorted((re.escape(word) for word in words), key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b")


def texts(table: dict, key: str) -> list[str]:
    """A word list of lexicon.yaml; an unquoted `no` would silently become False, so refuse it."""
    entries = table[key]
    flat = [word for entry in entries for word in (entry if isinstance(entry, list) else [entry])]
    if bad := [word for word in flat if not isinstance(word, str)]:
        raise ValueError(f"{LEXICON_FILE}: {key} has entries that are not text {bad}: quote them")
    return entries


def _cues(phrases: list[str]) -> dict[str, tuple[tuple[str, ...], ...]]:
    cues: dict[str, list[tuple[str, ...]]] = {}
    for phrase in sorted(phrases, key=lambda text: -len(text.split())):
        cues.setdefault(phrase.split()[0], []).append(tuple(phrase.split()))
    return {first: tuple(found) for first, found in cues.items()}


@cache
def lexicon() -> Lexicon:
    table = yaml.safe_load(resources.files(__package__).joinpath(LEXICON_FILE).read_text())
    singular = Singular(
        {str(k): str(v) for k, v in table["irregular_plurals"].items()},
        frozenset(texts(table, "pluralia_tantum")),
    )
    return Lexicon(
        singular=singular,
        keys=Keys(singular),
        synonyms=tuple(tuple(group) for group in texts(table, "synonyms")),
        compounds=tuple(texts(table, "compounds")),
        modifier_heads=frozenset(singular(word) for word in texts(table, "modifier_heads")),
        depictions=frozenset(singular(word) for word in texts(table, "depictions")),
        medium_cues=tuple(tuple(cue.split()) for cue in texts(table, "medium_cues")),
        medium_cue_ends=frozenset(cue.split()[-1] for cue in texts(table, "medium_cues")),
        negation_cues=_cues(texts(table, "negation_cues")),
        scope_ends=frozenset(texts(table, "scope_ends")),
        hedges=_phrases(texts(table, "hedges")),
        answer_phrase=re.compile("|".join(f"(?:{p})" for p in texts(table, "answer_phrases"))),
        verbs=frozenset(singular(word) for word in texts(table, "verbs")),
        determiners=frozenset(texts(table, "determiners")),
    )


@dataclass(frozen=True, slots=True)
class Tokens:
    """A text as lower-case words and clause MARKs; `keys` are the words singularised."""

    raw: tuple[str, ...]
    keys: tuple[str, ...]

    @property
    def text(self) -> str:
        """The raw tokens joined by single spaces: what hedges and answer phrases are matched in."""
        return " ".join(self.raw)


def tokenise(text: str) -> Tokens:
    folded = text.lower() if text.isascii() else unicodedata.normalize("NFKC", text).casefold()
    folded = _SPACED_DASH.sub(" ; ", _APOSTROPHES.sub("", folded))
    raw = tuple(token if token.isalnum() else MARK for token in _TOKEN.findall(folded))
    keys = lexicon().keys
    known = tuple(map(keys.get, raw))
    if None in known:
        known = tuple(key or keys.add(token) for token, key in zip(raw, known, strict=True))
    return Tokens(raw, known)


def content_words(tokens: Tokens) -> list[str]:
    """The keys without marks or leading articles: the form a class name is indexed by."""
    keys = [key for key in tokens.keys if key != MARK]
    while keys and keys[0] in ARTICLES:
        keys.pop(0)
    return keys


def words(text: str) -> list[str]:
    return content_words(tokenise(text))


def normalise(text: str) -> str:
    """Fold case, separators (`_`, `-`, spaces), punctuation, quotes, leading articles and plurals."""
    return " ".join(words(text))

"""Prompt templates, shipped as plain files in the `prompts` package and versioned by content.

Every stored chain records the version of the prompt that produced it, so a
changed template can never be silently mixed with chains from the old one. The
templates take only the candidate class names: the label has no field to go in.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import err_console

PROMPT_PACKAGE = "domainbed_reasoning.prompts"


def humanise(class_name: str) -> str:
    """`Alarm_Clock` -> `alarm clock`: the form a model reads naturally; acronyms such as TV stay."""
    words = class_name.replace("_", " ").split()
    return " ".join(word if word.isupper() and len(word) > 1 else word.lower() for word in words)


def class_list(classes: Sequence[str]) -> str:
    """The `{classes}` field: every candidate class, humanised, in registry order."""
    return ", ".join(humanise(name) for name in classes)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str
    version: str

    @classmethod
    def from_text(cls, name: str, text: str) -> PromptTemplate:
        return cls(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest()[:12])

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(field for _, field, _, _ in string.Formatter().parse(self.text) if field)

    def render(self, **values: str) -> str:
        """Fill the template; a missing or unexpected field is an error, never a silent blank."""
        missing = sorted(self.fields - values.keys())
        if missing:
            raise UserError(
                f"prompt {self.name!r} needs the field(s) {', '.join(missing)}: pass them to render()"
            )
        unknown = sorted(values.keys() - self.fields)
        if unknown:
            raise UserError(
                f"prompt {self.name!r} has no field(s) {', '.join(unknown)}: "
                f"it takes only {', '.join(sorted(self.fields)) or 'no fields'}"
            )
        return self.text.format(**values)


def available_prompts() -> list[str]:
    return sorted(
        entry.name.removesuffix(".txt")
        for entry in resources.files(PROMPT_PACKAGE).iterdir()
        if entry.name.endswith(".txt")
    )


def load_prompt(name: str) -> PromptTemplate:
    names = available_prompts()
    if name not in names:
        raise UserError(f"unknown prompt {name!r}: choose one of {', '.join(names)}")
    text = resources.files(PROMPT_PACKAGE).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return PromptTemplate.from_text(name, text)


def print_prompt(name: str, classes: Sequence[str]) -> None:
    """`dbr prompt`: the prompt exactly as the model receives it; its version goes to stderr."""
    template = load_prompt(name)
    err_console.print(f"prompt [bold]{template.name}[/] version {template.version}", highlight=False)
    print(template.render(classes=class_list(classes)))

"""`dbr judge`: the builder's verdict on one text, with the rule that decided it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from domainbed_reasoning.chains.probe import as_chain, judgement
from domainbed_reasoning.chains.rules import ReadBy, RejectReason
from domainbed_reasoning.chains.verdict import judge_version
from domainbed_reasoning.data.registry import get_spec

DBR = [sys.executable, "-m", "domainbed_reasoning", "judge"]
CHAIN = (
    "<SUMMARY>plan</SUMMARY><CAPTION>a grey animal</CAPTION><REASONING>trunk</REASONING>"
    "<REFLECTION>not a horse</REFLECTION><CONCLUSION>elephant</CONCLUSION>"
)


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*DBR, *args], input=stdin, check=False, capture_output=True, text=True)


def test_a_conclusion_is_read_with_its_class_and_rule() -> None:
    done = run("--dataset", "OfficeHome", "a computer mouse")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == [
        "verdict  read",
        "class    Mouse",
        (
            "rule     one_class: the one class the conclusion names, once modifiers and denials are"
            " set aside"
        ),
    ]
    assert lines[4] == f"judge    {judge_version()}"


def test_with_a_label_it_prints_the_builders_verdict() -> None:
    done = run("--dataset", "PACS", "--label", "dog", "It is not a dog.")
    assert done.stdout.splitlines()[:3] == [
        "verdict  rejected",
        "class    -",
        "rule     negated: every class the conclusion names is denied (not, no, rather than...)",
    ]
    assert "'dog' is denied by 'not'" in done.stdout


def test_a_whole_answer_on_stdin_is_judged_as_the_builder_would() -> None:
    done = run("--dataset", "PACS", "-", stdin=CHAIN + "\nOr maybe a horse.")
    assert done.stdout.splitlines()[2].startswith("rule     trailing_text: ")
    assert "'Or maybe a horse.' follows </CONCLUSION>" in done.stdout


def test_a_label_outside_the_dataset_is_one_line_naming_the_classes() -> None:
    done = run("--dataset", "PACS", "--label", "cat", "a cat")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        (
            "error: --label 'cat' is not a class of this dataset: choose one of dog, elephant,"
            " giraffe, guitar, horse, house, person"
        )
    ]


@pytest.mark.parametrize(
    ("text", "label", "kept", "rule", "class_name"),
    [
        ("elephant", None, True, ReadBy.EXACT, "elephant"),
        (CHAIN, "elephant", True, ReadBy.EXACT, "elephant"),
        (CHAIN, "horse", False, RejectReason.WRONG_CLASS, "elephant"),
        ("Answer: a guitar", "guitar", True, ReadBy.ANSWER_PHRASE, "guitar"),
        ("maybe a dog", None, False, RejectReason.UNCERTAIN, None),
        ("", None, False, RejectReason.EMPTY_STAGE, None),
    ],
)
def test_judgement(
    text: str, label: str | None, kept: bool, rule: ReadBy | RejectReason, class_name: str | None
) -> None:
    result = judgement(get_spec("PACS").classes, text, label)
    assert (result.kept, result.rule, result.class_name) == (kept, rule, class_name)


def test_a_bare_conclusion_becomes_the_conclusion_of_a_whole_chain() -> None:
    assert as_chain(CHAIN) == CHAIN
    assert as_chain("a dog").endswith("<CONCLUSION>a dog</CONCLUSION>")

import hashlib
import re
import subprocess
import sys
from importlib import resources

import pytest

from domainbed_reasoning.chains.chain_format import STAGES
from domainbed_reasoning.chains.prompt_templates import (
    PromptTemplate,
    available_prompts,
    class_list,
    humanise,
    load_prompt,
)
from domainbed_reasoning.data.registry import SPECS, get_spec
from domainbed_reasoning.errors import UserError


def test_shipped_prompts() -> None:
    assert available_prompts() == ["classify", "reason", "teacher"]


@pytest.mark.parametrize("name", ["teacher", "classify", "reason"])
def test_version_is_the_content_hash_and_stable(name: str) -> None:
    raw = resources.files("domainbed_reasoning.prompts").joinpath(f"{name}.txt").read_bytes()
    prompt = load_prompt(name)
    assert prompt.version == hashlib.sha256(raw).hexdigest()[:12]
    assert re.fullmatch(r"[0-9a-f]{12}", prompt.version)
    assert load_prompt(name) == prompt
    assert prompt.fields == {"classes"}


def test_version_changes_when_text_changes() -> None:
    prompt = load_prompt("teacher")
    assert PromptTemplate.from_text("teacher", prompt.text).version == prompt.version
    assert PromptTemplate.from_text("teacher", prompt.text + " ").version != prompt.version


def test_versions_differ_between_prompts() -> None:
    assert len({load_prompt(name).version for name in available_prompts()}) == 3


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_teacher_prompt_lists_every_class(spec) -> None:
    rendered = load_prompt("teacher").render(classes=class_list(spec.classes))
    listed = rendered.split("\n")[1].split(", ")
    assert listed == [humanise(name) for name in spec.classes]


def test_teacher_prompt_never_takes_a_label() -> None:
    with pytest.raises(
        UserError, match="prompt 'teacher' has no field.s. label: it takes only classes"
    ):
        load_prompt("teacher").render(classes="dog, horse", label="dog")


def test_templates_name_no_domain() -> None:
    domains = {domain.replace("_", " ").lower() for spec in SPECS for domain in spec.domains}
    for name in available_prompts():
        text = load_prompt(name).text.lower()
        assert not [domain for domain in domains if re.search(rf"\b{re.escape(domain)}\b", text)], (
            name
        )


@pytest.mark.parametrize("name", ["teacher", "reason"])
def test_reasoning_prompts_ask_for_the_five_stages_in_order(name: str) -> None:
    text = load_prompt(name).text
    positions = [text.index(f"<{stage}>") for stage in STAGES]
    assert positions == sorted(positions)
    assert "category name only" in text or "Exactly one category name" in text


def test_classify_prompt_asks_for_the_bare_class_name() -> None:
    text = load_prompt("classify").render(classes=class_list(get_spec("PACS").classes))
    assert "dog, elephant, giraffe, guitar, horse, house, person" in text
    assert "category name only" in text
    assert "<" not in text


def test_missing_field_is_a_user_error() -> None:
    with pytest.raises(
        UserError, match="prompt 'reason' needs the field.s. classes: pass them to render"
    ):
        load_prompt("reason").render()


def test_unknown_prompt_is_a_user_error() -> None:
    with pytest.raises(
        UserError, match="unknown prompt 'teachr': choose one of classify, reason, teacher"
    ):
        load_prompt("teachr")


@pytest.mark.parametrize(
    ("name", "human"),
    [
        ("Alarm_Clock", "alarm clock"),
        ("The_Eiffel_Tower", "the eiffel tower"),
        ("TV", "TV"),
        ("ToothBrush", "toothbrush"),
        ("t-shirt", "t-shirt"),
        ("dog", "dog"),
    ],
)
def test_humanise(name: str, human: str) -> None:
    assert humanise(name) == human


def test_cli_prints_the_rendered_prompt_and_its_version() -> None:
    cmd = [sys.executable, "-m", "domainbed_reasoning", "prompt"]
    done = subprocess.run(
        [*cmd, "classify", "--dataset", "vlcs"], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout
        == load_prompt("classify").render(classes="bird, car, chair, dog, person") + "\n"
    )
    assert f"version {load_prompt('classify').version}" in done.stderr
    bad = subprocess.run([*cmd, "teachr"], check=False, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "unknown prompt 'teachr'" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1

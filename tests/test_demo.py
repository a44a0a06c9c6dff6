"""The demo's pipeline at reduced size, end to end, so `make demo` cannot rot."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import polars as pl
import pytest
import torch
from rich.console import Console
from transformers import AutoProcessor
from typer.testing import CliRunner

from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.cli import app
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.demo import (
    LEARNS,
    METHODS,
    SMALL,
    DemoConfig,
    results_table,
    run_demo,
)
from domainbed_reasoning.offline.demo_clock import Reference, estimate, machine

ROW_LABELS = ("CLS only", "Reasoning only", "MTCT", "RD-MLDG")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("demo")
    console = Console(record=True, width=200)
    config = DemoConfig(root / "data", root / "runs", SMALL)
    terminal = io.StringIO()  # what the libraries and the stages' bars write outside the demo's console
    with redirect_stdout(terminal), redirect_stderr(terminal):
        result = run_demo(config, console)
    return config, result, console.export_text(), terminal.getvalue()


def test_teacher_errors_are_visibly_rejected(demo_run) -> None:
    config, result, printed, _ = demo_run
    reasons = result.build_stats["reasons"]
    rejected = {reason for reason in reasons if reason != "accepted"}
    assert {"wrong_class", "empty_response"} <= rejected
    assert result.build_stats["images"]["accepted"] > 0
    assert "rejected: wrong_class" in printed
    assert (config.chains_root / "SynthDG" / "chains.parquet").is_file()


def test_load_dataset_saw_every_domain(demo_run) -> None:
    config, result, _, _ = demo_run
    assert set(result.splits) == {"cartoon", "painting", "photo", "sketch"}
    images = 5 * 4 * config.size.images_per_class  # classes x domains: every image, chain or not
    assert sum(result.splits.values()) == images
    assert (config.export_dir / "README.md").is_file()


def test_every_method_trained_and_evaluated(demo_run) -> None:
    _, result, printed, _ = demo_run
    assert set(result.runs) == set(METHODS)
    for method, run_dir in result.runs.items():
        assert (run_dir / "model" / "model.safetensors").is_file(), method  # full fine-tuning
        assert (run_dir / "eval" / "metrics.json").is_file(), method
    sarr = result.runs["rd-mldg"] / "round-1"
    assert (sarr / "self_labels.parquet").is_file()
    assert json.loads((sarr / "self_label_stats.json").read_text())["round"] == 1
    assert str(result.runs["rd-mldg"] / "model") in printed


def test_report_has_the_four_rows(demo_run) -> None:
    _, result, printed, _ = demo_run
    table = result.report.markdown.read_text()
    main_table = table.split("\n## ")[0]
    for label in ROW_LABELS:
        assert f"| {label} (" in main_table, label
    assert result.report.plot.stat().st_size > 0
    assert json.loads(result.report.data.read_text())
    assert "step 14/14: report" in printed
    assert all(seconds >= 0 for seconds in result.seconds.values())


def test_training_shows_one_bar_per_stage_and_logs_to_the_run_folder(demo_run) -> None:
    _, result, _, terminal = demo_run
    assert "train cartoon/mtct" in terminal and "train rd-mldg/round-1" in terminal
    noise = ("'train_runtime'", "'eval_loss'", "'loss'", "Loading weights", "Casting the dataset")
    for raw in noise:
        assert raw not in terminal, f"{raw} reached the terminal"
    for run_dir in result.runs.values():
        assert list(run_dir.rglob("logs/events.out.tfevents.*")), run_dir


def test_the_final_table_fits_an_80_column_terminal(demo_run) -> None:
    config, _, _, _ = demo_run
    narrow = Console(record=True, width=80)
    narrow.print(results_table(config))
    lines = narrow.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == 6, "one line per method and mode: no row wraps"
    assert sum("RD-MLDG" in row for row in rows) == 2


def test_rerun_resumes_instead_of_retraining(demo_run) -> None:
    config, result, _, _ = demo_run
    weights = result.runs["cls"] / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = run_demo(config, Console(record=True, width=200))
    assert weights.stat().st_mtime_ns == before
    assert again.report.markdown.read_text() == result.report.markdown.read_text()


def test_a_second_run_elsewhere_reproduces_the_chains_and_the_table(
    demo_run, tmp_path: Path
) -> None:
    """The teacher's faults and wordings do not depend on the order requests arrive in."""
    config, result, _, _ = demo_run
    again = DemoConfig(tmp_path / "data", tmp_path / "runs", SMALL)
    rerun = run_demo(again, Console(record=True, width=200))

    def chains(root: Path) -> pl.DataFrame:
        return pl.read_parquet(root / "SynthDG" / "chains.parquet").drop("path").sort("id")

    assert chains(again.chains_root).equals(chains(config.chains_root))
    assert rerun.report.markdown.read_text() == result.report.markdown.read_text()


def chain_lengths(config: DemoConfig, model: Path) -> tuple[list[int], bool]:
    """Tokens per accepted chain under the demo model's tokenizer, and whether each decodes back exactly."""
    tokenizer = AutoProcessor.from_pretrained(model).tokenizer
    chains = pl.read_parquet(config.chains_root / "SynthDG" / "chains.parquet")["chain"]
    encoded = [tokenizer.encode(chain, add_special_tokens=False) for chain in chains]
    lossless = all(tokenizer.decode(ids) == chain for ids, chain in zip(encoded, chains))
    return [len(ids) for ids in encoded], lossless


def test_the_demo_tokenizer_makes_the_prompts_short_and_loses_no_text(demo_run) -> None:
    """Merges across words: a fixed prompt is a token or two, and every chain decodes back exactly."""
    config, result, _, _ = demo_run
    tokenizer = AutoProcessor.from_pretrained(result.model).tokenizer
    classes = class_list(get_spec("SynthDG").classes)
    for name in ("classify", "reason"):
        prompt = load_prompt(name).render(classes=classes)
        assert len(tokenizer.encode(prompt, add_special_tokens=False)) <= 2, name
    assert chain_lengths(config, result.model)[1]


def test_the_expected_duration_is_the_reference_scaled_by_the_calibration() -> None:
    reference = Reference(machine="the reference", calibration_s=2.0, demo_s=600.0)
    expected = estimate(300.0, reference)
    assert expected.calibration_s > 0
    assert expected.expected_s == pytest.approx(300.0 * expected.calibration_s / 2.0)
    assert str(torch.backends.cpu.get_cpu_capability()) in machine()


@pytest.mark.slow
def test_the_reduced_demo_learns(tmp_path: Path) -> None:
    """Not only runs: on the held-out style it beats chance (20%, 5 classes) by a wide margin."""
    config = DemoConfig(tmp_path / "data", tmp_path / "runs", LEARNS)
    result = run_demo(config, Console(record=True, width=200))
    assert set(result.runs) == {"cls"}
    metrics = json.loads((result.runs["cls"] / "eval" / "metrics.json").read_text())
    held_out = metrics["results"]["test"]["direct"]
    assert held_out["n"] == 5 * LEARNS.images_per_class  # every image of the held-out domain
    assert held_out["accuracy"] >= 0.4, held_out
    # With a few hundred chains to learn merges from (the small demo has too few), every chain
    # fits the tokens self-labelling and evaluation may generate.
    lengths, lossless = chain_lengths(config, result.model)
    assert lossless and max(lengths) <= LEARNS.chain_tokens


def test_unknown_target_is_one_clear_line(tmp_path: Path) -> None:
    config = DemoConfig(tmp_path / "data", tmp_path / "runs", SMALL, target="clipart")
    with pytest.raises(UserError, match="unknown held-out domain 'clipart': choose one of cartoon"):
        run_demo(config, Console(record=True))
    assert not (tmp_path / "runs").exists()


def test_cli_demo_reports_a_bad_target(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--data-dir",
            str(tmp_path / "d"),
            "--runs",
            str(tmp_path / "r"),
            "--small",
            "--target",
            "x",
        ],
    )
    assert isinstance(result.exception, UserError)
    assert "unknown held-out domain 'x'" in str(result.exception)

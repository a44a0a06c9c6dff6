"""`dbr report` from fixture metrics files: the paper-format table, per-domain tables, the paper's
numbers beside ours, the JSON numbers, a real PNG, and the errors for folders it cannot report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from domainbed_reasoning.train.evaluation.paper_results import PAPER_ROWS, paper_rows_for
from domainbed_reasoning.train.evaluation.report import build_rows, collect, figure, write_report
from matplotlib.container import BarContainer
from PIL import Image
from typer.testing import CliRunner

from domainbed_reasoning.cli import app
from domainbed_reasoning.errors import UserError


def scores(accuracy: float, n: int = 100, unparseable: int = 0) -> dict:
    """The part of evaluate.score's output the report reads (plus what it ignores, as real files hold)."""
    return {
        "n": n,
        "correct": round(accuracy * n),
        "accuracy": accuracy,
        "unparseable": unparseable,
    }


def write_eval(
    runs: Path,
    dataset: str,
    target: str,
    method: str,
    model: str,
    test: dict[str, float],
    validation: dict[str, float] | None = None,
    name: str | None = None,
    seed: int | None = None,
    finetune: str = "lora",
    images: dict[str, int] | None = None,
) -> Path:
    """A run folder as `dbr train` (seeded: under seed-<s>/, as a sweep lays it out) + `dbr eval` leave it."""
    if method == "zeroshot":
        folder = runs / dataset / target / f"zeroshot-{name}"
    else:
        folder = (runs / f"seed-{seed}" if seed is not None else runs) / dataset / target / method
    path = folder / "eval" / "metrics.json"
    path.parent.mkdir(parents=True)
    counts = images or {}
    results = {
        "test": {
            mode: scores(value, counts.get("test_images", 100)) for mode, value in test.items()
        }
    }
    if validation:
        n = counts.get("validation_images", 100)
        results["validation"] = {mode: scores(value, n) for mode, value in validation.items()}
    evaluated = str(folder / "model") if finetune == "full" else model
    metrics = {
        "format": 1,
        "dataset": dataset,
        "target": target,
        "method": method,
        "name": name or method,
        "model": evaluated,
        "results": results,
    }
    path.write_text(json.dumps(metrics))
    (folder / "run.json").write_text(
        json.dumps({"dataset": dataset, "target": target, "model": model} | counts)
    )
    if seed is not None:
        (folder / "config.yaml").write_text(
            yaml.safe_dump({"method": method, "seed": seed, "finetune": finetune})
        )
    return path


QWEN = "/models/tiny-qwen2vl"
LLAVA = "/models/tiny-llava"
INTERN = "OpenGVLab/InternVL3-8B-hf"
SYNTH_IMAGES = {
    "test_images": 10,
    "validation_images": 6,
    "train_images": 24,
    "train_images_with_chain": 20,
}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    # MTCT on a tiny Qwen2-VL: two trials on all four SynthDG domains; direct mode in seed 0 only
    reasoning = {
        0: {"cartoon": 0.80, "painting": 0.60, "photo": 0.90, "sketch": 0.50},  # mean 70
        1: {"cartoon": 0.70, "painting": 0.60, "photo": 0.80, "sketch": 0.50},  # mean 65
    }
    direct = {"cartoon": 0.70, "painting": 0.50, "photo": 0.90, "sketch": 0.40}
    for seed, by_domain in reasoning.items():
        for domain, value in by_domain.items():
            test = {"reasoning": value} | ({"direct": direct[domain]} if seed == 0 else {})
            write_eval(
                root,
                "SynthDG",
                domain,
                "mtct",
                QWEN,
                test,
                {"reasoning": 0.95},
                seed=seed,
                images=SYNTH_IMAGES,
            )
    # CLS only: three of SynthDG's four domains, one trial
    for domain, value in {"cartoon": 0.70, "painting": 0.40, "photo": 0.85}.items():
        write_eval(root, "SynthDG", domain, "cls", QWEN, {"direct": value}, seed=0)
    # RD-MLDG on InternVL3-8B for two OfficeHome domains (the paper reports this backbone)
    write_eval(
        root, "OfficeHome", "Art", "rd-mldg", INTERN, {"reasoning": 0.90, "direct": 0.88}, seed=0
    )
    write_eval(root, "OfficeHome", "Real_World", "rd-mldg", INTERN, {"reasoning": 0.94}, seed=0)
    # zero-shot GPT-4o on one PACS domain
    write_eval(
        root,
        "PACS",
        "sketch",
        "zeroshot",
        "gpt-4o",
        {"direct": 0.95, "reasoning": 0.90},
        name="gpt-4o",
    )
    return root


def test_main_table_has_the_papers_shape(runs: Path, tmp_path: Path) -> None:
    report = write_report(runs, tmp_path / "report")
    text = report.markdown.read_text()
    assert text == report.text
    assert "| Method / model | Mode | PACS | OfficeHome | SynthDG | Avg |" in text
    # cells: mean ± standard error over trials (seeds), the trials counted; incomplete datasets say so
    assert (
        "| MTCT (tiny-qwen2vl) | reasoning | — | — | 67.50 ± 1.77 (2) | 67.50 (1/3 datasets) |"
        in text
    )
    assert "| MTCT (tiny-qwen2vl) | direct | — | — | 62.50 (1) | 62.50 (1/3 datasets) |" in text
    assert (
        "| CLS only (tiny-qwen2vl) | direct | — | — | 65.00 (1; 3/4 domains) | 65.00 (1/3 datasets) |"
        in text
    )
    assert "| RD-MLDG (InternVL3-8B-hf) | reasoning | — | 92.00 (1; 2/4 domains) | — |" in text
    assert "| RD-MLDG (InternVL3-8B-hf) | direct | — | 88.00 (1; 1/4 domains) | — |" in text
    assert "| zero-shot gpt-4o | direct | 95.00 (1; 1/4 domains) | — | — |" in text
    # rows in the paper's order (zero-shot, CLS, ..., RD-MLDG), each method's judged mode first
    order = [
        line.split(" | ")[0:2]
        for line in text.split("\n## ")[0].splitlines()
        if line.startswith("| ")
    ]
    assert order[1:] == [
        ["| zero-shot gpt-4o", "direct"],
        ["| zero-shot gpt-4o", "reasoning"],
        ["| CLS only (tiny-qwen2vl)", "direct"],
        ["| MTCT (tiny-qwen2vl)", "reasoning"],
        ["| MTCT (tiny-qwen2vl)", "direct"],
        ["| RD-MLDG (InternVL3-8B-hf)", "reasoning"],
        ["| RD-MLDG (InternVL3-8B-hf)", "direct"],
    ]


def test_trials_are_mean_and_standard_error_as_domainbed_prints_them(
    runs: Path, tmp_path: Path
) -> None:
    """DomainBed: mean and np.std(x) / sqrt(n) (population std) over trials; a dataset's trial is the
    mean over its held-out domains; the two seeds here average 70 and 65."""
    text = write_report(runs, tmp_path / "report").text
    assert (
        "| Method / model | Mode | cartoon | painting | photo | sketch | Avg | Val. (train domains) |"
        in text
    )
    assert (
        "| MTCT (tiny-qwen2vl) | reasoning | 75.00 ± 3.54 (2) | 60.00 ± 0.00 (2) | 85.00 ± 3.54 (2) "
        "| 50.00 ± 0.00 (2) | 67.50 ± 1.77 (2) | 95.00 |"
    ) in text
    assert (
        "| CLS only (tiny-qwen2vl) | direct | 70.00 (1) | 40.00 (1) | 85.00 (1) | — | 65.00 (1; 3/4 domains) | — |"
        in text
    )
    domains = {
        name: 100 * value
        for name, value in zip(("cartoon", "painting", "photo", "sketch"), (0.8, 0.6, 0.9, 0.5))
    }
    per_seed = [sum(domains.values()) / 4, 65.0]
    expected_se = np.std(per_seed) / np.sqrt(2)
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    synth = next(
        row
        for row in data["rows"]
        if row["label"] == "MTCT (tiny-qwen2vl)" and row["mode"] == "reasoning"
    )
    cell = synth["datasets"]["SynthDG"]
    assert (cell["accuracy"], cell["se"], cell["trials"]) == pytest.approx((67.5, expected_se, 2))
    assert cell["domains"]["cartoon"]["seeds"] == pytest.approx({"0": 80.0, "1": 70.0})


def test_a_dataset_cell_takes_the_seeds_that_ran_every_domain(runs: Path, tmp_path: Path) -> None:
    write_eval(
        runs, "SynthDG", "photo", "mtct", QWEN, {"reasoning": 0.10}, seed=7
    )  # a third seed, one domain
    write_eval(
        runs, "SynthDG", "sketch", "cls", QWEN, {"direct": 0.30}, seed=1
    )  # CLS: no seed ran every domain
    text = write_report(runs, tmp_path / "report").text
    assert (
        "| MTCT (tiny-qwen2vl) | reasoning | 75.00 ± 3.54 (2) | 60.00 ± 0.00 (2) | 60.00 ± 20.55 (3) |"
        in text
    )
    assert "| MTCT (tiny-qwen2vl) | reasoning | — | — | 67.50 ± 1.77 (2) |" in text
    # no trial to average over: the mean of the domains' own means, said as such
    assert "| CLS only (tiny-qwen2vl) | direct | — | — | 56.25 (seeds differ per domain) |" in text


def test_full_fine_tunes_are_one_row_named_after_their_backbone(runs: Path, tmp_path: Path) -> None:
    """A full fine-tune evaluates its own `model/` folder; the row is keyed and named on run.json's base model."""
    for domain, value in {"Caltech101": 0.6, "LabelMe": 0.8}.items():
        path = write_eval(
            runs, "VLCS", domain, "mtct", LLAVA, {"reasoning": value}, seed=0, finetune="full"
        )
        assert json.loads(path.read_text())["model"].endswith(f"{domain}/mtct/model")
    text = write_report(runs, tmp_path / "report").text
    assert "| MTCT (tiny-llava, full fine-tune) | reasoning | — | 70.00 (1; 2/4 domains) |" in text
    assert "(model)" not in text
    vlcs = text.split("## VLCS per held-out domain")[1].split("\n## ")[0]
    assert len([line for line in vlcs.splitlines() if line.startswith("| MTCT")]) == 1


def test_the_model_selection_rule_is_named_and_gets_its_own_row(runs: Path, tmp_path: Path) -> None:
    """Every trained run here tested its last weights (their metrics predate the rule: `last`); one
    VLCS run selected by training-domain validation is a row of its own, never mixed into `last`'s."""
    path = write_eval(runs, "VLCS", "LabelMe", "mtct", QWEN, {"reasoning": 0.6}, seed=0)
    metrics = json.loads(path.read_text())
    path.write_text(json.dumps(metrics | {"selection": {"rule": "training-domain", "selected": "checkpoint-2"}}))
    report = write_report(runs, tmp_path / "report")
    assert "Model selection: `last` (13 runs), `training-domain` (1 run)." in report.text
    assert "the paper's rule, the default" in report.text
    assert "| MTCT (tiny-qwen2vl, training-domain selection) | reasoning | — | 60.00 (1; 1/4 domains) |" in report.text
    data = json.loads(report.data.read_text())
    assert data["model_selection"] == ["last", "training-domain"]
    assert {ev["selection"] for ev in data["evaluations"] if ev["method"] != "zeroshot"} == {"last", "training-domain"}


def test_tables_1_and_2_in_the_papers_layout_with_its_numbers(runs: Path, tmp_path: Path) -> None:
    text = write_report(runs, tmp_path / "report").text
    table1 = text.split("## Table 1")[1].split("\n## ")[0]
    lines = [line for line in table1.splitlines() if line.startswith("| ")]
    assert (
        lines[0] == "| Method / model | Source | PACS | VLCS | OfficeHome | TerraIncognita | Avg |"
    )
    assert lines[1:] == [
        "| zero-shot gpt-4o | ours | 95.00 (1; 1/4 domains) | — | — | — | 95.00 (1/4 datasets) |",
        "| GPT-4o zero-shot | paper, Table 1 | 97.83 | 85.41 | 90.12 | 60.49 | 83.46 |",
        "| InternVL3-8B zero-shot | paper, Table 1 | 96.26 | 85.67 | 85.10 | 46.84 | 78.47 |",
        "| RD-MLDG (InternVL3-8B-hf) | ours | — | — | 92.00 (1; 2/4 domains) | — | 92.00 (1/4 datasets) |",
        "| RD-MLDG (InternVL3-8B) | paper, Table 1 | 98.13 | 87.03 | 91.73 | 70.65 | 86.89 |",
    ]
    table2 = text.split("## Table 2")[1].split("\n## ")[0]
    lines = [line for line in table2.splitlines() if line.startswith("| ")]
    assert lines[0] == "| Method / model | Source | OfficeHome | TerraIncognita | SynthDG |"
    assert [line.split(" | ")[:2] for line in lines[1:]] == [
        ["| CLS only (tiny-qwen2vl)", "ours"],
        ["| CLS only (InternVL3-8B)", "paper, Ablation"],
        ["| Reasoning only (InternVL3-8B)", "paper, Ablation"],
        ["| MTCT (tiny-qwen2vl)", "ours"],
        ["| +MTCT (InternVL3-8B)", "paper, Ablation"],
        ["| +SARR without MTCT (InternVL3-8B)", "paper, Ablation"],
        ["| RD-MLDG (InternVL3-8B-hf)", "ours"],
        ["| RD-MLDG (InternVL3-8B)", "paper, Table 1"],
    ]
    assert "| MTCT (tiny-qwen2vl) | ours | — | — | 67.50 ± 1.77 (2) |" in table2
    assert "| +MTCT (InternVL3-8B) | paper, Ablation | 90.58 | 67.19 | — |" in table2
    assert "| RD-MLDG (InternVL3-8B) | paper, Table 1 | 91.73 | 70.65 | — |" in table2


def test_images_per_held_out_domain(runs: Path, tmp_path: Path) -> None:
    """n scored per domain (metrics.json) beside the run's split sizes (run.json), each distinct value once."""
    text = write_report(runs, tmp_path / "report").text
    synth = text.split("Images per held-out domain (SynthDG):")[1].split("\n## ")[0]
    assert (
        "| Held-out domain | Test images (n) | Validation images | Training images | with a chain |"
        in synth
    )
    # the CLS runs hold no image counts in run.json and were scored on 100 images (write_eval's default n)
    assert "| cartoon | 10 / 100 | 6 | 24 | 20 |" in synth
    assert "| sketch | 10 | 6 | 24 | 20 |" in synth
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert data["images"]["SynthDG"]["sketch"] == {
        "test_images": [10], "validation_images": [6], "train_images": [24], "train_images_with_chain": [20],
    }  # fmt: skip
    assert data["images"]["PACS"] == {"sketch": {"test_images": [100]}}


def test_paper_numbers_beside_ours_for_the_same_backbone(runs: Path, tmp_path: Path) -> None:
    report = write_report(runs, tmp_path / "report")
    text = report.text
    assert (
        "| RD-MLDG (InternVL3-8B-hf) | reasoning | RD-MLDG (InternVL3-8B) (Table 1) | OfficeHome | 92.00 (1; 2/4 domains) | 91.73 | +0.27 |"
        in text
    )
    assert (
        "| zero-shot gpt-4o | direct | GPT-4o zero-shot (Table 1) | PACS | 95.00 (1; 1/4 domains) | 97.83 | -2.83 |"
        in text
    )
    # no paper row for a tiny Qwen2-VL, nothing for a dataset the paper row lacks (RD-MLDG's SynthDG)
    section = text.split("## Beside the paper")[1].split("## The paper's")[0]
    assert len([line for line in section.splitlines() if line.startswith("| ")]) == 1 + 2
    # the published table is always listed for reference
    assert "| InternVL3-8B zero-shot | Table 1 | 96.26 | 85.67 | 85.10 | 46.84 | 78.47 |" in text
    data = json.loads(report.data.read_text())
    assert data["unit"] == "percent"
    assert [(c["ours"], c["dataset"], c["paper_accuracy"]) for c in data["comparisons"]] == [
        ("zero-shot gpt-4o", "PACS", 97.83),
        ("RD-MLDG (InternVL3-8B-hf)", "OfficeHome", 91.73),
    ]
    assert data["comparisons"][1]["delta"] == pytest.approx(0.27)
    assert len(data["paper"]) == len(PAPER_ROWS)


def test_json_holds_every_number(runs: Path, tmp_path: Path) -> None:
    data = json.loads(write_report(runs, tmp_path / "report").data.read_text())
    rows = {(row["label"], row["mode"]): row for row in data["rows"]}
    mtct = rows[("MTCT (tiny-qwen2vl)", "reasoning")]
    synth = mtct["datasets"]["SynthDG"]
    assert synth["accuracy"] == pytest.approx(67.5) and mtct["average"] == pytest.approx(67.5)
    assert {domain: cell["accuracy"] for domain, cell in synth["domains"].items()} == pytest.approx(
        {"cartoon": 75.0, "painting": 60.0, "photo": 85.0, "sketch": 50.0}
    )
    assert (synth["held_out"], synth["of"], synth["chance"]) == (4, 4, pytest.approx(20.0))
    assert synth["validation"] == pytest.approx(95.0)
    cls = rows[("CLS only (tiny-qwen2vl)", "direct")]["datasets"]["SynthDG"]
    assert (cls["held_out"], cls["of"], cls["trials"]) == (3, 4, 1) and cls[
        "accuracy"
    ] == pytest.approx(65.0)
    evaluations = data["evaluations"]
    assert len(evaluations) == 8 + 3 + 2 + 1
    assert {ev["seed"] for ev in evaluations if ev["method"] == "mtct"} == {0, 1}
    assert [ev["seed"] for ev in evaluations if ev["method"] == "zeroshot"] == [None]


def test_plot_is_a_real_png(runs: Path, tmp_path: Path) -> None:
    report = write_report(runs, tmp_path / "report")
    assert report.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(report.plot) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300


def test_plot_has_error_bars_chance_and_backbones(runs: Path) -> None:
    axes = figure(build_rows(collect(runs))).axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == [
        "chance",
        "zero-shot gpt-4o [direct]",
        "CLS only (tiny-qwen2vl) [direct]",
        "MTCT (tiny-qwen2vl) [reasoning]",
        "RD-MLDG (InternVL3-8B-hf) [reasoning]",
    ]
    bars = [container for container in axes.containers if isinstance(container, BarContainer)]
    mtct = bars[2]
    heights = [patch.get_height() for patch in mtct.patches]  # PACS, OfficeHome, SynthDG, Avg
    assert np.isnan(heights[:2]).all() and heights[2:] == pytest.approx([67.5, 67.5])
    # the SynthDG bar's error bar spans mean ± standard error (1.77)
    segments = mtct.errorbar.lines[2][0].get_segments()
    assert segments[2][:, 1] == pytest.approx([67.5 - 2.5 / np.sqrt(2), 67.5 + 2.5 / np.sqrt(2)])
    chance = next(
        collection for collection in axes.collections if collection.get_label() == "chance"
    )
    levels = [segment[0][1] for segment in chance.get_segments()]
    # PACS 7 classes, OfficeHome 65, SynthDG 5, then their mean over the average group
    assert levels == pytest.approx([100 / 7, 100 / 65, 20.0, (100 / 7 + 100 / 65 + 20.0) / 3])


def test_paper_rows_match_backbones_by_model_id() -> None:
    assert [row.label for row in paper_rows_for("zeroshot", "/ckpt/OpenGVLab/InternVL3-8B-hf")] == [
        "InternVL3-8B zero-shot"
    ]
    assert [row.label for row in paper_rows_for("cls", "internvl3-8b")] == [
        "CLS only (InternVL3-8B)"
    ]
    assert paper_rows_for("mtct", "OpenGVLab/InternVL3-2B-hf") == []
    table1 = [row for row in PAPER_ROWS if row.source == "Table 1"]
    for row in table1:  # the published averages are the means of the published cells
        assert row.average == pytest.approx(sum(row.accuracy.values()) / 4, abs=0.01)


def test_empty_or_missing_runs_folder_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(
            UserError,
            match=f"no evaluations \\(eval/metrics.json\\) under {folder}: train and evaluate first",
        ):
            write_report(folder, tmp_path / "report")
    assert not (tmp_path / "report").exists()
    result = CliRunner().invoke(
        app, ["report", str(tmp_path / "empty"), "--out", str(tmp_path / "report")]
    )
    assert isinstance(result.exception, UserError)


def test_metrics_of_another_version_or_broken_are_refused(runs: Path, tmp_path: Path) -> None:
    path = write_eval(runs, "VLCS", "SUN09", "mtct", QWEN, {"reasoning": 0.5})
    path.write_text(json.dumps(json.loads(path.read_text()) | {"format": 0}))
    with pytest.raises(
        UserError,
        match="was written by another version of dbr \\(format 0, expected 1\\): re-run `dbr eval --force`",
    ):
        write_report(runs, tmp_path / "report")
    path.write_text("{")
    with pytest.raises(
        UserError, match="metrics.json is not valid JSON: re-run `dbr eval --force`"
    ):
        write_report(runs, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_the_same_cell_from_two_runs_is_refused(runs: Path, tmp_path: Path) -> None:
    write_eval(runs / "copy", "SynthDG", "sketch", "mtct", QWEN, {"reasoning": 0.1}, seed=1)
    with pytest.raises(
        UserError,
        match="both evaluate MTCT \\(tiny-qwen2vl\\) on SynthDG/sketch with seed 1: report one runs folder",
    ):
        write_report(runs, tmp_path / "report")


def test_cli_writes_the_three_files(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", str(runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in out.iterdir()) == [
        "results.json",
        "results.md",
        "results.png",
    ]
    assert "RD-MLDG (InternVL3-8B-hf)" in result.output

"""`dbr report` from fixture metrics files: the paper-format table, per-domain tables, the paper's
numbers beside ours, the JSON numbers, a real PNG, and the errors for folders it cannot report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from domainbed_reasoning.cli import app
from domainbed_reasoning.errors import UserError
from train.evaluation.paper_results import PAPER_ROWS, paper_rows_for
from train.evaluation.report import write_report


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
) -> Path:
    folder = f"zeroshot-{name}" if method == "zeroshot" else method
    path = runs / dataset / target / folder / "eval" / "metrics.json"
    path.parent.mkdir(parents=True)
    results = {"test": {mode: scores(value) for mode, value in test.items()}}
    if validation:
        results["validation"] = {mode: scores(value) for mode, value in validation.items()}
    metrics = {
        "format": 1,
        "dataset": dataset,
        "target": target,
        "method": method,
        "name": name or method,
        "model": model,
        "results": results,
    }
    path.write_text(json.dumps(metrics))
    return path


QWEN = "/models/tiny-qwen2vl"
INTERN = "OpenGVLab/InternVL3-8B-hf"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    # MTCT on a tiny Qwen2-VL: all four SynthDG domains, both modes
    for domain, (reasoning, direct) in {
        "cartoon": (0.80, 0.70),
        "painting": (0.60, 0.50),
        "photo": (0.90, 0.90),
        "sketch": (0.50, 0.40),
    }.items():
        write_eval(
            root,
            "SynthDG",
            domain,
            "mtct",
            QWEN,
            {"direct": direct, "reasoning": reasoning},
            {"reasoning": 0.95},
        )
    # CLS only: three of SynthDG's four domains
    for domain, direct in {"cartoon": 0.70, "painting": 0.40, "photo": 0.85}.items():
        write_eval(root, "SynthDG", domain, "cls", QWEN, {"direct": direct})
    # RD-MLDG on InternVL3-8B for two OfficeHome domains (the paper reports this backbone)
    write_eval(root, "OfficeHome", "Art", "rd-mldg", INTERN, {"reasoning": 0.90, "direct": 0.88})
    write_eval(root, "OfficeHome", "Real_World", "rd-mldg", INTERN, {"reasoning": 0.94})
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
    # cells: mean over held-out domains, incomplete datasets say how many domains; Avg over the row's datasets
    assert "| MTCT (tiny-qwen2vl) | reasoning | — | — | 70.00 | 70.00 (1/3 datasets) |" in text
    assert "| MTCT (tiny-qwen2vl) | direct | — | — | 62.50 | 62.50 (1/3 datasets) |" in text
    assert (
        "| CLS only (tiny-qwen2vl) | direct | — | — | 65.00 (3/4 domains) | 65.00 (1/3 datasets) |"
        in text
    )
    assert "| RD-MLDG (InternVL3-8B-hf) | reasoning | — | 92.00 (2/4 domains) | — |" in text
    assert "| RD-MLDG (InternVL3-8B-hf) | direct | — | 88.00 (1/4 domains) | — |" in text
    assert "| zero-shot gpt-4o | direct | 95.00 (1/4 domains) | — | — |" in text
    # rows in the paper's order (zero-shot, CLS, ..., RD-MLDG), each method's judged mode first
    order = [line.split(" | ")[0:2] for line in text.splitlines() if line.startswith("| ")][1:7]
    assert order == [
        ["| zero-shot gpt-4o", "direct"],
        ["| zero-shot gpt-4o", "reasoning"],
        ["| CLS only (tiny-qwen2vl)", "direct"],
        ["| MTCT (tiny-qwen2vl)", "reasoning"],
        ["| MTCT (tiny-qwen2vl)", "direct"],
        ["| RD-MLDG (InternVL3-8B-hf)", "reasoning"],
    ]


def test_per_domain_tables(runs: Path, tmp_path: Path) -> None:
    text = write_report(runs, tmp_path / "report").text
    assert "## SynthDG per held-out domain" in text and "## OfficeHome per held-out domain" in text
    assert (
        "| Method / model | Mode | cartoon | painting | photo | sketch | Avg | Val. (train domains) |"
        in text
    )
    assert (
        "| MTCT (tiny-qwen2vl) | reasoning | 80.00 | 60.00 | 90.00 | 50.00 | 70.00 | 95.00 |"
        in text
    )
    assert "| CLS only (tiny-qwen2vl) | direct | 70.00 | 40.00 | 85.00 | — | 65.00 | — |" in text
    # "Real_World" (the split name a user may pass) is reported as the domain "Real World"
    assert "| Method / model | Mode | Art | Clipart | Product | Real World | Avg |" in text
    assert "| RD-MLDG (InternVL3-8B-hf) | reasoning | 90.00 | — | — | 94.00 | 92.00 | — |" in text


def test_paper_numbers_beside_ours_for_the_same_backbone(runs: Path, tmp_path: Path) -> None:
    report = write_report(runs, tmp_path / "report")
    text = report.text
    assert (
        "| RD-MLDG (InternVL3-8B-hf) | reasoning | RD-MLDG (InternVL3-8B) (Table 1) | OfficeHome | 92.00 (2/4 domains) | 91.73 | +0.27 |"
        in text
    )
    assert (
        "| zero-shot gpt-4o | direct | GPT-4o zero-shot (Table 1) | PACS | 95.00 (1/4 domains) | 97.83 | -2.83 |"
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
    assert synth["accuracy"] == pytest.approx(70.0) and mtct["average"] == pytest.approx(70.0)
    assert synth["domains"] == pytest.approx(
        {"cartoon": 80.0, "painting": 60.0, "photo": 90.0, "sketch": 50.0}
    )
    assert (synth["held_out"], synth["of"]) == (4, 4)
    assert synth["validation"] == pytest.approx(
        {d: 95.0 for d in ("cartoon", "painting", "photo", "sketch")}
    )
    cls = rows[("CLS only (tiny-qwen2vl)", "direct")]["datasets"]["SynthDG"]
    assert (cls["held_out"], cls["of"]) == (3, 4) and cls["accuracy"] == pytest.approx(65.0)
    assert len(data["evaluations"]) == 10


def test_plot_is_a_real_png(runs: Path, tmp_path: Path) -> None:
    report = write_report(runs, tmp_path / "report")
    assert report.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(report.plot) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 300


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
    write_eval(runs / "copy", "SynthDG", "sketch", "mtct", QWEN, {"reasoning": 0.1})
    with pytest.raises(
        UserError,
        match="both evaluate MTCT \\(tiny-qwen2vl\\) on SynthDG/sketch: report one runs folder",
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

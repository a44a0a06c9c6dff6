"""`dbr report`: every finished evaluation under a runs folder -> the paper's table, a plot, a JSON.

The table has the paper's shape (rows = methods/models, columns = datasets and
their average, each cell the mean test accuracy over held-out domains), so our
numbers read against the paper's at a glance; a dataset whose held-out domains
were not all run says so in its cell, because a 1-of-4 average is not the
paper's number. The report reads only `eval/metrics.json` files: it never loads
a model or a dataset, so it is cheap to re-run after every new evaluation.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean
from typing import Any

from matplotlib.figure import Figure

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.data.registry import REGISTRY, get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console
from train.evaluation.evaluate import EVAL_FORMAT, MODES, ZEROSHOT, zeroshot_name
from train.evaluation.paper_results import PAPER_ROWS, PaperRow, paper_rows_for

METHOD_LABELS = {
    "cls": "CLS only",
    "reasoning": "Reasoning only",
    "mtct": "MTCT",
    "rd-mldg": "RD-MLDG",
}
ROW_ORDER = (ZEROSHOT, "cls", "reasoning", "mtct", "rd-mldg")
# The mode a method is judged by: the question it was trained to answer (zero-shot models are asked directly).
PRIMARY_MODE = {"cls": "direct", ZEROSHOT: "direct"}


@dataclass(frozen=True)
class Evaluation:
    """One eval/metrics.json: test (and validation) accuracy per mode for one held-out domain."""

    path: Path
    dataset: str
    domain: str
    method: str
    model: str
    name: str
    accuracy: dict[str, dict[str, float]]  # split -> mode -> accuracy in percent
    unparseable: dict[str, dict[str, int]]  # split -> mode -> count


@dataclass(frozen=True)
class Row:
    """One line of the table: a method on a backbone (or a model as is), read in one mode."""

    label: str
    method: str
    model: str
    mode: str
    test: dict[str, dict[str, float]]  # dataset -> held-out domain -> accuracy (%)
    validation: dict[str, dict[str, float]]

    def dataset_accuracy(self, dataset: str) -> float | None:
        domains = self.test.get(dataset)
        return mean(domains.values()) if domains else None

    def average(self) -> float | None:
        values = [self.dataset_accuracy(name) for name in self.test]
        return mean(values) if values else None


@dataclass(frozen=True)
class Report:
    markdown: Path
    plot: Path
    data: Path
    text: str


# --- collecting ---------------------------------------------------------------------------------


def collect(runs: Path) -> list[Evaluation]:
    runs = Path(runs)
    paths = sorted(runs.rglob("eval/metrics.json")) if runs.is_dir() else []
    if not paths:
        raise UserError(
            f"no evaluations (eval/metrics.json) under {runs}: train and evaluate first - "
            "`dbr train ...` then `dbr eval --run RUN_DIR`, or `dbr eval --model ...` for a zero-shot row"
        )
    return [read_evaluation(path) for path in paths]


def read_evaluation(path: Path) -> Evaluation:
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON: re-run `dbr eval --force` on its run") from None
    if not isinstance(metrics, dict) or metrics.get("format") != EVAL_FORMAT:
        found = metrics.get("format") if isinstance(metrics, dict) else None
        raise UserError(
            f"{path} was written by another version of dbr (format {found}, expected {EVAL_FORMAT}): "
            "re-run `dbr eval --force` on its run"
        )
    spec = get_spec(metrics["dataset"])
    by_split = {split: name for name in spec.domains for split in (name, artefacts.split_name(name))}
    results = metrics["results"]
    return Evaluation(
        path=path,
        dataset=spec.name,
        domain=by_split.get(metrics["target"], metrics["target"]),
        method=metrics["method"],
        model=metrics["model"],
        name=metrics["name"],
        accuracy={
            split: {mode: 100.0 * scores["accuracy"] for mode, scores in modes.items()}
            for split, modes in results.items()
        },
        unparseable={
            split: {mode: scores["unparseable"] for mode, scores in modes.items()}
            for split, modes in results.items()
        },
    )


def row_label(method: str, model: str, name: str) -> str:
    if method == ZEROSHOT:
        return f"zero-shot {name}"
    return f"{METHOD_LABELS.get(method, method)} ({zeroshot_name(model)})"


def build_rows(evaluations: list[Evaluation]) -> list[Row]:
    """Group evaluations into rows; the same cell from two files is refused, not silently picked."""
    cells: dict[tuple[str, str, str, str], dict[str, dict[str, dict[str, float]]]] = defaultdict(
        lambda: {"test": defaultdict(dict), "validation": defaultdict(dict)}
    )
    seen: dict[tuple[str, str, str], Path] = {}
    for ev in evaluations:
        label = row_label(ev.method, ev.model, ev.name)
        cell = (label, ev.dataset, ev.domain)
        if cell in seen:
            raise UserError(
                f"{seen[cell]} and {ev.path} both evaluate {label} on {ev.dataset}/{ev.domain}: "
                "report one runs folder at a time, or move one run away"
            )
        seen[cell] = ev.path
        for split, modes in ev.accuracy.items():
            for mode, value in modes.items():
                cells[(label, ev.method, ev.model, mode)][split][ev.dataset][ev.domain] = value
    rows = [
        Row(
            label,
            method,
            model,
            mode,
            _sorted_domains(found["test"]),
            _sorted_domains(found["validation"]),
        )
        for (label, method, model, mode), found in cells.items()
        if found["test"]
    ]
    return sorted(rows, key=_row_order)


def _sorted_domains(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    order = list(REGISTRY)
    return {
        dataset: {d: table[dataset][d] for d in sorted(table[dataset], key=_domain_order(dataset))}
        for dataset in sorted(table, key=order.index)
    }


def _domain_order(dataset: str):
    domains = list(get_spec(dataset).domains)
    return lambda domain: domains.index(domain) if domain in domains else len(domains)


def _row_order(row: Row) -> tuple:
    method = ROW_ORDER.index(row.method) if row.method in ROW_ORDER else len(ROW_ORDER)
    primary = row.mode != PRIMARY_MODE.get(row.method, "reasoning")
    return (method, row.label, primary, list(MODES).index(row.mode))


INTRO = (
    "Test accuracy (%) on the held-out domain, leave-one-domain-out; a dataset cell is the mean over "
    "its held-out domains that were run, and says so when that is not all of them. Mode `reasoning`: "
    "reasoning prompt, the chain's conclusion is the answer; mode `direct`: classification prompt. "
    "Unparseable answers count as wrong. A method's first row is the mode it is judged by."
)


# --- rendering ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    rule = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            rule,
            *("| " + " | ".join(line) + " |" for line in lines),
        ]
    )


def _datasets(rows: list[Row]) -> list[str]:
    found = {dataset for row in rows for dataset in row.test}
    return [name for name in REGISTRY if name in found]


def dataset_cell(row: Row, dataset: str) -> str:
    domains = row.test.get(dataset)
    if not domains:
        return "—"
    return _pct(row.dataset_accuracy(dataset)) + _partial(len(domains), dataset)


def _partial(held_out: int, dataset: str) -> str:
    total = len(get_spec(dataset).domains)
    return f" ({held_out}/{total} domains)" if held_out < total else ""


def main_table(rows: list[Row]) -> str:
    datasets = _datasets(rows)
    lines = []
    for row in rows:
        missing = len(row.test) < len(datasets)
        average = _pct(row.average()) + (
            f" ({len(row.test)}/{len(datasets)} datasets)" if missing else ""
        )
        lines.append(
            [row.label, row.mode, *(dataset_cell(row, name) for name in datasets), average]
        )
    return _table(["Method / model", "Mode", *datasets, "Avg"], lines)


def domain_table(rows: list[Row], dataset: str) -> str:
    domains = list(get_spec(dataset).domains)
    lines = [
        [
            row.label,
            row.mode,
            *(_pct(row.test[dataset].get(d)) for d in domains),
            _pct(row.dataset_accuracy(dataset)),
            _pct(mean(row.validation[dataset].values()) if row.validation.get(dataset) else None),
        ]
        for row in rows
        if dataset in row.test
    ]
    return _table(["Method / model", "Mode", *domains, "Avg", "Val. (train domains)"], lines)


def comparisons(rows: list[Row]) -> list[dict[str, Any]]:
    """Our primary-mode rows beside the paper's rows of the same method and backbone."""
    found = []
    for row in rows:
        if row.mode != PRIMARY_MODE.get(row.method, "reasoning"):
            continue
        for paper in paper_rows_for(row.method, row.model):
            for dataset, published in paper.accuracy.items():
                ours = row.dataset_accuracy(dataset)
                if ours is None:
                    continue
                found.append(
                    {
                        "ours": row.label,
                        "mode": row.mode,
                        "paper": paper.label,
                        "source": paper.source,
                        "dataset": dataset,
                        "ours_accuracy": ours,
                        "ours_domains": len(row.test[dataset]),
                        "paper_accuracy": published,
                        "delta": ours - published,
                    }
                )
    return found


def comparison_table(found: list[dict[str, Any]]) -> str:
    lines = [
        [
            item["ours"],
            item["mode"],
            f"{item['paper']} ({item['source']})",
            item["dataset"],
            _pct(item["ours_accuracy"]) + _partial(item["ours_domains"], item["dataset"]),
            _pct(item["paper_accuracy"]),
            f"{item['delta']:+.2f}",
        ]
        for item in found
    ]
    return _table(["Ours", "Mode", "Paper row", "Dataset", "Ours", "Paper", "Δ"], lines)


def paper_table(paper_rows: tuple[PaperRow, ...]) -> str:
    datasets = ["PACS", "VLCS", "OfficeHome", "TerraIncognita"]
    lines = [
        [
            row.label,
            row.source,
            *(_pct(row.accuracy.get(name)) for name in datasets),
            _pct(row.average),
        ]
        for row in paper_rows
    ]
    return _table(["Paper row", "Source", *datasets, "Avg"], lines)


def render_markdown(rows: list[Row], found: list[dict[str, Any]]) -> str:
    parts = [
        "# Results",
        "",
        INTRO,
        "",
        main_table(rows),
    ]
    for dataset in _datasets(rows):
        parts += ["", f"## {dataset} per held-out domain", "", domain_table(rows, dataset)]
    parts += ["", "## Beside the paper", ""]
    if found:
        parts.append(comparison_table(found))
    else:
        backbones = sorted({row.backbone for row in PAPER_ROWS})
        parts.append(
            f"No run here used a backbone the paper reports ({', '.join(backbones)}) with the same method, "
            "so no number is compared directly."
        )
    parts += [
        "",
        "## The paper's published numbers (RD-MLDG, arXiv 2602.23777)",
        "",
        paper_table(PAPER_ROWS),
        "",
    ]
    return "\n".join(parts)


def plot(rows: list[Row], target: Path) -> Path:
    """Grouped bars: one group per dataset (and the average), one bar per method in its primary mode."""
    shown = [row for row in rows if row.mode == PRIMARY_MODE.get(row.method, "reasoning")]
    groups = [*_datasets(rows), "Avg"]
    figure = Figure(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(shown)) / 2), 4.5))
    axes = figure.subplots()
    width = 0.8 / max(1, len(shown))
    for index, row in enumerate(shown):
        values = [row.dataset_accuracy(name) if name != "Avg" else row.average() for name in groups]
        positions = [group + index * width - 0.4 + width / 2 for group in range(len(groups))]
        axes.bar(
            positions, [value or 0.0 for value in values], width, label=f"{row.label} [{row.mode}]"
        )
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("held-out domain accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return atomic.write_with(target, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def report_data(
    rows: list[Row], evaluations: list[Evaluation], found: list[dict[str, Any]]
) -> dict:
    return {
        "unit": "percent",
        "rows": [
            {
                "label": row.label,
                "method": row.method,
                "model": row.model,
                "mode": row.mode,
                "datasets": {
                    dataset: {
                        "accuracy": row.dataset_accuracy(dataset),
                        "domains": domains,
                        "held_out": len(domains),
                        "of": len(get_spec(dataset).domains),
                        "validation": row.validation.get(dataset, {}),
                    }
                    for dataset, domains in row.test.items()
                },
                "average": row.average(),
            }
            for row in rows
        ],
        "comparisons": found,
        "paper": [asdict(row) for row in PAPER_ROWS],
        "evaluations": [asdict(ev) | {"path": str(ev.path)} for ev in evaluations],
    }


def write_report(runs: Path, out: Path) -> Report:
    """Collect every evaluation under `runs` and write results.md, results.png and results.json."""
    evaluations = collect(runs)
    rows = build_rows(evaluations)
    found = comparisons(rows)
    text = render_markdown(rows, found)
    out = Path(out)
    return Report(
        markdown=atomic.write_text(out / "results.md", text),
        plot=plot(rows, out / "results.png"),
        data=atomic.write_json(out / "results.json", report_data(rows, evaluations, found)),
        text=text,
    )


def report_command(runs: Path, out: Path) -> Report:
    """`dbr report`: write the report, print its Markdown and where the files went."""
    written = write_report(runs, out)
    print(written.text)
    console.print(f"[green]wrote[/] {written.markdown}, {written.plot}, {written.data}", highlight=False)
    return written

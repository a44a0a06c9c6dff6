"""`dbr report`: every finished evaluation under a runs folder -> the paper's tables, a plot, a JSON.

The tables have the paper's shape (rows = methods/models, columns = datasets and
their average), so our numbers read against the paper's at a glance. Runs of the
same cell with different seeds are trials, reported as DomainBed reports them:
the mean ± the standard error over trials, with the number of trials; a dataset
cell takes the seeds that ran every one of its held-out domains, and says so when
the held-out domains were not all run, because a 1-of-4 average is not the paper's
number. A row is named after the backbone a run started from (run.json), so a
full fine-tune is reported like a LoRA run, not under its own checkpoint's path.
The report reads only each run's eval/metrics.json, run.json and config.yaml: it
never loads a model or a dataset, so it is cheap to re-run after every evaluation.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from math import nan, sqrt
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any

import yaml
from domainbed_reasoning.train.evaluation.evaluate import (
    EVAL_FORMAT,
    MODES,
    ZEROSHOT,
    zeroshot_name,
)
from domainbed_reasoning.train.evaluation.paper_results import PAPER_ROWS, PaperRow, paper_rows_for
from matplotlib.figure import Figure

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.data.registry import REGISTRY, get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import console

METHOD_LABELS = {
    "cls": "CLS only",
    "reasoning": "Reasoning only",
    "mtct": "MTCT",
    "rd-mldg": "RD-MLDG",
}
ROW_ORDER = (ZEROSHOT, "cls", "reasoning", "mtct", "rd-mldg")
# The mode a method is judged by: the question it was trained to answer (zero-shot models are asked directly).
PRIMARY_MODE = {"cls": "direct", ZEROSHOT: "direct"}
# The paper's tables: Table 1 compares RD-MLDG with zero-shot models; Table 2 is the ablation.
TABLE1_METHODS = (ZEROSHOT, "rd-mldg")
TABLE2_METHODS = ("cls", "reasoning", "mtct", "sarr", "rd-mldg")
TABLE1_DATASETS = ("PACS", "VLCS", "OfficeHome", "TerraIncognita")
ABLATION_DATASETS = ("OfficeHome", "TerraIncognita")
REEVALUATE = "re-run `dbr eval --force` on its run"
IMAGE_COUNTS = ("train_images", "train_images_with_chain", "validation_images", "test_images")

Seed = int | None  # None: a zero-shot evaluation, deterministic, one trial


@dataclass(frozen=True)
class Evaluation:
    """One eval/metrics.json: test (and validation) accuracy per mode for one held-out domain and seed."""

    path: Path
    dataset: str
    domain: str
    method: str
    model: str  # what was evaluated: a checkpoint, or a full fine-tune's own model/ folder
    backbone: str  # the base model the run started from (run.json): the row's name
    finetune: str | None  # lora or full (config.yaml); None for a model evaluated as is
    seed: Seed
    name: str
    accuracy: dict[str, dict[str, float]]  # split -> mode -> accuracy in percent
    unparseable: dict[str, dict[str, int]]  # split -> mode -> count
    n: dict[str, int]  # split -> images scored
    images: dict[str, int]  # run.json's image counts, where the run recorded them
    selection: str | None = None  # the model selection rule; None for a model evaluated as is


@dataclass(frozen=True)
class Trials:
    """The accuracies (%) of one cell's trials; DomainBed's standard error, np.std(x) / sqrt(n)."""

    values: tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return fmean(self.values)

    @property
    def se(self) -> float:
        return pstdev(self.values) / sqrt(len(self.values))


@dataclass(frozen=True)
class Row:
    """One line of the table: a method on a backbone (or a model as is), read in one mode."""

    label: str
    method: str
    model: str
    mode: str
    test: dict[
        str, dict[str, dict[Seed, float]]
    ]  # dataset -> held-out domain -> seed -> accuracy (%)
    validation: dict[str, dict[str, dict[Seed, float]]]

    def domain_trials(self, dataset: str, domain: str) -> Trials | None:
        seeds = self.test.get(dataset, {}).get(domain)
        return Trials(tuple(seeds[seed] for seed in _seed_order(seeds))) if seeds else None

    def dataset_trials(self, dataset: str) -> Trials | None:
        """One value per seed that ran every held-out domain of the cell: the mean over those domains."""
        domains = self.test.get(dataset)
        if not domains:
            return None
        seeds = set.intersection(*(set(by_seed) for by_seed in domains.values()))
        if not seeds:
            return None
        return Trials(
            tuple(
                fmean(by_seed[seed] for by_seed in domains.values()) for seed in _seed_order(seeds)
            )
        )

    def dataset_accuracy(self, dataset: str) -> float | None:
        """The trials' mean; where no seed ran every domain, the mean of the domains' own means."""
        domains = self.test.get(dataset)
        if not domains:
            return None
        trials = self.dataset_trials(dataset)
        return (
            trials.mean
            if trials
            else fmean(fmean(by_seed.values()) for by_seed in domains.values())
        )

    def average(self) -> float | None:
        values = [self.dataset_accuracy(name) for name in self.test]
        return fmean(values) if values else None

    def validation_accuracy(self, dataset: str) -> float | None:
        domains = self.validation.get(dataset)
        return fmean(fmean(by_seed.values()) for by_seed in domains.values()) if domains else None


def _seed_order(seeds) -> list[Seed]:
    return sorted(seeds, key=lambda seed: (seed is not None, seed or 0))


@dataclass(frozen=True)
class Report:
    markdown: Path
    plot: Path
    data: Path
    text: str


# --- collecting ---------------------------------------------------------------------------------


def collect(runs: Path) -> list[Evaluation]:
    runs = Path(runs)
    paths = artefacts.evaluations_under(runs) if runs.is_dir() else []
    if not paths:
        raise UserError(
            f"no evaluations (eval/metrics.json) under {runs}: train and evaluate first - "
            "`dbr train ...` then `dbr eval --run RUN_DIR`, or `dbr eval --model ...` for a zero-shot row"
        )
    return [read_evaluation(path) for path in paths]


def read_evaluation(path: Path) -> Evaluation:
    metrics = atomic.read_json(path, REEVALUATE)
    if not isinstance(metrics, dict) or metrics.get("format") != EVAL_FORMAT:
        found = metrics.get("format") if isinstance(metrics, dict) else None
        raise UserError(
            f"{path} was written by another version of dbr (format {found}, expected {EVAL_FORMAT}): "
            "re-run `dbr eval --force` on its run"
        )
    spec = get_spec(metrics["dataset"])
    by_split = {
        split: name for name in spec.domains for split in (name, artefacts.split_name(name))
    }
    results = metrics["results"]
    run_dir = artefacts.evaluated_run(path)
    info = atomic.read_json(artefacts.run_info_path(run_dir), REEVALUATE)
    settings = _read_settings(artefacts.run_config_path(run_dir))
    trained = metrics["method"] != ZEROSHOT
    return Evaluation(
        path=path,
        dataset=spec.name,
        domain=by_split.get(metrics["target"], metrics["target"]),
        method=metrics["method"],
        model=metrics["model"],
        backbone=info.get("model") or metrics["model"],
        finetune=settings.get("finetune", "lora") if trained else None,
        seed=settings.get("seed") if trained else None,
        name=metrics["name"],
        accuracy={
            split: {mode: 100.0 * scores["accuracy"] for mode, scores in modes.items()}
            for split, modes in results.items()
        },
        unparseable={
            split: {mode: scores["unparseable"] for mode, scores in modes.items()}
            for split, modes in results.items()
        },
        n={
            split: max(scores["n"] for scores in modes.values()) for split, modes in results.items()
        },
        images={key: info[key] for key in IMAGE_COUNTS if isinstance(info.get(key), int)},
        # evaluations from before model selection existed tested the last weights
        selection=(metrics.get("selection") or {"rule": "last"})["rule"] if trained else None,
    )


def _read_settings(path: Path) -> dict[str, Any]:
    """The two settings the report needs from a run's config.yaml: its seed and its kind of fine-tuning."""
    if not path.is_file():
        return {}
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise UserError(f"{path} is not valid YAML: re-run `dbr train` into a new --out") from None
    return settings if isinstance(settings, dict) else {}


def row_label(
    method: str, backbone: str, name: str, finetune: str | None = None, selection: str | None = None
) -> str:
    """Runs whose weights were chosen by another rule than the paper's `last` get a row of their own."""
    if method == ZEROSHOT:
        return f"zero-shot {name}"
    full = ", full fine-tune" if finetune == "full" else ""
    picked = f", {selection} selection" if selection not in (None, "last") else ""
    return f"{METHOD_LABELS.get(method, method)} ({zeroshot_name(backbone)}{full}{picked})"


def build_rows(evaluations: list[Evaluation]) -> list[Row]:
    """Group evaluations into rows, seeds into trials; the same trial from two files is refused."""
    cells: dict[tuple[str, str, str, str], dict[str, dict[str, dict[str, dict[Seed, float]]]]] = (
        defaultdict(
            lambda: {
                "test": defaultdict(lambda: defaultdict(dict)),
                "validation": defaultdict(lambda: defaultdict(dict)),
            }
        )
    )
    seen: dict[tuple[str, str, str, Seed], Path] = {}
    for ev in evaluations:
        label = row_label(ev.method, ev.backbone, ev.name, ev.finetune, ev.selection)
        cell = (label, ev.dataset, ev.domain, ev.seed)
        if cell in seen:
            seed = f" with seed {ev.seed}" if ev.seed is not None else ""
            raise UserError(
                f"{seen[cell]} and {ev.path} both evaluate {label} on {ev.dataset}/{ev.domain}{seed}: "
                "report one runs folder at a time, or move one run away"
            )
        seen[cell] = ev.path
        for split, modes in ev.accuracy.items():
            for mode, value in modes.items():
                cells[(label, ev.method, ev.backbone, mode)][split][ev.dataset][ev.domain][
                    ev.seed
                ] = value
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


def _sorted_domains(
    table: dict[str, dict[str, dict[Seed, float]]],
) -> dict[str, dict[str, dict[Seed, float]]]:
    order = list(REGISTRY)
    return {
        dataset: {
            d: dict(table[dataset][d]) for d in sorted(table[dataset], key=_domain_order(dataset))
        }
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
    "Test accuracy (%) on the held-out domain, leave-one-domain-out. Each cell is the mean ± the standard "
    "error over trials (seeds), as DomainBed reports them, and (k) is the number of trials; a dataset cell "
    "averages each trial over its held-out domains, and says so when those are not all of the dataset's. "
    "Mode `reasoning`: reasoning prompt, the chain's conclusion is the answer; mode `direct`: classification "
    "prompt. Unparseable answers count as wrong. A method's first row is the mode it is judged by."
)


# --- rendering ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _mean_se(trials: Trials) -> str:
    """One trial has no error to show."""
    if trials.count == 1:
        return f"{trials.mean:.2f}"
    return f"{trials.mean:.2f} ± {trials.se:.2f}"


def format_trials(trials: Trials | None) -> str:
    """`91.73 ± 0.25 (3)`: mean ± standard error (trials)."""
    return "—" if trials is None else f"{_mean_se(trials)} ({trials.count})"


def _table(header: list[str], lines: list[list[str]]) -> str:
    rule = "|" + "|".join("---" for _ in header) + "|"
    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            rule,
            *("| " + " | ".join(line) + " |" for line in lines),
        ]
    )


def _datasets(rows: list[Row], also: tuple[str, ...] = ()) -> list[str]:
    found = {dataset for row in rows for dataset in row.test} | set(also)
    return [name for name in REGISTRY if name in found]


def _primary(rows: list[Row]) -> list[Row]:
    return [row for row in rows if row.mode == PRIMARY_MODE.get(row.method, "reasoning")]


def dataset_cell(row: Row, dataset: str) -> str:
    """`91.73 ± 0.25 (3)`, with `; 2/4 domains` when not every held-out domain was run."""
    domains = row.test.get(dataset)
    if not domains:
        return "—"
    trials = row.dataset_trials(dataset)
    if trials:
        value, notes = _mean_se(trials), [str(trials.count)]
    else:
        value, notes = _pct(row.dataset_accuracy(dataset)), ["seeds differ per domain"]
    total = len(get_spec(dataset).domains)
    if len(domains) < total:
        notes.append(f"{len(domains)}/{total} domains")
    return f"{value} ({'; '.join(notes)})"


def _average_cell(row: Row, datasets: list[str]) -> str:
    missing = len(row.test) < len(datasets)
    return _pct(row.average()) + (f" ({len(row.test)}/{len(datasets)} datasets)" if missing else "")


def main_table(rows: list[Row]) -> str:
    datasets = _datasets(rows)
    lines = [
        [
            row.label,
            row.mode,
            *(dataset_cell(row, name) for name in datasets),
            _average_cell(row, datasets),
        ]
        for row in rows
    ]
    return _table(["Method / model", "Mode", *datasets, "Avg"], lines)


def paper_layout(
    rows: list[Row],
    methods: tuple[str, ...],
    paper_rows: list[PaperRow],
    datasets: list[str],
    average: bool,
) -> str:
    """Our rows (in the mode each method is judged by) and the paper's, method by method."""
    lines = []
    for method in methods:
        for row in (row for row in _primary(rows) if row.method == method):
            average_cell = [_average_cell(row, datasets)] if average else []
            lines.append(
                [row.label, "ours", *(dataset_cell(row, name) for name in datasets), *average_cell]
            )
        for paper in (paper for paper in paper_rows if paper.method == method):
            average_cell = [_pct(paper.average)] if average else []
            cells = [_pct(paper.accuracy.get(name)) for name in datasets]
            lines.append([paper.label, f"paper, {paper.source}", *cells, *average_cell])
    return _table(["Method / model", "Source", *datasets, *(["Avg"] if average else [])], lines)


def table1(rows: list[Row]) -> str:
    ours = [row for row in rows if row.method in TABLE1_METHODS]
    paper = [row for row in PAPER_ROWS if row.source == "Table 1"]
    return paper_layout(rows, TABLE1_METHODS, paper, _datasets(ours, TABLE1_DATASETS), average=True)


def table2(rows: list[Row]) -> str:
    """The ablation; the paper's MTCT+SARR row is its Table 1 RD-MLDG row (same model, same numbers)."""
    ours = [row for row in rows if row.method in TABLE2_METHODS]
    paper = [row for row in PAPER_ROWS if row.source == "Ablation" or row.method == "rd-mldg"]
    return paper_layout(
        rows, TABLE2_METHODS, paper, _datasets(ours, ABLATION_DATASETS), average=False
    )


def domain_table(rows: list[Row], dataset: str) -> str:
    domains = list(get_spec(dataset).domains)
    lines = [
        [
            row.label,
            row.mode,
            *(format_trials(row.domain_trials(dataset, d)) for d in domains),
            dataset_cell(row, dataset),
            _pct(row.validation_accuracy(dataset)),
        ]
        for row in rows
        if dataset in row.test
    ]
    return _table(["Method / model", "Mode", *domains, "Avg", "Val. (train domains)"], lines)


def image_counts(evaluations: list[Evaluation], dataset: str) -> dict[str, dict[str, list[int]]]:
    """Per held-out domain: the images scored (n) and the run's split sizes, each distinct value once."""
    counts: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    for ev in (ev for ev in evaluations if ev.dataset == dataset):
        found = counts[ev.domain]
        for split, n in ev.n.items():
            found[f"{split}_images"].add(n)
        for key, value in ev.images.items():
            found[key].add(value)
    order = _domain_order(dataset)
    return {
        domain: {key: sorted(values) for key, values in counts[domain].items()}
        for domain in sorted(counts, key=order)
    }


def images_table(evaluations: list[Evaluation], dataset: str) -> str:
    def cell(values: list[int] | None) -> str:
        return " / ".join(f"{value:,}" for value in values) if values else "—"

    lines = [
        [
            domain,
            *(
                cell(found.get(key))
                for key in (
                    "test_images",
                    "validation_images",
                    "train_images",
                    "train_images_with_chain",
                )
            ),
        ]
        for domain, found in image_counts(evaluations, dataset).items()
    ]
    header = [
        "Held-out domain",
        "Test images (n)",
        "Validation images",
        "Training images",
        "with a chain",
    ]
    return _table(header, lines)


def comparisons(rows: list[Row]) -> list[dict[str, Any]]:
    """Our primary-mode rows beside the paper's rows of the same method and backbone."""
    found = []
    for row in _primary(rows):
        for paper in paper_rows_for(row.method, row.model):
            for dataset, published in paper.accuracy.items():
                ours = row.dataset_accuracy(dataset)
                if ours is None:
                    continue
                trials = row.dataset_trials(dataset)
                found.append(
                    {
                        "ours": row.label,
                        "mode": row.mode,
                        "paper": paper.label,
                        "source": paper.source,
                        "dataset": dataset,
                        "ours_accuracy": ours,
                        "ours_se": trials.se if trials else None,
                        "ours_trials": trials.count if trials else 0,
                        "ours_domains": len(row.test[dataset]),
                        "paper_accuracy": published,
                        "delta": ours - published,
                    }
                )
    return found


def comparison_table(found: list[dict[str, Any]], rows: list[Row]) -> str:
    by_label = {(row.label, row.mode): row for row in rows}
    lines = [
        [
            item["ours"],
            item["mode"],
            f"{item['paper']} ({item['source']})",
            item["dataset"],
            dataset_cell(by_label[(item["ours"], item["mode"])], item["dataset"]),
            _pct(item["paper_accuracy"]),
            f"{item['delta']:+.2f}",
        ]
        for item in found
    ]
    return _table(["Ours", "Mode", "Paper row", "Dataset", "Ours", "Paper", "Δ"], lines)


def paper_table(paper_rows: tuple[PaperRow, ...]) -> str:
    lines = [
        [
            row.label,
            row.source,
            *(_pct(row.accuracy.get(name)) for name in TABLE1_DATASETS),
            _pct(row.average),
        ]
        for row in paper_rows
    ]
    return _table(["Paper row", "Source", *TABLE1_DATASETS, "Avg"], lines)


def render_markdown(
    rows: list[Row], evaluations: list[Evaluation], found: list[dict[str, Any]]
) -> str:
    parts = ["# Results", "", INTRO, "", selection_line(evaluations), "", main_table(rows)]
    parts += [
        "",
        "## Table 1: RD-MLDG and zero-shot models, the paper's layout",
        "",
        "Our rows in the mode each is judged by, the paper's rows (arXiv 2602.23777) below them.",
        "",
        table1(rows),
        "",
        "## Table 2: the ablation, the paper's layout",
        "",
        "The paper's `+SARR without MTCT` has no method here; its MTCT+SARR row is RD-MLDG.",
        "",
        table2(rows),
    ]
    for dataset in _datasets(rows):
        parts += ["", f"## {dataset} per held-out domain", "", domain_table(rows, dataset)]
        parts += [
            "",
            f"Images per held-out domain ({dataset}):",
            "",
            images_table(evaluations, dataset),
        ]
    parts += ["", "## Beside the paper", ""]
    if found:
        parts.append(comparison_table(found, rows))
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


def selection_line(evaluations: list[Evaluation]) -> str:
    """Which model selection rule chose the tested weights, and how many runs each."""
    counts: dict[str, int] = defaultdict(int)
    for ev in evaluations:
        if ev.selection is not None:
            counts[ev.selection] += 1
    used = ", ".join(f"`{rule}` ({count} run{'s' if count > 1 else ''})" for rule, count in sorted(counts.items()))
    return (
        f"Model selection: {used or 'none (no trained run)'}. `last` tests the weights training ended "
        "with (the paper's rule, the default); `training-domain` tests the kept checkpoint with the best "
        "accuracy on the training domains' validation split (DomainBed's rule)."
    )


def chance(dataset: str) -> float:
    return 100.0 / len(get_spec(dataset).classes)


def figure(rows: list[Row]) -> Figure:
    """Grouped bars with standard-error bars: one group per dataset (and the average), one bar per
    method in its primary mode, each named with its backbone; a dashed line marks chance in each group."""
    shown = _primary(rows)
    datasets = _datasets(rows)
    groups = [*datasets, "Avg"]
    drawn = Figure(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(shown)) / 2), 4.5))
    axes = drawn.subplots()
    width = 0.8 / max(1, len(shown))
    for index, row in enumerate(shown):
        values = [row.dataset_accuracy(name) for name in datasets] + [row.average()]
        trials = [row.dataset_trials(name) for name in datasets] + [None]
        errors = [
            t.se if t and t.count > 1 else nan for t in trials
        ]  # no bar, no cap: nothing drawn
        positions = [group + index * width - 0.4 + width / 2 for group in range(len(groups))]
        axes.bar(
            positions,
            [nan if value is None else value for value in values],
            width,
            yerr=errors,
            capsize=3,
            label=f"{row.label} [{row.mode}]",
        )
    levels = [chance(name) for name in datasets]
    levels.append(fmean(levels))
    centres = range(len(groups))
    axes.hlines(
        levels,
        [centre - 0.45 for centre in centres],
        [centre + 0.45 for centre in centres],
        colors="black",
        linestyles="dashed",
        label="chance",
    )
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel("held-out domain accuracy (%), ± s.e. over seeds")
    axes.set_ylim(0, 100)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    drawn.tight_layout()
    return drawn


def plot(rows: list[Row], target: Path) -> Path:
    drawn = figure(rows)
    return atomic.write_with(target, lambda tmp: drawn.savefig(tmp, format="png", dpi=120))


def _trials_data(trials: Trials | None) -> dict[str, Any]:
    if trials is None:
        return {"accuracy": None, "se": None, "trials": 0}
    return {"accuracy": trials.mean, "se": trials.se, "trials": trials.count}


def report_data(
    rows: list[Row], evaluations: list[Evaluation], found: list[dict[str, Any]]
) -> dict:
    return {
        "unit": "percent",
        "model_selection": sorted({ev.selection for ev in evaluations if ev.selection is not None}),
        "error": "standard error over trials (seeds): population std / sqrt(trials), as DomainBed",
        "rows": [
            {
                "label": row.label,
                "method": row.method,
                "model": row.model,
                "mode": row.mode,
                "datasets": {
                    dataset: _trials_data(row.dataset_trials(dataset))
                    | {
                        "accuracy": row.dataset_accuracy(dataset),
                        "domains": {
                            domain: _trials_data(row.domain_trials(dataset, domain))
                            | {"seeds": {str(seed): value for seed, value in seeds.items()}}
                            for domain, seeds in domains.items()
                        },
                        "held_out": len(domains),
                        "of": len(get_spec(dataset).domains),
                        "validation": row.validation_accuracy(dataset),
                        "chance": chance(dataset),
                    }
                    for dataset, domains in row.test.items()
                },
                "average": row.average(),
            }
            for row in rows
        ],
        "images": {dataset: image_counts(evaluations, dataset) for dataset in _datasets(rows)},
        "comparisons": found,
        "paper": [asdict(row) for row in PAPER_ROWS],
        "evaluations": [asdict(ev) | {"path": str(ev.path)} for ev in evaluations],
    }


def write_report(runs: Path, out: Path) -> Report:
    """Collect every evaluation under `runs` and write results.md, results.png and results.json."""
    evaluations = collect(runs)
    rows = build_rows(evaluations)
    found = comparisons(rows)
    text = render_markdown(rows, evaluations, found)
    out = Path(out)
    return Report(
        markdown=atomic.write_text(artefacts.results_markdown_path(out), text),
        plot=plot(rows, artefacts.results_plot_path(out)),
        data=atomic.write_json(
            artefacts.results_data_path(out), report_data(rows, evaluations, found)
        ),
        text=text,
    )


def report_command(runs: Path, out: Path) -> Report:
    """`dbr report`: write the report, print its Markdown and where the files went."""
    written = write_report(runs, out)
    print(written.text)
    console.print(
        f"[green]wrote[/] {written.markdown}, {written.plot}, {written.data}", highlight=False
    )
    return written

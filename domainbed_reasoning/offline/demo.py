"""`dbr demo`: the whole RD-MLDG pipeline on SynthDG, offline, on a laptop-class CPU.

Each step calls the library function of its stage, exactly as the commands do, so the
demo exercises the code a user runs and cannot drift from it: SynthDG drawn -> the
simulated teacher served with faults -> `build_chains` (the faults visibly rejected) ->
`export` -> `load_dataset` -> four trainings (cls, reasoning, MTCT, RD-MLDG = MTCT + one
SARR round) of a small Qwen2-VL built from a config -> evaluation on the held-out domain
-> the report. Every step is resumable because every stage is: a re-run skips what is done.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from domainbed_reasoning import artefacts
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.demo_clock import REFERENCE, Estimate, estimate, machine
from domainbed_reasoning.train.config import CONFIG_DIR

DATASET = "SynthDG"
TARGET = "cartoon"
METHODS = ("cls", "reasoning", "mtct", "rd-mldg")
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"
CORPUS_CHAINS = 200  # training conversations per path the demo tokenizer learns from


@dataclass(frozen=True)
class DemoSize:
    """How much data and training, which methods, and how long the reference machine took.

    `reference_s` is the reference run's total for this size (demo_clock.py scales it to
    this machine); None says nothing before starting.
    """

    images_per_class: int
    epochs: float
    max_train_images: int | None = None
    chain_tokens: int = 64  # a SynthDG chain is 15-60 tokens of the demo tokenizer
    methods: tuple[str, ...] = METHODS
    reference_s: float | None = None


FULL = DemoSize(images_per_class=60, epochs=8, reference_s=REFERENCE.demo_s)
# Every stage, in seconds: checks the pipeline, learns nothing.
SMALL = DemoSize(images_per_class=3, epochs=1, max_train_images=16, chain_tokens=32)
# The cheapest run that learns: CLS only, on a third of the images, for as many optimiser steps
# as the full demo (360); `make test` checks it scores well above chance on the held-out domain.
# Fewer steps (120, at 20 images per class and 8 epochs) stayed at chance.
LEARNS = DemoSize(images_per_class=20, epochs=24, methods=("cls",))


@dataclass(frozen=True)
class DemoConfig:
    data_dir: Path
    runs: Path
    size: DemoSize = FULL
    target: str = TARGET
    config: Path = DEMO_CONFIG
    image_size: int = 64
    seed: int = 0

    @property
    def chains_root(self) -> Path:
        return self.runs / "chains"

    @property
    def export_dir(self) -> Path:
        return self.runs / "domainbed-reasoning"

    @property
    def train_root(self) -> Path:
        return self.runs / "train"

    @property
    def report_dir(self) -> Path:
        return self.runs / "report"

    @property
    def cache_dir(self) -> Path:
        return self.runs / ".cache"


@dataclass
class DemoResult:
    """What the demo produced, for the caller (and the test) to check."""

    build_stats: dict[str, Any] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)
    model: Path | None = None
    runs: dict[str, Path] = field(default_factory=dict)
    report: Any = None
    seconds: dict[str, float] = field(default_factory=dict)
    estimate: Estimate | None = None


def teacher_faults(seed: int):
    """The simulated teacher errs like a real one: wrong classes, broken chains, empty answers, 429/500."""
    from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig

    return SimTeacherConfig(
        model="sim-teacher", p_wrong=0.15, p_malformed=0.10, p_empty=0.05,
        p_429=0.05, retry_after=0.05, p_500=0.05, seed=seed,
    )  # fmt: skip


class Steps:
    """A rich header per step, its wall-clock time recorded, its artefacts printed."""

    def __init__(self, console: Console, total: int, result: DemoResult) -> None:
        self.console, self.total, self.result, self.index = console, total, result, 0

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.index += 1
        self.console.rule(f"[bold cyan]step {self.index}/{self.total}: {title}")
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.result.seconds[title] = round(seconds, 1)
        self.console.print(f"[dim]{title}: {seconds:.1f} s[/]", highlight=False)

    def artefact(self, what: str, path: Path) -> None:
        self.console.print(f"  [green]{what}[/]: {path}", highlight=False, soft_wrap=True)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """The demo reads as its steps: the libraries' own bars (datasets' casts and Parquet writes,
    transformers' weight loading and saving) and their deprecation notices would come between
    them, and so would DeepSpeed's warning that it found no GPU (the demo runs on the CPU on
    purpose). Each training stage still draws its one bar with its loss; the state is restored after."""
    import datasets
    import torch
    from transformers.utils import logging as transformers_logging

    bars = datasets.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    name_cpu = not torch.cuda.is_available() and "DS_ACCELERATOR" not in os.environ
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    if name_cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers_logging.enable_progress_bar()
        if name_cpu:
            del os.environ["DS_ACCELERATOR"]


def synthesise(config: DemoConfig, steps: Steps) -> None:
    from domainbed_reasoning.offline.synth import generate, sidecar_path

    root = generate(config.data_dir, config.size.images_per_class, config.seed, config.image_size)
    steps.artefact("images", root)
    steps.artefact("attributes sidecar", sidecar_path(config.data_dir))


def build(config: DemoConfig, steps: Steps) -> dict[str, Any]:
    from domainbed_reasoning.builders.build import build_chains
    from domainbed_reasoning.builders.build_config import BuildConfig
    from domainbed_reasoning.builders.rejection_sampling import SamplingPlan
    from domainbed_reasoning.builders.transport.teacher_client import TeacherConfig
    from domainbed_reasoning.offline.sim_teacher import run_sim_teacher

    faults = teacher_faults(config.seed)
    with run_sim_teacher(faults, config.data_dir) as url:
        steps.console.print(
            f"  simulated teacher at {url}: p_wrong {faults.p_wrong}, p_malformed {faults.p_malformed}, "
            f"p_empty {faults.p_empty}, p_429 {faults.p_429}, p_500 {faults.p_500}",
            highlight=False,
        )
        stats = build_chains(
            BuildConfig(
                dataset=DATASET,
                data_dir=config.data_dir,
                out=config.chains_root,
                teacher=TeacherConfig(urls=(url,), model=faults.model, concurrency=32, timeout=30),
                plan=SamplingPlan(candidates=2, max_rounds=3),
            ),
            console=steps.console,
        )
    table = Table(title="teacher answers, by verdict")
    table.add_column("verdict")
    table.add_column("answers", justify="right")
    for reason, count in sorted(stats["reasons"].items(), key=lambda item: -item[1]):
        table.add_row(reason if reason == "accepted" else f"[red]rejected: {reason}[/]", str(count))
    steps.console.print(table)
    images = stats["images"]
    steps.console.print(
        f"  {images.get('accepted', 0)} of {images['attempted']} images got a label-consistent chain",
        highlight=False,
    )
    folder = artefacts.chains_dir(config.chains_root, get_spec(DATASET))
    steps.artefact("chains", artefacts.chains_path(folder))
    steps.artefact("build report", artefacts.report_path(folder))
    return stats


def export(config: DemoConfig, steps: Steps) -> None:
    from domainbed_reasoning.hub.export import export as export_datasets

    written = export_datasets(config.chains_root, config.data_dir, config.export_dir, [DATASET])
    steps.artefact("DomainBed-Reasoning", written[0])
    steps.artefact("dataset card", config.export_dir / "README.md")


def load(config: DemoConfig, steps: Steps) -> dict[str, int]:
    import datasets

    loaded = datasets.load_dataset(
        str(config.export_dir), DATASET, cache_dir=str(config.cache_dir / "datasets")
    )
    splits = {name: split.num_rows for name, split in loaded.items()}
    steps.console.print(
        f"  load_dataset({str(config.export_dir)!r}, {DATASET!r}) -> "
        + ", ".join(f"{name}: {rows}" for name, rows in splits.items()),
        highlight=False,
    )
    return splits


def demo_model(config: DemoConfig, steps: Steps) -> Path:
    """The tokenizer learns from conversations of the training domains only, as training will see them."""
    import polars as pl

    from domainbed_reasoning.chains.prompt_templates import humanise
    from domainbed_reasoning.offline.tiny_models import build_demo_qwen2vl, cached_tiny_model
    from domainbed_reasoning.train.mtct.mtct_data import task_prompt

    spec = get_spec(DATASET)
    chains = (
        pl.read_parquet(artefacts.chains_path(artefacts.chains_dir(config.chains_root, spec)))
        .filter(pl.col("domain") != config.target)
        .sort("id")
    )
    sample = chains.sample(min(CORPUS_CHAINS, chains.height), seed=config.seed)
    prompts = {task: task_prompt(task, spec.classes) for task in ("cls", "reasoning")}
    conversations = [
        *((prompts["reasoning"], chain) for chain in sample["chain"]),
        *((prompts["cls"], humanise(name)) for name in sample["class_name"]),
    ]
    model = cached_tiny_model(
        build_demo_qwen2vl, config.runs / "models", conversations=conversations, seed=config.seed
    )
    steps.artefact("base model (random weights, built from a config)", model)
    return model


def train_method(
    config: DemoConfig, model: Path, method: str, steps: Steps, mtct_run: Path | None = None
) -> Path:
    """`mtct_run`, when given to rd-mldg, is its round 0: the same training is not paid for twice."""
    from domainbed_reasoning.train.config import load_config
    from domainbed_reasoning.train.stages.run import train
    from domainbed_reasoning.train.stages.stage import TrainRequest

    settings = load_config(
        config.config,
        {
            "method": method,
            "epochs": config.size.epochs,
            "max_train_images": config.size.max_train_images,
            "self_label_max_new_tokens": config.size.chain_tokens,
            "seed": config.seed,
            "sarr_round0_from": str(mtct_run) if method == "rd-mldg" and mtct_run else None,
        },
    )
    result = train(
        TrainRequest(
            DATASET, str(config.export_dir), config.target, str(model),
            config.train_root, settings, resume=True,
        )
    )  # fmt: skip
    steps.artefact(f"{method} trained weights", result.weights.folder)
    if method == "rd-mldg":
        steps.artefact(
            "SARR self-labels (round 1)",
            artefacts.self_labels_path(artefacts.round_dir(result.run_dir, 1)),
        )
    return result.run_dir


def evaluate(config: DemoConfig, run_dir: Path, steps: Steps) -> None:
    from domainbed_reasoning.train.engines.settings import EngineSettings
    from domainbed_reasoning.train.evaluation.evaluate import EvalSettings, evaluate_run

    if artefacts.metrics_path(artefacts.eval_dir(run_dir)).is_file():
        steps.artefact("evaluation (already done)", artefacts.eval_dir(run_dir))
        return
    evaluate_run(
        run_dir,
        EvalSettings(
            engine=EngineSettings("transformers", batch_size=32),
            reasoning_tokens=config.size.chain_tokens,
            cache_dir=config.cache_dir / "datasets",
        ),
    )
    steps.artefact("predictions and metrics", artefacts.eval_dir(run_dir))


def report(config: DemoConfig, steps: Steps):
    from domainbed_reasoning.train.evaluation.report import write_report

    written = write_report(config.train_root, config.report_dir)
    steps.console.print(results_table(config))
    steps.artefact("table (every row, the paper's beside them)", written.markdown)
    steps.artefact("plot", written.plot)
    steps.artefact("numbers", written.data)
    return written


def results_table(config: DemoConfig) -> Table:
    """The demo's accuracies in a table that fits an 80-column terminal; results.md has the rest."""
    from domainbed_reasoning.train.evaluation.report import METHOD_LABELS, collect

    evaluations = {item.method: item for item in collect(config.train_root)}
    first = next(iter(evaluations.values()))
    table = Table(title=f"accuracy (%), {DATASET}, held-out domain {config.target}")
    table.add_column("method")
    table.add_column("mode")
    table.add_column(f"{config.target} ({first.n['test']} images)", justify="right")
    table.add_column(f"validation ({first.n['validation']})", justify="right")
    for method in (method for method in METHODS if method in evaluations):
        scores = evaluations[method].accuracy
        for mode in sorted(scores["test"]):
            table.add_row(
                METHOD_LABELS[method], mode,
                f"{scores['test'][mode]:.2f}", f"{scores['validation'][mode]:.2f}",
            )  # fmt: skip
    return table


def announce(config: DemoConfig, console: Console) -> Estimate | None:
    """Say what the demo runs on and, for a size with a reference run, how long it should take."""
    console.print(f"this machine: {machine()}", highlight=False)
    if config.size.reference_s is None:
        return None
    expected = estimate(config.size.reference_s)
    console.print(
        f"expected duration: about {_minutes(expected.expected_s)} of steps (a {expected.calibration_s:.1f} s "
        f"calibration here; {expected.reference.calibration_s:.1f} s and {_minutes(expected.reference_s)} "
        f"on {expected.reference.machine})",
        highlight=False,
    )
    return expected


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    """Every stage in order; returns where everything went and how long each step took."""
    console = console or Console()
    if config.target not in get_spec(DATASET).domains:
        raise UserError(
            f"unknown held-out domain {config.target!r}: choose one of {', '.join(get_spec(DATASET).domains)}"
        )
    with quiet_libraries():
        return _run_steps(config, console)


def _run_steps(config: DemoConfig, console: Console) -> DemoResult:
    methods = config.size.methods
    result = DemoResult(estimate=announce(config, console))
    steps = Steps(console, total=6 + 2 * len(methods), result=result)
    with steps.step("SynthDG: draw the images"):
        synthesise(config, steps)
    with steps.step("build-chains: the simulated teacher, label-consistent chains kept"):
        result.build_stats = build(config, steps)
    with steps.step("export: DomainBed-Reasoning as Parquet + dataset card"):
        export(config, steps)
    with steps.step("load_dataset"):
        result.splits = load(config, steps)
    with steps.step("model: a small Qwen2-VL from a config, random weights"):
        result.model = demo_model(config, steps)
    for method in methods:
        with steps.step(f"train {method} (held-out domain: {config.target})"):
            result.runs[method] = train_method(
                config, result.model, method, steps, result.runs.get("mtct")
            )
    for method in methods:
        with steps.step(f"evaluate {method} on {config.target} and validation"):
            evaluate(config, result.runs[method], steps)
    with steps.step("report"):
        result.report = report(config, steps)
    console.rule("[bold green]demo finished")
    for title, seconds in result.seconds.items():
        console.print(f"  {seconds:7.1f} s  {title}", highlight=False, overflow="ellipsis", no_wrap=True)
    total = sum(result.seconds.values())
    expected = f" (expected {result.estimate.expected_s:.0f} s)" if result.estimate else ""
    console.print(f"  {total:7.1f} s  total{expected}", highlight=False)
    return result

"""What a sweep runs: one trial per (dataset, held-out domain, method, seed), plus zero-shot rows.

Every input is checked here, before any trial starts: methods, the seed list, each
`--set` (resolved exactly as `dbr train` resolves it), each dataset against the
registry and the export, and any run folder already on disk against the settings
it was made with. A trial is a list of `dbr` commands, each skipped at run time
when the file it writes last is there, so re-running a sweep finishes killed
trials (`--resume`) and never redoes a finished one.

A sweep folder holds everything (paths are relative to `--out`):

    sweep.json                                   the request, so `--status` needs no arguments
    train/seed-<s>/<DATASET>/<target>/<method>/  one `dbr train` run folder per trial (+ eval/)
    zeroshot/<DATASET>/<target>/zeroshot-<name>/ one `dbr eval --model` folder per zero-shot row
    logs/<trial>.log  trials/<trial>.json        each trial's output, and what the launcher measured
    slurm/                                       submitit's job files and jobs.json (Slurm only)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import datasets
from domainbed_reasoning.train.config import METHODS, TrainConfig, load_config, parse_overrides
from domainbed_reasoning.train.evaluation.evaluate import ZEROSHOT, ZeroShotRequest, job_for_model

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.data.registry import DatasetSpec, get_spec
from domainbed_reasoning.errors import UserError

SWEEP_FILE = "sweep.json"
PAPER_METHODS = ("cls", "reasoning", "mtct", "rd-mldg")
TRAIN = "train"
PENDING, PARTIAL, TRAINED, DONE = "pending", "partial", "trained", "done"


@dataclass(frozen=True)
class RemoteModel:
    """A model behind an OpenAI-compatible API (GPT-4o in the paper), evaluated zero-shot."""

    url: str
    model: str
    api_key_env: str | None = None


@dataclass(frozen=True)
class SweepSpec:
    """The request, as typed: `plan` checks it and expands it into trials."""

    datasets: tuple[str, ...]
    model: str
    out: Path
    methods: tuple[str, ...] = PAPER_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    data: str = "domainbed-reasoning"
    targets: tuple[str, ...] | None = None
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    zero_shot: bool = False
    remote: RemoteModel | None = None
    engine: str | None = None
    direct_tokens: int = 32
    reasoning_tokens: int = 1024

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> SweepSpec:
        known = {field.name for field in fields(cls)}
        values = {key: value for key, value in values.items() if key in known}
        for key in ("datasets", "methods", "seeds", "overrides"):
            values[key] = tuple(values.get(key) or ())
        if values.get("targets") is not None:
            values["targets"] = tuple(values["targets"])
        remote = values.get("remote")
        return cls(
            **values
            | {
                "out": Path(values["out"]),
                "config": Path(values["config"]) if values.get("config") else None,
                "remote": RemoteModel(**remote) if remote else None,
            }
        )


@dataclass(frozen=True)
class Step:
    """One `dbr` command of a trial; `done` is the file it writes last, so a finished step is skipped."""

    name: str
    argv: tuple[str, ...]
    done: Path
    distributed: bool = False  # one process per GPU through accelerate (training)


@dataclass(frozen=True)
class Trial:
    key: str
    dataset: str
    target: str
    method: str  # "zeroshot" for a model evaluated as is
    seed: int | None
    model: str
    folder: Path
    steps: tuple[Step, ...]
    sweep_dir: Path

    @property
    def log(self) -> Path:
        return self.sweep_dir / "logs" / f"{self.key}.log"

    @property
    def record(self) -> Path:
        return self.sweep_dir / "trials" / f"{self.key}.json"

    def state(self) -> str:
        """done (evaluated), trained (evaluation still to run), partial (killed: resumable), pending."""
        if artefacts.metrics_path(artefacts.eval_dir(self.folder)).is_file():
            return DONE
        if self.method != ZEROSHOT and artefacts.metrics_path(self.folder).is_file():
            return TRAINED
        return PARTIAL if self.folder.exists() else PENDING


# --- parsing what the user typed -----------------------------------------------------------------


def parse_seeds(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    try:
        seeds = tuple(int(part) for part in parts)
    except ValueError:
        seeds = ()
    if not seeds or any(seed < 0 for seed in seeds):
        raise UserError(
            f"seed list {text!r} does not parse: write whole numbers separated by commas, e.g. --seeds 0,1,2"
        )
    if len(set(seeds)) < len(seeds):
        raise UserError(f"seed list {text!r} repeats a seed: give each seed once")
    return seeds


def check_methods(methods: tuple[str, ...]) -> None:
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")


def resolved_config(spec: SweepSpec, method: str, seed: int) -> TrainConfig:
    """The settings `dbr train` will resolve for this trial, from the same file and --set pairs."""
    overrides = parse_overrides(list(spec.overrides))
    for key, option in (("seed", "--seeds"), ("method", "--methods")):
        if key in overrides:
            raise UserError(
                f"--set {key}=... conflicts with the sweep's own {key}: give it with {option}"
            )
    engine = {"engine": spec.engine} if spec.engine else {}
    return load_config(spec.config, {**overrides, **engine, "method": method, "seed": seed})


def held_out_domains(spec: DatasetSpec, targets: tuple[str, ...] | None) -> tuple[str, ...]:
    """Every domain (DomainBed's protocol), or those asked for; a split name ("Real_World") is accepted."""
    if targets is None:
        return spec.domains
    by_name = {artefacts.split_name(domain): domain for domain in spec.domains} | {
        domain: domain for domain in spec.domains
    }
    unknown = [target for target in targets if target not in by_name]
    if unknown:
        raise UserError(
            f"{spec.name} has no domain {', '.join(map(repr, unknown))}: choose from {', '.join(spec.domains)} "
            "(--targets applies to every dataset of the sweep)"
        )
    return tuple(dict.fromkeys(by_name[target] for target in targets))


def check_export(data: str, plan: dict[DatasetSpec, tuple[str, ...]]) -> None:
    """Each dataset is a config of the export, and each held-out domain one of its splits."""
    try:
        configs = datasets.get_dataset_config_names(data)
    except FileNotFoundError:
        raise UserError(
            f"no DomainBed-Reasoning at {data!r}: pass the export folder (`dbr export`) or a Hub repo id with --data"
        ) from None
    missing = [spec.name for spec in plan if spec.name not in configs]
    if missing:
        raise UserError(
            f"{data} has no {', '.join(missing)} (it has {', '.join(configs)}): "
            f"export it with `dbr export {' '.join(missing)}`, or leave it out of the sweep"
        )
    for spec, domains in plan.items():
        splits = datasets.get_dataset_split_names(data, spec.name)
        absent = [domain for domain in domains if artefacts.split_name(domain) not in splits]
        if absent:
            raise UserError(
                f"{data} holds no {spec.name} images of {', '.join(absent)}: re-export {spec.name} with "
                f"`dbr export {spec.name}`"
            )


# --- expanding the request ------------------------------------------------------------------------


def plan(spec: SweepSpec) -> list[Trial]:
    """Check the request and expand it; nothing is written or started."""
    check_methods(spec.methods)
    if (spec.methods or spec.zero_shot) and not spec.model:
        raise UserError(
            "--model is required: the base MLLM every trial trains (a checkpoint folder or a Hub id)"
        )
    if not spec.methods and not spec.zero_shot and spec.remote is None:
        raise UserError(
            "nothing to run: give --methods, or --zero-shot / --zero-shot-remote for zero-shot rows"
        )
    configs = {
        (method, seed): resolved_config(spec, method, seed)
        for method in spec.methods
        for seed in spec.seeds
    }
    domains = {
        get_spec(name): held_out_domains(get_spec(name), spec.targets) for name in spec.datasets
    }
    if not domains:
        raise UserError(
            "no dataset given: name one or more, e.g. `dbr sweep PACS VLCS --model ...`"
        )
    check_export(spec.data, domains)
    trials = []
    for dataset, targets in domains.items():
        for target in targets:
            trials += zero_shot_trials(spec, dataset, target)
            for method in spec.methods:
                trials += [
                    train_trial(spec, dataset, target, configs[(method, seed)])
                    for seed in spec.seeds
                ]
    return trials


def _key(dataset: DatasetSpec, target: str, run: str) -> str:
    """`PACS.art_painting.mtct.seed0`: a file name, and unique within a sweep."""
    return f"{dataset.name}.{artefacts.split_name(target)}.{run}"


def _eval_options(spec: SweepSpec) -> tuple[str, ...]:
    return (
        "--no-progress", "--direct-tokens", str(spec.direct_tokens),
        "--max-new-tokens", str(spec.reasoning_tokens),
    )  # fmt: skip


def train_trial(spec: SweepSpec, dataset: DatasetSpec, target: str, config: TrainConfig) -> Trial:
    out = spec.out / TRAIN / f"seed-{config.seed}"
    folder = artefacts.run_dir(out, dataset.name, target, config.method)
    check_saved_settings(folder, config)
    train = (
        "train", dataset.name, "--data", spec.data, "--target", target, "--model", spec.model,
        "--method", config.method, "--out", str(out), "--resume", "--no-evaluate",
        *(("--config", str(spec.config)) if spec.config else ()),
        *(arg for pair in spec.overrides for arg in ("--set", pair)),
        "--set", f"seed={config.seed}", *(("--engine", spec.engine) if spec.engine else ()),
    )  # fmt: skip
    evaluate = ("eval", "--run", str(folder), "--engine", config.engine, *_eval_options(spec))
    return Trial(
        key=_key(dataset, target, f"{config.method}.seed{config.seed}"),
        dataset=dataset.name,
        target=target,
        method=config.method,
        seed=config.seed,
        model=spec.model,
        folder=folder,
        steps=(
            Step("train", train, artefacts.metrics_path(folder), distributed=True),
            Step("eval", evaluate, artefacts.metrics_path(artefacts.eval_dir(folder))),
        ),
        sweep_dir=spec.out,
    )


def check_saved_settings(folder: Path, config: TrainConfig) -> None:
    """A run folder left by an earlier sweep must have been made with these very settings."""
    saved = artefacts.run_config_path(folder)
    if not saved.is_file():
        return
    before = load_config(saved).to_dict()
    changed = sorted(key for key, value in config.to_dict().items() if before.get(key) != value)
    if changed:
        raise UserError(
            f"{folder} was trained with other settings ({', '.join(changed)}): run the sweep with the same "
            "--config and --set, or give it another --out"
        )


def zero_shot_trials(spec: SweepSpec, dataset: DatasetSpec, target: str) -> list[Trial]:
    """The base model as is (--zero-shot) and a remote model (--zero-shot-remote): one trial each, no seed."""
    out = spec.out / ZEROSHOT
    engine = spec.engine or "transformers"
    models = [(spec.model, None, ("--engine", engine))] if spec.zero_shot else []
    if spec.remote is not None:
        remote = spec.remote
        key_env = ("--api-key-env", remote.api_key_env) if remote.api_key_env else ()
        flags = ("--engine", "remote", "--base-url", remote.url, *key_env)
        models.append((remote.model, remote.model, flags))
    trials = []
    for model, name, flags in models:
        job = job_for_model(ZeroShotRequest(dataset.name, spec.data, target, model, out, name))
        argv = (
            "eval", "--dataset", dataset.name, "--data", spec.data, "--target", target,
            "--model", model, "--out", str(out), "--splits", "test",
            *(("--name", name) if name else ()), *flags, *_eval_options(spec),
        )  # fmt: skip
        trials.append(
            Trial(
                key=_key(dataset, target, f"{ZEROSHOT}-{job.name}"),
                dataset=dataset.name,
                target=target,
                method=ZEROSHOT,
                seed=None,
                model=model,
                folder=job.run_dir,
                steps=(Step("eval", argv, artefacts.metrics_path(job.eval_dir)),),
                sweep_dir=spec.out,
            )
        )
    return trials


# --- the sweep folder -----------------------------------------------------------------------------


def save_spec(spec: SweepSpec) -> Path:
    return atomic.write_json(spec.out / SWEEP_FILE, spec.to_json())


def load_spec(out: Path) -> SweepSpec:
    """The last request run in `out`, for `--status` without arguments."""
    path = Path(out) / SWEEP_FILE
    if not path.is_file():
        raise UserError(
            f"no sweep in {out} ({SWEEP_FILE} not found): pass its --out, or the datasets and --model to plan one"
        )
    try:
        return replace(
            SweepSpec.from_json(json.loads(path.read_text(encoding="utf-8"))), out=Path(out)
        )
    except (json.JSONDecodeError, TypeError, KeyError):
        raise UserError(
            f"{path} is not a sweep this version of dbr wrote: run the sweep again"
        ) from None

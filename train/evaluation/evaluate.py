"""Leave-one-domain-out evaluation of a trained run, or of any model as is (zero-shot).

Two modes ask the two questions training taught, with the very prompts it used:
`direct` (the classification prompt, the answer must name one class) and
`reasoning` (the reasoning prompt, the chain's conclusion must name one class,
judged by `verdict.judge`, the builder's own filter). An answer that names no
class, several, or is not a well-formed chain is *unparseable*: wrong, and
counted apart so a format failure is never mistaken for a visual one.

Every image of a split is scored - the test split is the whole held-out domain,
images without a teacher chain included, as DomainBed scores it - streamed through
the engine a chunk at a time, so memory does not grow with the domain. Under several
processes each rank answers its share and rank 0 merges them (sharding.py).

Results live in `<run_dir>/eval/`: one predictions Parquet per (split, mode),
written as each finishes (a killed evaluation resumes from them), then
metrics.json, written last, which marks the evaluation finished. Which weights are
tested is the run's model selection rule (selection.py); under `training-domain`
each kept checkpoint's validation predictions go to `eval/selection/<checkpoint>/`.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

import polars as pl
from datasets import Dataset, DatasetDict
from domainbed_reasoning.train.config import TrainConfig, load_config
from domainbed_reasoning.train.engines.base import (
    Generation,
    GenerationEngine,
    OnDemand,
    SamplingSpec,
)
from domainbed_reasoning.train.engines.factory import batch_unit, engine_context, open_engine
from domainbed_reasoning.train.engines.merge import discard_merged
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.evaluation.selection import (
    LAST,
    TRAINING_DOMAIN,
    SelectionCost,
    best_checkpoint,
    check_selection,
    checkpoint_weights,
    kept_checkpoints,
)
from domainbed_reasoning.train.model.processor import load_processor
from domainbed_reasoning.train.model.weights import TrainedWeights, stage_weights
from domainbed_reasoning.train.mtct.mtct_data import PROMPT_OF_TASK, class_names, task_prompt
from domainbed_reasoning.train.mtct.token_budget import check_budget
from domainbed_reasoning.train.sarr.sharding import (
    Ask,
    generate_rows,
    generated_table,
    process_state,
)
from rich.table import Table

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.chains.chain_format import RejectReason
from domainbed_reasoning.chains.matching import ClassMatcher, MatchError, matcher_for
from domainbed_reasoning.chains.prompt_templates import load_prompt
from domainbed_reasoning.chains.verdict import judge
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.loading import load_lodo
from domainbed_reasoning.terminal import console

EVAL_FORMAT = 1
# mode -> the training path whose prompt it asks with
MODES = {"direct": "cls", "reasoning": "reasoning"}
SPLITS = ("test", "validation")
UNPARSEABLE = "unparseable"
ZEROSHOT = "zeroshot"
DEFAULT_MODES = {"cls": ("direct",), "reasoning": ("reasoning",)}
RUN_KEYS = ("dataset", "data", "target", "model")


@dataclass(frozen=True)
class EvalResult:
    predictions: pl.DataFrame
    metrics: dict[str, Any]


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate; `modes`/`splits` left None take the run's defaults, and the engine's
    settings not given take the run's (`EngineSettings.filled_from`)."""

    engine: EngineSettings = field(default_factory=EngineSettings)
    modes: tuple[str, ...] | None = None
    splits: tuple[str, ...] | None = None
    direct_tokens: int = 32
    reasoning_tokens: int = 1024
    force: bool = False
    cache_dir: Path | None = None
    progress: bool = True
    selection: str | None = None  # None: the run's model_selection


@dataclass(frozen=True)
class EvalJob:
    """One model on one LODO split, resolved and checked before any weights load."""

    run_dir: Path
    dataset: str
    data: str
    target: str
    method: str
    model: str
    adapter: Path | None
    name: str
    holdout_fraction: float = 0.2
    seed: int = 0
    config: TrainConfig = field(default_factory=TrainConfig)  # the run's, or the defaults (zero-shot)

    @property
    def eval_dir(self) -> Path:
        return artefacts.eval_dir(self.run_dir)


@dataclass(frozen=True)
class ZeroShotRequest:
    dataset: str
    data: str
    target: str
    model: str
    out: Path
    name: str | None = None
    adapter: Path | None = None


# --- reading one answer -------------------------------------------------------------------------


def read_answer(
    mode: str, text: str | None, finish_reason: str | None, matcher: ClassMatcher, label: str
) -> tuple[str | None, str | None]:
    """(predicted class, failure reason); a failure means unparseable.

    Direct answers are read for the class they name even when cut at the token
    limit; a reasoning answer must be a whole chain, exactly as SARR keeps them.
    """
    if mode == "reasoning":
        verdict = judge(text, matcher, label, finish_reason)
        if verdict.accepted or verdict.reason == RejectReason.WRONG_CLASS:
            return verdict.predicted, None
        return None, str(verdict.reason)
    if not text or not text.strip():
        return None, str(RejectReason.EMPTY_RESPONSE)
    try:
        return matcher.match(text), None
    except MatchError as err:
        return None, str(err.reason)


# --- one split, one mode -------------------------------------------------------------------------


def evaluate_split(
    engine: GenerationEngine,
    split: Dataset,
    classes: Sequence[str],
    mode: str,
    max_new_tokens: int,
    progress: bool = True,
) -> EvalResult:
    """Greedy answers for every image of `split`, read and scored."""
    predictions = predict(engine, split, range(len(split)), classes, mode, max_new_tokens, 1, progress)
    return EvalResult(predictions, score(predictions, classes))


def predict(
    engine: GenerationEngine,
    split: Dataset,
    rows: range,
    classes: Sequence[str],
    mode: str,
    max_new_tokens: int,
    unit: int = 1,
    progress: bool = True,
) -> pl.DataFrame:
    """Greedy answers for `split[rows]`, read; a chunk of images in memory at a time."""
    return generate_rows(engine, split, rows, mode_ask(split, classes, mode, max_new_tokens), unit, progress)


def mode_ask(split: Dataset, classes: Sequence[str], mode: str, max_new_tokens: int) -> Ask:
    """`mode`'s question (training's own prompt, greedy) and how its answers are read and scored."""
    _check_modes((mode,))
    _check_columns(split)
    matcher = matcher_for(tuple(classes))

    def read(chunk: dict[str, list], generations: list[Generation]) -> pl.DataFrame:
        table = [
            _read_row(mode, row_id, domain, label, generation, classes, matcher)
            for row_id, domain, label, generation in zip(
                chunk["id"], chunk["domain"], chunk["label"], generations, strict=True
            )
        ]
        return pl.DataFrame(table, schema=PREDICTION_SCHEMA)

    sampling = SamplingSpec(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    return Ask(task_prompt(MODES[mode], classes), sampling, ("domain", "label"), read, PREDICTION_SCHEMA)


def _read_row(
    mode: str,
    row_id: str,
    domain: str,
    label: int,
    generation: Generation,
    classes: Sequence[str],
    matcher: ClassMatcher,
) -> dict[str, Any]:
    class_name = classes[label]
    text = generation.texts[0] if generation.texts else None
    finish = generation.finish_reasons[0] if generation.finish_reasons else None
    if generation.error is not None:
        predicted, failure = None, str(RejectReason.REQUEST_ERROR)
    else:
        predicted, failure = read_answer(mode, text, finish, matcher, class_name)
    return {
        "id": row_id,
        "domain": domain,
        "class_name": class_name,
        "label": label,
        "mode": mode,
        "answer": text,
        "finish_reason": finish,
        "predicted": predicted,
        "correct": predicted == class_name,
        "failure": failure,
        "error": generation.error,
    }


PREDICTION_SCHEMA = {
    "id": pl.String,
    "domain": pl.String,
    "class_name": pl.String,
    "label": pl.Int64,
    "mode": pl.String,
    "answer": pl.String,
    "finish_reason": pl.String,
    "predicted": pl.String,
    "correct": pl.Boolean,
    "failure": pl.String,
    "error": pl.String,
}


def _check_columns(split: Dataset) -> None:
    missing = [
        name for name in ("id", "domain", "label", "image") if name not in split.column_names
    ]
    if missing:
        raise UserError(
            f"the split to evaluate has no {', '.join(missing)} column(s): pass DomainBed-Reasoning "
            "as exported (`dbr export`) or its Hub repo"
        )


# --- scoring ----------------------------------------------------------------------------------


def _accuracy(correct: int, n: int) -> float | None:
    return correct / n if n else None


def _counts(predictions: pl.DataFrame, key: str) -> dict[str, dict[str, Any]]:
    grouped = predictions.group_by(key).agg(
        pl.len().alias("n"), pl.col("correct").sum().alias("correct")
    )
    return {
        row[key]: {
            "n": row["n"],
            "correct": row["correct"],
            "accuracy": _accuracy(row["correct"], row["n"]),
        }
        for row in grouped.sort(key).iter_rows(named=True)
    }


def score(predictions: pl.DataFrame, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy overall, per domain and per class, the confusion matrix and the unparseable count."""
    n = predictions.height
    correct = int(predictions["correct"].sum())
    failures = predictions.filter(pl.col("failure").is_not_null())
    reasons = failures.group_by("failure").len().sort("failure")
    per_class = _counts(predictions, "class_name")
    empty = {"n": 0, "correct": 0, "accuracy": None}
    columns = [*classes, UNPARSEABLE]
    matrix = [[0] * len(columns) for _ in classes]
    for label, predicted in predictions.select("label", "predicted").iter_rows():
        matrix[label][classes.index(predicted) if predicted is not None else len(classes)] += 1
    return {
        "n": n,
        "correct": correct,
        "accuracy": _accuracy(correct, n),
        "unparseable": failures.height,
        "unparseable_reasons": dict(reasons.iter_rows()),
        "per_domain": _counts(predictions, "domain"),
        "per_class": {name: per_class.get(name, empty) for name in classes},
        "confusion": {"rows": list(classes), "columns": columns, "counts": matrix},
    }


# --- run folders ----------------------------------------------------------------------------------


def job_for_run(run_dir: Path) -> EvalJob:
    """A finished `dbr train` run folder, checked: finished, has trained weights, current layout."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"run folder {run_dir} not found: pass a folder `dbr train` wrote "
            "(runs/train/<DATASET>/<target>/<method>)"
        )
    info = atomic.read_json(artefacts.run_info_path(run_dir))
    if info.get("method") == ZEROSHOT:
        raise UserError(
            f"{run_dir} is a zero-shot evaluation of {info.get('model')}, a model without adapter: "
            f"evaluate it with `dbr eval --model {info.get('model')} ...` (add --force to redo it)"
        )
    if not artefacts.metrics_path(run_dir).is_file():
        raise UserError(
            f"{run_dir} has no metrics.json, its training never finished: run `dbr train` first "
            "(or `dbr train --resume` to finish it)"
        )
    missing = [
        path.name
        for path in (
            artefacts.run_info_path(run_dir),
            artefacts.run_config_path(run_dir),
            artefacts.split_path(run_dir),
        )
        if not path.is_file()
    ]
    missing += [f"run.json key {key!r}" for key in RUN_KEYS if info and key not in info]
    if missing:
        raise UserError(
            f"{run_dir} was written by an older version of dbr (no {', '.join(missing)}): "
            "re-run `dbr train` into a new --out"
        )
    config = load_config(artefacts.run_config_path(run_dir))
    weights = stage_weights(run_dir, info["model"])
    return EvalJob(
        run_dir=run_dir,
        dataset=info["dataset"],
        data=info["data"],
        target=info["target"],
        method=config.method,
        model=weights.model,
        adapter=weights.adapter,
        name=config.method,
        holdout_fraction=config.holdout_fraction,
        seed=config.seed,
        config=config,
    )


def zeroshot_name(model: str) -> str:
    """`OpenGVLab/InternVL3-8B-hf` -> `InternVL3-8B-hf`, safe as a folder name."""
    return re.sub(r"[^\w.-]+", "-", Path(model.rstrip("/")).name).strip("-") or "model"


def zeroshot_info(job: EvalJob) -> dict[str, Any]:
    """The run.json of a zero-shot folder: which model on which data, so two never share one."""
    return {
        "dataset": job.dataset,
        "data": job.data,
        "target": job.target,
        "model": job.model,
        "adapter": str(job.adapter) if job.adapter else None,
        "method": ZEROSHOT,
        "name": job.name,
    }


def job_for_model(request: ZeroShotRequest) -> EvalJob:
    """Any model, as is (or with an adapter), in `<out>/<DATASET>/<target>/zeroshot-<name>/`."""
    spec = get_spec(request.dataset)
    name = zeroshot_name(request.name or request.model)
    run_dir = artefacts.run_dir(request.out, spec.name, request.target, f"{ZEROSHOT}-{name}")
    job = EvalJob(
        run_dir, spec.name, request.data, request.target, ZEROSHOT, request.model,
        Path(request.adapter) if request.adapter else None, name,
    )  # fmt: skip
    saved = atomic.read_json(artefacts.run_info_path(run_dir))
    if saved and saved != zeroshot_info(job):
        raise UserError(
            f"{run_dir} holds the evaluation of another model or dataset ({saved.get('model')} on "
            f"{saved.get('data')}): pass another --name"
        )
    return job


# --- running a job -------------------------------------------------------------------------------


def default_modes(method: str) -> tuple[str, ...]:
    """The modes a method's training taught: both for mtct/rd-mldg (and zero-shot), its own for one path."""
    return DEFAULT_MODES.get(method, tuple(MODES))


def job_modes(job: EvalJob, settings: EvalSettings) -> tuple[str, ...]:
    modes = settings.modes or default_modes(job.method)
    _check_modes(modes)
    return tuple(modes)


def job_splits(job: EvalJob, settings: EvalSettings) -> tuple[str, ...]:
    splits = settings.splits or (("test",) if job.method == ZEROSHOT else SPLITS)
    unknown = [name for name in splits if name not in SPLITS]
    if unknown:
        raise UserError(f"unknown split(s) {', '.join(unknown)}: choose from {', '.join(SPLITS)}")
    if job.method == ZEROSHOT and "validation" in splits:
        raise UserError(
            "a zero-shot evaluation has no training to select a model for: evaluate --splits test"
        )
    return tuple(splits)


def job_selection(job: EvalJob, settings: EvalSettings) -> str | None:
    """The model selection rule: --selection, else the run's; None for a zero-shot model (no training)."""
    if job.method == ZEROSHOT:
        if settings.selection not in (None, LAST):
            raise UserError("a zero-shot evaluation has no checkpoints to select from: drop --selection")
        return None
    return check_selection(settings.selection or job.config.model_selection)


def _check_modes(modes: Sequence[str]) -> None:
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise UserError(
            f"unknown mode(s) {', '.join(unknown) or '(none)'}: choose from {', '.join(MODES)}"
        )


def _settings_record(job: EvalJob, settings: EvalSettings) -> dict[str, Any]:
    """What the predictions depend on; a resumed evaluation must not mix two of these."""
    return {
        "engine": settings.engine.kind,
        "engine_options": job_engine(job, settings).record(),
        "model": job.model,
        "adapter": str(job.adapter) if job.adapter else None,
        "max_new_tokens": {
            "direct": settings.direct_tokens,
            "reasoning": settings.reasoning_tokens,
        },
        "prompts": {mode: load_prompt(PROMPT_OF_TASK[MODES[mode]]).version for mode in MODES},
        "selection": job_selection(job, settings),
    }


def check_eval_dir(job: EvalJob, settings: EvalSettings) -> None:
    """Refuse to overwrite a finished evaluation, or to resume one made with other settings."""
    if settings.force:
        return
    if artefacts.metrics_path(job.eval_dir).is_file():
        raise UserError(
            f"{job.eval_dir} already holds a finished evaluation: pass --force to evaluate again"
        )
    record = _settings_record(job, settings)
    saved = atomic.read_json(artefacts.eval_settings_path(job.eval_dir))
    if saved and saved != record:
        changed = ", ".join(sorted(key for key in record if saved.get(key) != record[key]))
        raise UserError(
            f"{job.eval_dir} holds an unfinished evaluation with other settings ({changed}): "
            "pass --force to start over"
        )


def start_eval_dir(job: EvalJob, settings: EvalSettings) -> None:
    """--force starts over; the settings are recorded before the first prediction."""
    if settings.force:
        shutil.rmtree(job.eval_dir, ignore_errors=True)
    if job.method == ZEROSHOT:
        atomic.write_json(artefacts.run_info_path(job.run_dir), zeroshot_info(job))
    atomic.write_json(artefacts.eval_settings_path(job.eval_dir), _settings_record(job, settings))


def load_job_splits(job: EvalJob, splits: Sequence[str], cache_dir: Path | None) -> DatasetDict:
    """The run's own LODO split; a dataset that changed since training is refused."""
    loaded = load_lodo(job.data, job.dataset, job.target, job.holdout_fraction, job.seed, cache_dir)
    saved = artefacts.split_path(job.run_dir)
    if job.method != ZEROSHOT:
        assigned = pl.read_parquet(saved)
        for name in splits:
            expected = set(assigned.filter(pl.col("split") == name)["id"])
            if set(loaded[name]["id"]) != expected:
                raise UserError(
                    f"{job.data} no longer gives the {name} split recorded in {saved}: evaluate with the "
                    "dataset version the run was trained on"
                )
    return DatasetDict({name: loaded[name] for name in splits})


def job_engine(job: EvalJob, settings: EvalSettings) -> EngineSettings:
    """The engine's settings: the flags given, then what the run trained with (image limits, vLLM's context)."""
    return settings.engine.filled_from(job.config)


def score_splits(
    job: EvalJob,
    engine: Callable[[], GenerationEngine],
    splits: DatasetDict,
    settings: EvalSettings,
    folder: Path,
    classes: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Every (split, mode) scored, predictions in `folder` (those already there are kept), each rank
    its share. `engine()` gives the engine, opened at its first call: a resumed evaluation with every
    prediction on disk loads no model."""
    state = process_state()
    tokens = {"direct": settings.direct_tokens, "reasoning": settings.reasoning_tokens}
    unit = batch_unit(job_engine(job, settings))
    progress = settings.progress and state.is_main_process
    results: dict[str, dict[str, Any]] = {}
    for split_name, split in splits.items():
        for mode in job_modes(job, settings):
            ask = mode_ask(split, classes, mode, tokens[mode])
            path = artefacts.predictions_path(folder, split_name, mode)
            predictions = generated_table(state, path, split, ask, unit, engine, progress)
            results.setdefault(split_name, {})[mode] = score(predictions, classes)
    return results


def run_job(
    job: EvalJob,
    engine: Callable[[], GenerationEngine],
    splits: DatasetDict,
    settings: EvalSettings,
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate every (split, mode) not already on disk, then write metrics.json; `selection` says
    how the weights were chosen (selection.py), None for a zero-shot model."""
    state = process_state()
    classes = class_names(splits["test"])
    results = score_splits(job, engine, splits, settings, job.eval_dir, classes)
    metrics = {
        "format": EVAL_FORMAT,
        "dataset": job.dataset,
        "target": job.target,
        "method": job.method,
        "name": job.name,
        "model": job.model,
        "adapter": str(job.adapter) if job.adapter else None,
        "classes": classes,
        "settings": _settings_record(job, settings),
        "selection": selection,
        "results": results,
    }
    if state.is_main_process:
        atomic.write_json(artefacts.metrics_path(job.eval_dir), metrics)
    state.wait_for_everyone()
    return metrics


def budget_asks(
    modes: Sequence[str], classes: Sequence[str], settings: EvalSettings
) -> list[tuple[str, str, int]]:
    """(what, prompt, max new tokens) of each mode's requests, for token_budget.check_budget."""
    tokens = {"direct": settings.direct_tokens, "reasoning": settings.reasoning_tokens}
    return [
        (f"evaluation ({mode} mode)", task_prompt(MODES[mode], classes), tokens[mode])
        for mode in modes
    ]


def check_eval_budget(job: EvalJob, settings: EvalSettings, classes: Sequence[str]) -> None:
    """Every mode's longest request fits the engine's context, checked before any weights load."""
    engine = job_engine(job, settings)
    context = engine_context(engine, job.model)
    if context is None:
        return
    processor = load_processor(job.model, engine.image_limits)
    fix = (
        f"raise --max-model-len (now {context}), or lower --max-new-tokens"
        if engine.kind == "vllm"
        else "lower --max-new-tokens, or the run's image_max_tiles / image_max_pixels"
    )
    for what, prompt, new_tokens in budget_asks(job_modes(job, settings), classes, settings):
        check_budget(processor, prompt, new_tokens, context, f"{what} with the {engine.kind} engine", fix)


def with_weights(job: EvalJob, weights: TrainedWeights) -> EvalJob:
    return dataclasses.replace(job, model=weights.model, adapter=weights.adapter)


def select_checkpoint(
    job: EvalJob, validation: Dataset, settings: EvalSettings, engine: EngineSettings
) -> tuple[EvalJob, dict[str, Any]]:
    """DomainBed's training-domain validation: the kept checkpoint that scores best on `validation`."""
    checkpoints = kept_checkpoints(job.run_dir, job.method)
    modes = job_modes(job, settings)
    cost = SelectionCost(len(checkpoints), len(validation), len(modes))
    state = process_state()
    if state.is_main_process:
        console.print(cost.line(), highlight=False)
    classes = class_names(validation)
    weights = TrainedWeights(job.model, job.adapter)
    accuracy: dict[str, float] = {}
    for checkpoint in checkpoints:
        candidate = with_weights(job, checkpoint_weights(checkpoint, weights))
        folder = artefacts.selection_dir(job.eval_dir, checkpoint.name)
        # Each checkpoint is served from a merge folder of its own: a process still on the
        # checkpoint before can never hand the next one its merged weights.
        step = engine.for_step(folder, state.process_index, state.num_processes)
        with OnDemand(lambda c=candidate, s=step: open_engine(s, c.model, c.adapter)) as model:
            results = score_splits(
                candidate, model.get, DatasetDict({"validation": validation}), settings, folder, classes
            )
        if state.is_local_main_process:
            discard_merged(step.merge_dir)
        accuracy[checkpoint.name] = fmean(
            results["validation"][mode]["accuracy"] or 0.0 for mode in modes
        )
    by_name = {checkpoint.name: checkpoint for checkpoint in checkpoints}
    selected = with_weights(job, checkpoint_weights(by_name[best_checkpoint(accuracy)], weights))
    record = {
        "rule": TRAINING_DOMAIN,
        "selected": best_checkpoint(accuracy),
        "validation_accuracy": accuracy,
        "cost": cost.record(),
    }
    return selected, record


def _evaluate(job: EvalJob, settings: EvalSettings) -> dict[str, Any]:
    """Every input checked and the data loaded before anything is written or a model loads."""
    job_modes(job, settings)
    check_eval_dir(job, settings)
    rule = job_selection(job, settings)
    if rule == TRAINING_DOMAIN:
        kept_checkpoints(job.run_dir, job.method)
    names = job_splits(job, settings)
    if rule == TRAINING_DOMAIN and "validation" not in names:
        names = (*names, "validation")  # the selection's own split, reported for the chosen weights
    splits = load_job_splits(job, names, settings.cache_dir)
    check_eval_budget(job, settings, class_names(splits["test"]))
    state = process_state()
    if state.is_main_process:
        start_eval_dir(job, settings)
    state.wait_for_everyone()
    engine = job_engine(job, settings)
    selection = None if rule is None else {"rule": LAST}
    if rule == TRAINING_DOMAIN:
        job, selection = select_checkpoint(job, splits["validation"], settings, engine)
    engine = engine.for_step(job.eval_dir, state.process_index, state.num_processes)
    with OnDemand(lambda: open_engine(engine, job.model, job.adapter)) as model:
        metrics = run_job(job, model.get, splits, settings, selection)
    if state.is_local_main_process:
        discard_merged(engine.merge_dir)
    return metrics


def evaluate_run(run_dir: Path, settings: EvalSettings | None = None) -> dict[str, Any]:
    """Evaluate a finished training run's weights on its held-out domain (and validation split)."""
    return _evaluate(job_for_run(run_dir), settings or EvalSettings())


def evaluate_model(
    request: ZeroShotRequest, settings: EvalSettings | None = None
) -> dict[str, Any]:
    """Evaluate any model (a checkpoint, a Hub id, a remote API's model) on the LODO test split."""
    return _evaluate(job_for_model(request), settings or EvalSettings())


def evaluate_command(
    run: Path | None, zero_shot: ZeroShotRequest | None, settings: EvalSettings
) -> dict[str, Any]:
    """`dbr eval`: a trained run, or any model zero-shot (exactly one of the two), then its table."""
    if (run is None) == (zero_shot is None):
        raise UserError("pass --run RUN_DIR (a trained run) or --model MODEL (any model, zero-shot), not both")
    metrics = evaluate_run(run, settings) if run is not None else evaluate_model(zero_shot, settings)
    if process_state().is_main_process:
        print_metrics(metrics)
    return metrics


def print_metrics(metrics: dict[str, Any]) -> None:
    selection = metrics.get("selection")
    rule = f" / model selection {selection['rule']}" if selection else ""
    if selection and selection.get("selected"):
        rule += f" ({selection['selected']})"
    table = Table(title=f"{metrics['dataset']} / held-out {metrics['target']} / {metrics['name']}{rule}")
    for column in ("split", "mode", "images", "accuracy", "unparseable"):
        table.add_column(column)
    for split, by_mode in metrics["results"].items():
        for mode, scores in by_mode.items():
            table.add_row(
                split, mode, str(scores["n"]), f"{100 * scores['accuracy']:.2f}%", str(scores["unparseable"])
            )
    console.print(table)

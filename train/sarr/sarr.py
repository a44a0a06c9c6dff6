"""RD-MLDG stage 2, SARR: rounds of self-labelling and MTCT on the model's own label-consistent chains.

Round 0 is MTCT on the teacher's chains. Round r (1..N) lets the round r-1 model
(base + its adapter, or its fully fine-tuned checkpoint) write K chains per training
image with the reasoning prompt training uses, keeps them under the builder's filter
(self_label.py), and trains MTCT again on the merged chains - from the base model, or
from the previous round's weights with `sarr_init: continue`. Round 0 can be a finished
MTCT run's, copied instead of retrained (`sarr_round0_from`, round_zero.py).

The run folder `<out>/<DATASET>/<target>/rd-mldg/` holds round-<r>/ folders laid
out as `train_stage` writes a stage (adapter/ or model/, metrics.json, checkpoints/, logs/),
plus self_labels.parquet and self_label_stats.json for r >= 1. Under several
processes every rank labels its own share of the images and rank 0 merges the parts
(sharding.py). `state.json` lists the finished steps and is rewritten atomically after
each one, so a killed run resumes at the step it was in: a finished self-labelling is
never redone, an unfinished one keeps the ranks' finished parts and redoes the rest,
and an unfinished training resumes from its checkpoint.

Images without a teacher chain (the teacher's candidates were all rejected) are
labelled too: a label-consistent chain of the model's own gives them a reasoning path
from the next round on; without one they keep training the classification path only. When every round is done the last round's weights are copied to
`adapter/` (or `model/`) and `metrics.json` is written, which is what `dbr eval` reads, as for
any other method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import polars as pl
from datasets import Dataset
from domainbed_reasoning.train.engines.base import Generation, OnDemand, SamplingSpec
from domainbed_reasoning.train.engines.factory import batch_unit, open_engine
from domainbed_reasoning.train.engines.merge import discard_merged
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.model.weights import TrainedWeights, find_weights, stage_weights
from domainbed_reasoning.train.mtct.mtct_data import build_examples, class_names, task_prompt
from domainbed_reasoning.train.sarr.round_zero import adopt_round_zero, copy_folder
from domainbed_reasoning.train.sarr.self_label import (
    SCHEMA,
    Supervised,
    merge_self_labels,
    self_label_stats,
)
from domainbed_reasoning.train.sarr.sharding import Ask, generated_table, process_state
from domainbed_reasoning.train.stages.stage import (
    Prepared,
    StageResult,
    TrainRequest,
    model_card,
    release_memory,
    train_stage,
    write_inputs,
)
from rich.console import Console

from domainbed_reasoning import artefacts, atomic
from domainbed_reasoning.chains.matching import matcher_for
from domainbed_reasoning.errors import UserError

STATE_VERSION = 1

console = Console(stderr=True)


@dataclass(frozen=True)
class Step:
    round: int
    kind: str  # "self_label" or "train"

    @property
    def name(self) -> str:
        return f"round-{self.round}/{self.kind}"


def plan(rounds: int) -> list[Step]:
    """Every step of a run, in order: round 0 trains on the teacher's chains, later rounds label then train."""
    return [Step(0, "train")] + [
        Step(r, kind) for r in range(1, rounds + 1) for kind in ("self_label", "train")
    ]


# --- the run's state ------------------------------------------------------------------------------


def load_state(run_dir: Path, rounds: int, resume: bool) -> list[str]:
    """The finished steps, after checking the folder is this version's and still holds what they wrote."""
    path = artefacts.sarr_state_path(run_dir)
    if not path.is_file():
        leftovers = [child.name for child in artefacts.round_dirs(run_dir)]
        if leftovers:
            raise UserError(
                f"{run_dir} holds {', '.join(leftovers)} but no {path.name}: it was written by an older "
                "version of dbr or is damaged; train into another --out or delete the folder"
            )
        return []
    if not resume:
        raise UserError(
            f"{run_dir} holds an unfinished rd-mldg run: pass --resume to continue it, or delete the folder"
        )
    state = atomic.read_json(path, "delete the run folder and train again")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else None
        raise UserError(
            f"{path} has state version {found}, this dbr reads version {STATE_VERSION}: "
            "finish the run with the dbr that started it, or train into another --out"
        )
    done = list(state.get("done", []))
    names = [step.name for step in plan(rounds)]
    if done != names[: len(done)]:
        raise UserError(
            f"{path} lists steps {', '.join(done)}, not a start of this run's plan: delete the folder and train again"
        )
    for step in plan(rounds)[: len(done)]:
        _check_step_output(run_dir, step)
    return done


def _check_step_output(run_dir: Path, step: Step) -> None:
    folder = artefacts.round_dir(run_dir, step.round)
    labels = artefacts.self_labels_path(folder)
    if step.kind == "self_label":
        missing = not labels.is_file()
    else:
        missing = find_weights(folder, "") is None
    if missing:
        what = labels.name if step.kind == "self_label" else "trained weights (adapter/ or model/)"
        state_file = artefacts.sarr_state_path(run_dir).name
        raise UserError(
            f"{run_dir} is missing {folder.name}/{what}, which {state_file} lists as done: "
            "restore it, or delete the folder and train again"
        )


def save_state(run_dir: Path, done: list[str]) -> None:
    atomic.write_json(
        artefacts.sarr_state_path(run_dir), {"version": STATE_VERSION, "method": "rd-mldg", "done": done}
    )


# --- the training images --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingImages:
    """The images every round labels and trains on, and the classes their labels name."""

    subset: Dataset
    classes: list[str]


def training_subset(prepared: Prepared) -> Dataset:
    """The training images round 0 trained on (all, or the seeded `max_train_images` subset), in split order."""
    wanted = set(prepared.train_examples.unique("id"))
    return prepared.splits["train"].filter(
        lambda ids: [row_id in wanted for row_id in ids], batched=True, input_columns="id"
    )


def teacher_supervision(subset: Dataset, classes: list[str]) -> list[Supervised]:
    columns = subset.select_columns(["id", "label", "chain"]).to_dict()
    return [
        Supervised(row_id, classes[label], chain)
        for row_id, label, chain in zip(
            columns["id"], columns["label"], columns["chain"], strict=True
        )
    ]


def _supervision(run_dir: Path, round_: int, images: TrainingImages) -> list[Supervised]:
    """What the images trained on in `round_`: the teacher's chains in round 0, the merged self-labels after."""
    if round_ == 0:
        return teacher_supervision(images.subset, images.classes)
    frame = pl.read_parquet(artefacts.self_labels_path(artefacts.round_dir(run_dir, round_)))
    return [Supervised(*row) for row in frame.select("id", "class_name", "chain").iter_rows()]


# --- the steps ----------------------------------------------------------------------------------


def self_label_round(
    request: TrainRequest,
    run_dir: Path,
    round_: int,
    images: TrainingImages,
    engine: EngineSettings,
) -> dict[str, Any]:
    """Round `round_`'s self-labels from the round before's model; writes the table, then its stats."""
    config = request.config
    previous = {item.id: item for item in _supervision(run_dir, round_ - 1, images)}
    sampling = SamplingSpec(
        n=config.self_label_candidates,
        temperature=config.self_label_temperature,
        max_new_tokens=config.self_label_max_new_tokens,
        seed=config.seed,
        round=round_,
    )
    matcher = matcher_for(tuple(images.classes))

    def read(chunk: dict[str, list], generations: list[Generation]) -> pl.DataFrame:
        return merge_self_labels([previous[row_id] for row_id in chunk["id"]], generations, matcher)

    ask = Ask(task_prompt("reasoning", images.classes), sampling, (), read, SCHEMA)
    weights = stage_weights(artefacts.round_dir(run_dir, round_ - 1), request.model)
    state = process_state()
    console.print(
        f"round {round_}: {len(previous):,} training images x {sampling.n} chains with {engine.kind}"
        + (f", {state.num_processes} processes" if state.num_processes > 1 else ""),
        highlight=False,
    )
    folder = artefacts.round_dir(run_dir, round_)
    engine = engine.for_step(folder, state.process_index, state.num_processes)
    started = time.perf_counter()
    with OnDemand(lambda: open_engine(engine, weights.model, weights.adapter)) as model:
        frame = generated_table(
            state, artefacts.self_labels_path(folder), images.subset, ask, batch_unit(engine), model.get
        )
    if state.is_local_main_process:
        discard_merged(engine.merge_dir)
    seconds = time.perf_counter() - started
    stats = self_label_stats(frame) | {
        "round": round_,
        "engine": engine.kind,
        "candidates_per_image": sampling.n,
        "temperature": sampling.temperature,
        "max_new_tokens": sampling.max_new_tokens,
        "model": weights.model,
        "adapter": str(weights.adapter) if weights.adapter else None,
        "seconds": round(seconds, 2),
        "images_per_s": round(frame.height / seconds, 3) if seconds else None,
    }
    if state.is_main_process:
        atomic.write_json(artefacts.self_label_stats_path(folder), stats)
    state.wait_for_everyone()
    return stats


def train_round(
    request: TrainRequest, prepared: Prepared, round_: int, images: TrainingImages
) -> StageResult:
    """MTCT on round `round_`'s chains: the teacher's in round 0, the merged self-labels after."""
    config = request.config
    run_dir = prepared.run_dir
    folder = artefacts.round_dir(run_dir, round_)
    examples = prepared.train_examples
    if round_ > 0:
        chains = {item.id: item.chain for item in _supervision(run_dir, round_, images)}
        subset = images.subset
        relabelled = subset.remove_columns("chain").add_column(
            "chain", [chains[row_id] for row_id in subset["id"]], feature=datasets.Value("string")
        )
        examples = build_examples(relabelled, config.method, images.classes)
    start = (
        stage_weights(artefacts.round_dir(run_dir, round_ - 1), request.model)
        if round_ > 0 and config.sarr_init == "continue"
        else TrainedWeights(request.model)
    )
    card = model_card(request, prepared, sarr_round=round_)
    return train_stage(
        start.model,
        prepared.processor,
        examples,
        prepared.eval_examples,
        config,
        folder,
        card=card,
        init_adapter=start.adapter,
    )


# --- the run -----------------------------------------------------------------------------------


def train_sarr(
    request: TrainRequest, prepared: Prepared, engine: EngineSettings | None = None
) -> StageResult:
    """Run (or resume) every step of `plan`, then publish the last round's weights as the run's."""
    config = request.config
    run_dir = prepared.run_dir
    engine = engine or EngineSettings.for_run(config)
    done = _start(request, prepared)
    images = TrainingImages(training_subset(prepared), class_names(prepared.splits["train"]))
    for step in plan(config.sarr_rounds):
        if step.name not in done:
            run_step(step, request, prepared, images, engine)
            done.append(step.name)
            _save_progress(run_dir, done)
    state = process_state()
    if state.is_main_process:
        _finish(run_dir, config.sarr_rounds, request.model)
    state.wait_for_everyone()
    metrics = atomic.read_json(artefacts.metrics_path(run_dir))
    return StageResult(run_dir, stage_weights(run_dir, request.model), metrics)


def _start(request: TrainRequest, prepared: Prepared) -> list[str]:
    """The steps already done; the run's inputs and state written (again) by the main process."""
    done = load_state(prepared.run_dir, request.config.sarr_rounds, request.resume)
    state = process_state()
    # Every rank has read the folder before rank 0 writes to it: a rank reading after the
    # write would take this fresh run's state.json for an unfinished one.
    state.wait_for_everyone()
    if state.is_main_process:
        write_inputs(request, prepared)
        save_state(prepared.run_dir, done)
    return done


def run_step(
    step: Step,
    request: TrainRequest,
    prepared: Prepared,
    images: TrainingImages,
    engine: EngineSettings,
) -> None:
    """One step of the plan: self-label a round, adopt a finished round 0, or train a round."""
    config = request.config
    if step.kind == "self_label":
        self_label_round(request, prepared.run_dir, step.round, images, engine)
    elif step.round == 0 and config.sarr_round0_from:
        state = process_state()
        if state.is_main_process:
            adopt_round_zero(Path(config.sarr_round0_from), prepared.run_dir, config, request.model)
        state.wait_for_everyone()
    else:
        train_round(request, prepared, step.round, images)
    release_memory(f"{step.name}")


def _save_progress(run_dir: Path, done: list[str]) -> None:
    if process_state().is_main_process:
        save_state(run_dir, done)


def _finish(run_dir: Path, rounds: int, model: str) -> None:
    """Copy the last round's weights beside the run's files (complete or absent), then metrics.json,
    which marks the run done."""
    final = stage_weights(artefacts.round_dir(run_dir, rounds), model).folder
    copy_folder(final, run_dir / final.name)
    summary = []
    for round_ in range(rounds + 1):
        folder = artefacts.round_dir(run_dir, round_)
        trained = atomic.read_json(artefacts.metrics_path(folder))
        trained.pop("log_history", None)
        stats_path = artefacts.self_label_stats_path(folder)
        stats = atomic.read_json(stats_path) if stats_path.is_file() else None
        summary.append({"round": round_, "train": trained, "self_label": stats})
    atomic.write_json(
        artefacts.metrics_path(run_dir),
        {
            "method": "rd-mldg",
            "final_round": rounds,
            "weights": final.relative_to(run_dir).as_posix(),
            "rounds": summary,
        },
    )

"""Evaluation: answers read like the builder reads them, counts against a hand-made prediction set,
run folders refused when they cannot be evaluated, resume and --force, and one real run end to end.

The counting tests ask `AnswerEngine`, a small implementation of our own `GenerationEngine`
protocol that answers from a table, so every expected number is known by hand.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import datasets
import polars as pl
import pytest
from domainbed_reasoning.train.config import TrainConfig
from domainbed_reasoning.train.engines.base import Generation, GenRequest, SamplingSpec
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.engines.transformers_engine import TransformersEngine
from domainbed_reasoning.train.evaluation import evaluate as evaluate_module
from domainbed_reasoning.train.evaluation.evaluate import (
    EvalJob,
    EvalSettings,
    ZeroShotRequest,
    evaluate_model,
    evaluate_run,
    evaluate_split,
    job_for_run,
    run_job,
    score,
)
from domainbed_reasoning.train.evaluation.selection import best_checkpoint
from domainbed_reasoning.train.mtct.mtct_data import task_prompt
from domainbed_reasoning.train.stages.run import train
from PIL import Image
from typer.testing import CliRunner

from domainbed_reasoning.artefacts import predictions_path
from domainbed_reasoning.chains.chain_format import format_chain
from domainbed_reasoning.cli import app
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher

CLASSES = ("circle", "cross", "square", "star", "triangle")


class AnswerEngine:
    """Answers each image id from a table and records every request it was sent."""

    name = "answers"

    def __init__(self, answers: dict[str, Generation]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[GenRequest], SamplingSpec]] = []

    def generate(
        self, requests: Sequence[GenRequest], sampling: SamplingSpec, progress: bool = True
    ) -> list[Generation]:
        self.calls.append((list(requests), sampling))
        return [self.answers[request.id] for request in requests]

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def said(text: str, finish: str = "stop") -> Generation:
    return Generation((text,), (finish,))


def chain(conclusion: str, drop: str | None = None) -> str:
    stages = {
        "summary": "Decide the shape.",
        "caption": "One outlined shape.",
        "reasoning": "Its outline decides it.",
        "reflection": "Nothing else fits.",
        "conclusion": conclusion,
    }
    text = format_chain(stages)
    return text.replace(f"<{drop}>{stages[drop.lower()]}</{drop}>", "") if drop else text


# (domain, class) of the hand-made split, and what each mode answers for it
IMAGES = [
    ("photo", "circle"),
    ("photo", "cross"),
    ("photo", "square"),
    ("sketch", "star"),
    ("sketch", "triangle"),
    ("sketch", "circle"),
    ("sketch", "cross"),
]
FAILED = Generation.failed("HTTP 500 after 3 retries")
DIRECT = [
    said("circle"),  # right
    said("Square."),  # wrong: names another class
    said("  "),  # empty_response
    said("a star or a circle"),  # ambiguous
    said("banana"),  # no_class
    said("Circles", finish="length"),  # right: a direct answer is read even when cut
    FAILED,  # request_error
]
REASONING = [
    said(chain("circle")),  # right
    said(chain("square")),  # wrong_class: parsed, wrong
    said(chain("square", drop="REFLECTION")),  # missing_stage
    said(chain("star"), finish="length"),  # truncated: a cut chain is not read
    said("Sure. " + chain("Triangle.") + "\n**"),  # right: prose before, markup after the tags
    said(chain("not sure")),  # uncertain: a hedge names no class
    FAILED,  # request_error
]


def _id(index: int) -> str:
    domain, name = IMAGES[index]
    return f"SynthDG/{domain}/{name}/{index}.png"


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (30 * index, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def hand_split() -> datasets.Dataset:
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "domain": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(CLASSES)),
            "image": datasets.Image(),
        }
    )
    rows = [
        {
            "id": _id(i),
            "domain": d,
            "label": CLASSES.index(c),
            "image": {"bytes": _png(i), "path": None},
        }
        for i, (d, c) in enumerate(IMAGES)
    ]
    return datasets.Dataset.from_list(rows, features=features)


def engine_for(answers: list[Generation]) -> AnswerEngine:
    return AnswerEngine({_id(index): answer for index, answer in enumerate(answers)})


# --- counting -----------------------------------------------------------------------------------


def test_direct_mode_counts_against_hand_made_answers() -> None:
    engine = engine_for(DIRECT)
    result = evaluate_split(engine, hand_split(), CLASSES, "direct", max_new_tokens=16)
    metrics = result.metrics
    assert (metrics["n"], metrics["correct"], metrics["unparseable"]) == (7, 2, 4)
    assert metrics["accuracy"] == pytest.approx(2 / 7)
    assert metrics["unparseable_reasons"] == {
        "ambiguous": 1,
        "empty_response": 1,
        "no_class": 1,
        "request_error": 1,
    }
    assert metrics["per_domain"] == {
        "photo": {"n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3)},
        "sketch": {"n": 4, "correct": 1, "accuracy": 0.25},
    }
    assert metrics["per_class"]["circle"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    assert metrics["per_class"]["cross"] == {"n": 2, "correct": 0, "accuracy": 0.0}
    assert metrics["confusion"]["columns"] == [*CLASSES, "unparseable"]
    assert metrics["confusion"]["counts"] == [
        [2, 0, 0, 0, 0, 0],  # circle: both right
        [0, 0, 1, 0, 0, 1],  # cross: called a square once, one request failed
        [0, 0, 0, 0, 0, 1],  # square: empty answer
        [0, 0, 0, 0, 0, 1],  # star: ambiguous
        [0, 0, 0, 0, 0, 1],  # triangle: no class named
    ]
    # the model is asked greedily, with the training's own classification prompt and the stored bytes
    ((requests, sampling),) = engine.calls
    assert sampling == SamplingSpec(n=1, temperature=0.0, max_new_tokens=16)
    assert {request.prompt for request in requests} == {task_prompt("cls", CLASSES)}
    assert [request.image for request in requests] == [_png(i) for i in range(len(IMAGES))]


def test_reasoning_mode_reads_answers_as_the_builders_filter_does() -> None:
    engine = engine_for(REASONING)
    result = evaluate_split(engine, hand_split(), CLASSES, "reasoning", max_new_tokens=64)
    predictions = result.predictions
    assert predictions["predicted"].to_list() == [
        "circle",
        "square",
        None,
        None,
        "triangle",
        None,
        None,
    ]
    assert predictions["correct"].to_list() == [True, False, False, False, True, False, False]
    assert predictions["failure"].to_list() == [
        None, None, "missing_stage", "truncated", None, "uncertain", "request_error",
    ]  # fmt: skip
    assert predictions["error"].to_list()[-1] == "HTTP 500 after 3 retries"
    assert set(predictions["mode"]) == {"reasoning"}
    assert predictions.select("id", "domain", "class_name", "label").rows()[1] == (
        _id(1), "photo", "cross", 1,
    )  # fmt: skip
    metrics = result.metrics
    assert (metrics["correct"], metrics["unparseable"]) == (2, 4)
    assert metrics["confusion"]["counts"][1] == [0, 0, 1, 0, 0, 1]
    assert {request.prompt for request in engine.calls[0][0]} == {task_prompt("reasoning", CLASSES)}


def test_score_of_an_empty_class_has_no_accuracy() -> None:
    predictions = evaluate_split(
        engine_for(DIRECT), hand_split(), CLASSES, "direct", 16
    ).predictions
    metrics = score(predictions.filter(pl.col("class_name") != "star"), CLASSES)
    assert metrics["per_class"]["star"] == {"n": 0, "correct": 0, "accuracy": None}
    assert metrics["n"] == 6 and sum(map(sum, metrics["confusion"]["counts"])) == 6


def test_unknown_mode_and_missing_columns_are_refused() -> None:
    with pytest.raises(UserError, match="unknown mode\\(s\\) cot: choose from direct, reasoning"):
        evaluate_split(engine_for(DIRECT), hand_split(), CLASSES, "cot", 16)
    with pytest.raises(UserError, match="the split to evaluate has no domain column\\(s\\)"):
        evaluate_split(
            engine_for(DIRECT), hand_split().remove_columns("domain"), CLASSES, "direct", 16
        )


# --- run folders: what cannot be evaluated ------------------------------------------------------------


def _finished_run(root: Path, **skip: bool) -> Path:
    """The files a finished `dbr train` leaves, minus the ones named in `skip`."""
    run_dir = root / "SynthDG" / "sketch" / "mtct"
    run_dir.mkdir(parents=True)
    files = {
        "metrics": ("metrics.json", "{}"),
        "adapter": ("adapter/adapter_config.json", "{}"),
        "run": (
            "run.json",
            json.dumps({"dataset": "SynthDG", "data": "x", "target": "sketch", "model": "m"}),
        ),
        "config": ("config.yaml", "method: mtct\n"),
        "split": ("split.parquet", None),
    }
    for key, (name, text) in files.items():
        if skip.get(key):
            continue
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            pl.DataFrame({"id": ["a"], "split": ["test"]}).write_parquet(run_dir / name)
        else:
            (run_dir / name).write_text(text)
    return run_dir


@pytest.mark.parametrize(
    ("skip", "message"),
    [
        (
            {"metrics": True},
            "has no metrics.json, its training never finished: run `dbr train` first",
        ),
        (
            {"adapter": True},
            "has no trained weights \\(adapter/adapter_config.json or model/config.json\\): run `dbr train` first",
        ),
        (
            {"split": True},
            "was written by an older version of dbr \\(no split.parquet\\): re-run `dbr train`",
        ),
        ({"run": True, "config": True}, "older version of dbr \\(no run.json, config.yaml\\)"),
    ],
)
def test_unfinished_or_old_run_folders_are_refused(
    tmp_path: Path, skip: dict, message: str
) -> None:
    run_dir = _finished_run(tmp_path, **skip)
    before = sorted(path.name for path in run_dir.rglob("*"))
    with pytest.raises(UserError, match=message):
        evaluate_run(run_dir)
    assert sorted(path.name for path in run_dir.rglob("*")) == before


def test_run_json_without_its_keys_is_an_old_layout(tmp_path: Path) -> None:
    run_dir = _finished_run(tmp_path)
    (run_dir / "run.json").write_text(json.dumps({"dataset": "SynthDG", "target": "sketch"}))
    with pytest.raises(
        UserError, match="older version of dbr \\(no run.json key 'data', run.json key 'model'\\)"
    ):
        job_for_run(run_dir)


def test_missing_run_folder_and_zero_shot_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match="run folder .*nowhere not found: pass a folder `dbr train` wrote"
    ):
        evaluate_run(tmp_path / "nowhere")
    zeroshot = tmp_path / "zeroshot-gpt-4o"
    zeroshot.mkdir()
    (zeroshot / "run.json").write_text(json.dumps({"method": "zeroshot", "model": "gpt-4o"}))
    with pytest.raises(
        UserError, match="is a zero-shot evaluation of gpt-4o, a model without adapter"
    ):
        evaluate_run(zeroshot)


@pytest.mark.parametrize(
    ("kind", "flags", "message"),
    [
        ("remote", {}, "the remote engine needs --base-url"),
        (
            "transformers",
            {"base_url": "http://x/v1"},
            "--base-url do\\(es\\) not apply to the transformers engine",
        ),
        ("vllm", {"batch_size": 4}, "--batch-size do\\(es\\) not apply to the vllm engine"),
    ],
)
def test_engine_flags_must_fit_the_engine(kind: str, flags: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        EngineSettings(kind, **flags)


def test_engine_flags_pass_through_and_the_run_fills_the_rest() -> None:
    assert EngineSettings("remote", base_url="http://h/v1", api_key_env="KEY").options() == {
        "base_url": "http://h/v1",
        "api_key_env": "KEY",
    }
    given = EngineSettings("transformers", batch_size=2)
    filled = given.filled_from(TrainConfig(generation_batch_size=5, image_max_tiles=3))
    assert (filled.batch_size, filled.image_limits.max_tiles) == (2, 3)


@pytest.mark.parametrize(("bf16", "dtype"), [("true", "bfloat16"), ("false", "float32")])
@pytest.mark.parametrize("kind", ["transformers", "vllm"])
def test_the_engines_serve_in_the_dtype_the_run_trained_in(kind: str, bf16: str, dtype: str) -> None:
    """`bf16: false` trains in float32; self-labelling and evaluation must not quietly use bf16."""
    assert EngineSettings(kind).filled_from(TrainConfig(bf16=bf16)).dtype == dtype
    assert EngineSettings(kind, dtype="float32").filled_from(TrainConfig(bf16="true")).dtype == "float32"


# --- resume and --force (AnswerEngine, hand-made split) -----------------------------------------------


def test_run_job_resumes_from_finished_predictions(tmp_path: Path) -> None:
    job = EvalJob(tmp_path / "run", "SynthDG", "x", "sketch", "mtct", "m", None, "mtct")
    splits = datasets.DatasetDict({"test": hand_split()})
    settings = EvalSettings(splits=("test",))
    engine = engine_for(REASONING)  # one answer per image serves both passes
    first = run_job(job, lambda: engine, splits, settings)
    assert [sampling.max_new_tokens for _, sampling in engine.calls] == [32, 1024]
    assert set(first["results"]["test"]) == {"direct", "reasoning"}
    assert first["format"] == 1 and first["method"] == "mtct" and first["classes"] == list(CLASSES)
    # a run killed after the direct pass: only the reasoning pass is asked again
    predictions_path(job.eval_dir, "test", "reasoning").unlink()
    (job.eval_dir / "metrics.json").unlink()
    second = run_job(job, lambda: engine, splits, settings)
    assert len(engine.calls) == 3 and engine.calls[-1][1].max_new_tokens == 1024
    assert second["results"] == first["results"]


# --- a real run, the transformers engine ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(
    export_dir: Path, tiny_qwen2vl: Path, train_request, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return train(train_request(export_dir, tiny_qwen2vl, out, max_steps=1, save_steps=10)).run_dir


def fast(tmp_path: Path, **changes) -> EvalSettings:
    """Short answers, and a `datasets` cache of the test's own under tmp_path."""
    values = {
        "direct_tokens": 4,
        "reasoning_tokens": 12,
        "cache_dir": tmp_path / "hf",
        "progress": False,
    }
    return EvalSettings(**(values | changes))


def test_evaluate_run_end_to_end_with_the_transformers_engine(
    trained_run: Path, tmp_path: Path
) -> None:
    metrics = evaluate_run(trained_run, fast(tmp_path))
    eval_dir = trained_run / "eval"
    split = pl.read_parquet(trained_run / "split.parquet")
    assert set(metrics["results"]) == {"test", "validation"}
    for name in ("test", "validation"):
        ids = set(split.filter(pl.col("split") == name)["id"])
        for mode in ("direct", "reasoning"):
            predictions = pl.read_parquet(predictions_path(eval_dir, name, mode))
            scores = metrics["results"][name][mode]
            assert set(predictions["id"]) == ids and scores["n"] == len(ids)
            assert scores["correct"] == predictions["correct"].sum()
            assert scores["unparseable"] == predictions["failure"].is_not_null().sum()
            assert sum(map(sum, scores["confusion"]["counts"])) == len(ids)
    assert set(metrics["results"]["test"]["direct"]["per_domain"]) == {"sketch"}
    assert "sketch" not in metrics["results"]["validation"]["direct"]["per_domain"]
    assert json.loads((eval_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (
        metrics["adapter"] == str(trained_run / "adapter")
        and metrics["settings"]["engine"] == "transformers"
    )

    # a finished evaluation is never overwritten without --force, nor resumed with other settings
    finished = (eval_dir / "metrics.json").read_bytes()
    with pytest.raises(UserError, match="already holds a finished evaluation: pass --force"):
        evaluate_run(trained_run, fast(tmp_path))
    assert (eval_dir / "metrics.json").read_bytes() == finished
    (eval_dir / "metrics.json").unlink()
    with pytest.raises(
        UserError, match="unfinished evaluation with other settings \\(max_new_tokens\\)"
    ):
        evaluate_run(trained_run, fast(tmp_path, reasoning_tokens=13))
    forced = evaluate_run(
        trained_run, fast(tmp_path, force=True, modes=("direct",), splits=("test",))
    )
    assert set(forced["results"]) == {"test"} and set(forced["results"]["test"]) == {"direct"}
    assert sorted(path.name for path in eval_dir.glob("predictions-*")) == [
        "predictions-test-direct.parquet"
    ]


def test_a_changed_dataset_is_refused(trained_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    split = pl.read_parquet(copy / "split.parquet")
    moved = pl.when(pl.col("split") == "train").then(pl.lit("validation")).otherwise("split")
    split.with_columns(moved.alias("split")).write_parquet(copy / "split.parquet")
    with pytest.raises(UserError, match="no longer gives the validation split recorded in"):
        evaluate_run(copy, fast(tmp_path))
    assert not (copy / "eval").exists()


def test_zero_shot_through_the_cli(export_dir: Path, tiny_qwen2vl: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = [
        "eval", "--dataset", "SynthDG", "--data", str(export_dir), "--target", "sketch",
        "--model", str(tiny_qwen2vl), "--name", "tiny base", "--modes", "direct", "--out", str(out),
        "--direct-tokens", "4", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_dir = out / "SynthDG" / "sketch" / "zeroshot-tiny-base"
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["method"] == "zeroshot" and metrics["name"] == "tiny-base"
    # all 10 sketch images the scan found, the one without an accepted chain included (DomainBed's protocol)
    assert set(metrics["results"]) == {"test"} and metrics["results"]["test"]["direct"]["n"] == 10
    assert json.loads((run_dir / "run.json").read_text())["model"] == str(tiny_qwen2vl)

    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, UserError)
    assert "already holds a finished evaluation: pass --force" in str(again.exception)
    with pytest.raises(UserError, match="holds the evaluation of another model or dataset"):
        evaluate_model(
            ZeroShotRequest(
                "SynthDG", str(export_dir), "sketch", "other/model", out, name="tiny base"
            )
        )
    with pytest.raises(
        UserError, match="a zero-shot evaluation has no training to select a model for"
    ):
        evaluate_model(
            ZeroShotRequest(
                "SynthDG", str(export_dir), "sketch", str(tiny_qwen2vl), out, name="val"
            ),
            fast(tmp_path, splits=("test", "validation")),
        )


def test_zero_shot_of_a_remote_openai_compatible_model(export_dir: Path, tmp_path: Path) -> None:
    """The simulated teacher knows every SynthDG image: its chains must all be read as right."""
    with run_sim_teacher(SimTeacherConfig(), export_dir.parent / "data") as base_url:
        request = ZeroShotRequest(
            "SynthDG", str(export_dir), "sketch", "sim-teacher", tmp_path, "sim"
        )
        remote = {"engine": EngineSettings("remote", base_url=base_url)}
        settings = fast(tmp_path, **remote, modes=("reasoning",), reasoning_tokens=1024)
        metrics = evaluate_model(request, settings)
    scores = metrics["results"]["test"]["reasoning"]
    assert (scores["n"], scores["correct"], scores["unparseable"]) == (10, 10, 0)
    assert metrics["settings"]["engine"] == "remote" and metrics["model"] == "sim-teacher"
    # cut at the token limit, the same chains are unparseable: a conclusion is never guessed
    with run_sim_teacher(SimTeacherConfig(), export_dir.parent / "data") as base_url:
        remote = {"engine": EngineSettings("remote", base_url=base_url)}
        truncated = evaluate_model(
            request, fast(tmp_path, **remote, modes=("reasoning",), force=True)
        )
    assert truncated["results"]["test"]["reasoning"]["unparseable_reasons"] == {"truncated": 10}


def test_cli_needs_a_run_or_a_model(tmp_path: Path) -> None:
    for args, message in (
        (["eval"], "pass --run RUN_DIR (a trained run) or --model"),
        (
            ["eval", "--run", str(tmp_path), "--model", "m"],
            "pass --run RUN_DIR (a trained run) or --model",
        ),
        (["eval", "--model", "m"], "--model needs --dataset and --target"),
    ):
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, UserError) and message in str(result.exception), (
            result.output
        )


# --- model selection --------------------------------------------------------------------------------


def dbr(*argv: str) -> str:
    result = CliRunner().invoke(app, list(argv), env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_the_best_checkpoint_wins_and_a_tie_goes_to_the_later_one() -> None:
    assert best_checkpoint({"checkpoint-1": 0.7, "checkpoint-2": 0.5}) == "checkpoint-1"
    assert best_checkpoint({"checkpoint-1": 0.5, "checkpoint-2": 0.5, "checkpoint-3": 0.1}) == "checkpoint-2"


@pytest.fixture(scope="module")
def selected_run(
    export_dir: Path, tiny_qwen2vl: Path, train_request, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """2 steps, a checkpoint after each, trained with model_selection: training-domain."""
    out = tmp_path_factory.mktemp("selection")
    request = train_request(export_dir, tiny_qwen2vl, out, model_selection="training-domain")
    return train(request).run_dir


def test_training_domain_selection_tests_the_best_checkpoint_on_validation_and_says_its_cost(
    selected_run: Path,
) -> None:
    flags = ["--direct-tokens", "4", "--max-new-tokens", "8", "--no-progress"]
    output = dbr("eval", "--run", str(selected_run), *flags)
    validation = pl.read_parquet(selected_run / "split.parquet").filter(pl.col("split") == "validation").height
    line = (
        f"model selection training-domain: 2 checkpoint(s) x {validation} validation images x 2 mode(s) = "
        f"{4 * validation} generations before the test"
    )
    assert line in output
    metrics = json.loads((selected_run / "eval" / "metrics.json").read_text())
    selection = metrics["selection"]
    assert selection["rule"] == "training-domain"
    assert list(selection["validation_accuracy"]) == ["checkpoint-1", "checkpoint-2"]
    assert selection["cost"] == {
        "checkpoints": 2, "validation_images": validation, "modes": 2, "generations": 4 * validation,
    }  # fmt: skip
    chosen = selection["selected"]
    assert chosen == best_checkpoint(selection["validation_accuracy"])
    assert metrics["adapter"] == str(selected_run / "checkpoints" / chosen)
    tested = metrics["results"]["validation"]
    assert selection["validation_accuracy"][chosen] == pytest.approx(
        (tested["direct"]["accuracy"] + tested["reasoning"]["accuracy"]) / 2
    )
    for name in selection["validation_accuracy"]:
        kept = selected_run / "eval" / "selection" / name
        assert sorted(path.name for path in kept.iterdir()) == [
            "predictions-validation-direct.parquet", "predictions-validation-reasoning.parquet",
        ]  # fmt: skip
    assert "model selection training-domain" in output and f"({chosen})" in output

    last = dbr("eval", "--run", str(selected_run), *flags, "--force", "--selection", "last")
    metrics = json.loads((selected_run / "eval" / "metrics.json").read_text())
    assert metrics["selection"] == {"rule": "last"} and metrics["adapter"] == str(selected_run / "adapter")
    assert "model selection training-domain:" not in last


def test_each_checkpoint_is_served_from_a_merge_folder_of_its_own(
    selected_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With vLLM, a vision adapter is merged once per machine and step. The checkpoints of a
    selection and the final test never share a folder, so a process still serving one
    checkpoint can never hand the next one its merged weights; each folder is gone after."""
    opened = []

    def open_recording(settings: EngineSettings, model: str, adapter: Path | None = None):
        opened.append((settings.merge_dir, adapter))
        return TransformersEngine(model, adapter, batch_size=4)

    monkeypatch.setattr(evaluate_module, "open_engine", open_recording)
    run = tmp_path / "run"
    shutil.copytree(selected_run, run, ignore=shutil.ignore_patterns("eval"))
    evaluate_run(run, fast(tmp_path, engine=EngineSettings("vllm"), selection="training-domain"))
    folders = [folder for folder, _ in opened]
    assert [adapter.name for _, adapter in opened[:2]] == ["checkpoint-1", "checkpoint-2"]
    assert len(folders) == 3 and len(set(folders)) == 3
    assert not any(folder.exists() for folder in folders)


def test_training_domain_selection_without_checkpoints_is_refused(trained_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("eval", "checkpoints"))
    with pytest.raises(UserError, match=r"model selection training-domain needs the checkpoints .* holds none"):
        evaluate_run(copy, fast(tmp_path, selection="training-domain"))
    assert not (copy / "eval").exists()

"""SARR (`--method rd-mldg`): the self-label merge, the run's state, and whole rounds on tiny models.

The merge is checked on hand-written generations (which chains replace, which
stay); a round runs end to end with the transformers engine (with a simulated
kill after round 1's self-labelling and a resume) and with the real vLLM engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.train.config import build_config
from domainbed_reasoning.train.engines.base import Generation
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.mtct.mtct_data import task_prompt
from domainbed_reasoning.train.sarr import sarr
from domainbed_reasoning.train.sarr.self_label import (
    Supervised,
    merge_self_labels,
    self_label_stats,
)
from domainbed_reasoning.train.stages.run import train
from domainbed_reasoning.train.stages.stage import prepare
from typer.testing import CliRunner

from domainbed_reasoning.chains.chain_format import format_chain
from domainbed_reasoning.chains.matching import matcher_for
from domainbed_reasoning.cli import app
from domainbed_reasoning.errors import UserError

CLASSES = ("circle", "cross", "square", "star", "triangle")


def chain(conclusion: str, caption: str = "a shape") -> str:
    stages = ("summary", "caption", "reasoning", "reflection", "conclusion")
    return format_chain(
        dict(zip(stages, ("plan", caption, "outline", "unlike others", conclusion), strict=True))
    )


# --- the filter: which chains replace the supervision -------------------------------------------------


def test_merge_keeps_exactly_the_label_consistent_chains() -> None:
    images = [
        Supervised(f"img{i}", name, f"teacher chain {i}") for i, name in enumerate(CLASSES[:4])
    ]
    first_right = chain("circle", caption="first right")
    generations = [
        Generation(  # wrong class, malformed, right, right again: the first right one replaces
            (
                chain("square"),
                "<SUMMARY>x</SUMMARY> circle",
                "  " + first_right + "\n",
                chain("circle"),
            ),
            ("stop", "stop", "stop", "stop"),
        ),
        Generation((chain("cross"),), ("length",)),  # right class but cut at the token limit
        Generation.failed("HTTP 500"),
        Generation(
            (chain("square or circle"), chain("triangle")), ("stop", "stop")
        ),  # ambiguous, wrong
    ]
    frame = merge_self_labels(images, generations, matcher_for(CLASSES))

    assert frame["source"].to_list() == ["self", "previous", "previous", "previous"]
    assert frame["chain"].to_list() == [
        first_right,
        "teacher chain 1",
        "teacher chain 2",
        "teacher chain 3",
    ]
    assert frame["accepted"].to_list() == [2, 0, 0, 0]
    assert frame["reasons"].to_list() == [
        ["wrong_class", "no_conclusion", "accepted", "accepted"],
        ["truncated"],
        ["request_error"],
        ["ambiguous", "wrong_class"],
    ]
    stats = self_label_stats(frame)
    assert {key: stats[key] for key in ("images", "candidates", "accepted_candidates", "kept", "replaced")} == {
        "images": 4, "candidates": 8, "accepted_candidates": 2, "kept": 1, "replaced": 1,
    }  # fmt: skip
    assert (stats["kept_previous"], stats["kept_pct"], stats["request_errors"]) == (3, 25.0, 1)
    assert stats["reasons"] == {
        "wrong_class": 2, "accepted": 2, "no_conclusion": 1, "truncated": 1, "request_error": 1, "ambiguous": 1,
    }  # fmt: skip
    assert "keeps its previous chain" in stats["unlabelled_policy"]


def test_merge_refuses_misaligned_generations() -> None:
    with pytest.raises(ValueError, match="1 generations for 2 images"):
        merge_self_labels(
            [Supervised("a", "circle", "c"), Supervised("b", "star", "c")],
            [Generation.failed("x")],
            matcher_for(CLASSES),
        )


# --- settings and run-folder errors (no model loads) ------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"method": "rd-mldg", "sarr_rounds": 0},
            "sarr_rounds 0 leaves rd-mldg without self-labelling",
        ),
        ({"engine": "tgi"}, "unknown engine 'tgi': choose one of transformers, vllm"),
        ({"sarr_init": "resume"}, "unknown sarr_init 'resume': choose one of base, continue"),
        ({"self_label_candidates": 0}, "self_label_candidates must be at least 1, not 0"),
        ({"self_label_temperature": -1}, "self_label_temperature must be 0 or more, not -1"),
        (
            {"self_label_candidates": 4, "self_label_temperature": 0},
            "self_label_candidates 4 at self_label_temperature 0 are copies of one greedy chain",
        ),
        ({"method": "rd-mldg", "per_device_batch_size": 3}, "per_device_batch_size 3 is odd"),
    ],
)
def test_bad_sarr_settings_are_one_line_errors(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config(values)


def test_mtct_ignores_sarr_rounds() -> None:
    assert build_config({"method": "mtct", "sarr_rounds": 0}).sarr_rounds == 0


def test_plan_orders_the_steps() -> None:
    assert [step.name for step in sarr.plan(2)] == [
        "round-0/train", "round-1/self_label", "round-1/train", "round-2/self_label", "round-2/train",
    ]  # fmt: skip


def _state(run_dir: Path, state: object) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "state.json").write_text(json.dumps(state))


def test_state_errors(tmp_path: Path) -> None:
    assert sarr.load_state(tmp_path / "fresh", 1, resume=False) == []
    older = tmp_path / "older"
    (older / "round-0").mkdir(parents=True)
    with pytest.raises(
        UserError, match="holds round-0 but no state.json: it was written by an older version"
    ):
        sarr.load_state(older, 1, resume=True)

    run = tmp_path / "run"
    _state(run, {"version": 1, "done": []})
    with pytest.raises(
        UserError, match="holds an unfinished rd-mldg run: pass --resume to continue it"
    ):
        sarr.load_state(run, 1, resume=False)
    assert sarr.load_state(run, 1, resume=True) == []
    _state(run, {"version": 0, "done": []})
    with pytest.raises(UserError, match="has state version 0, this dbr reads version 1"):
        sarr.load_state(run, 1, resume=True)
    _state(run, {"version": 1, "done": ["round-1/train"]})
    with pytest.raises(
        UserError, match="lists steps round-1/train, not a start of this run's plan"
    ):
        sarr.load_state(run, 1, resume=True)
    _state(run, {"version": 1, "done": ["round-0/train", "round-1/self_label"]})
    with pytest.raises(
        UserError,
        match=r"is missing round-0/trained weights \(adapter/ or model/\), which state.json lists as done",
    ):
        sarr.load_state(run, 1, resume=True)
    (run / "round-0" / "model").mkdir(parents=True)
    (run / "round-0" / "model" / "config.json").write_text(
        "{}"
    )  # a full fine-tuning round counts too
    with pytest.raises(
        UserError, match="is missing round-1/self_labels.parquet, which state.json lists as done"
    ):
        sarr.load_state(run, 1, resume=True)
    (run / "state.json").write_text("{not json")
    with pytest.raises(UserError, match="state.json is not valid JSON"):
        sarr.load_state(run, 1, resume=True)


# --- whole runs on the tiny Qwen2-VL --------------------------------------------------------------


SARR_FAST = {
    "method": "rd-mldg",
    "sarr_rounds": 1,
    "max_steps": 1,
    "self_label_candidates": 2,
    "self_label_temperature": 1.0,
    "self_label_max_new_tokens": 12,
}


def _check_finished_run(run_dir: Path, engine: str) -> dict:
    """The artefacts every finished one-round run has, and self-label counts that add up."""
    for name in (
        "split.parquet", "config.yaml", "run.json", "metrics.json", "adapter/adapter_model.safetensors",
        "round-0/adapter/adapter_config.json", "round-0/metrics.json", "round-1/adapter/adapter_config.json",
        "round-1/metrics.json", "round-1/self_labels.parquet", "round-1/self_label_stats.json",
    ):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "state.json").read_text())["done"] == [
        "round-0/train", "round-1/self_label", "round-1/train",
    ]  # fmt: skip
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() == (
        run_dir / "round-1" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    stats = json.loads((run_dir / "round-1" / "self_label_stats.json").read_text())
    labels = pl.read_parquet(run_dir / "round-1" / "self_labels.parquet")
    assert stats["images"] == labels.height == 4
    assert stats["replaced"] + stats["kept_previous"] == 4
    assert (
        stats["candidates"]
        == 4 * SARR_FAST["self_label_candidates"]
        == sum(stats["reasons"].values())
    )
    assert stats["engine"] == engine and stats["images_per_s"] > 0
    split = pl.read_parquet(run_dir / "split.parquet")
    assert set(labels["id"]) <= set(split.filter(pl.col("split") == "train")["id"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final_round"] == 1 and metrics["weights"] == "round-1/adapter"
    assert [entry["round"] for entry in metrics["rounds"]] == [0, 1]
    assert metrics["rounds"][1]["self_label"]["replaced"] == stats["replaced"]
    return stats


def test_vllm_engine_without_its_environment_is_refused_before_training(
    train_request,
    export_dir: Path,
    tiny_qwen2vl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # no .venv-vllm here
    monkeypatch.setenv("DBR_VLLM_PYTHON", str(tmp_path / "no-vllm" / "python"))
    out = tmp_path / "runs"
    with pytest.raises(
        UserError, match="vLLM python .*no-vllm/python does not exist: run `make vllm-env`"
    ):
        train(train_request(export_dir, tiny_qwen2vl, out, **SARR_FAST, engine="vllm"))
    assert not (out / "SynthDG" / "sketch" / "rd-mldg" / "round-0").exists()


def test_cli_passes_sarr_options_and_reports_errors_in_one_line(
    export_dir: Path, tiny_qwen2vl: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train", "SynthDG", "--data", str(export_dir), "--target", "sketch", "--model", str(tiny_qwen2vl),
            "--out", str(tmp_path), "--method", "rd-mldg", "--sarr-rounds", "0",
        ],
    )  # fmt: skip
    assert isinstance(result.exception, UserError)
    assert "sarr_rounds 0 leaves rd-mldg without self-labelling" in str(result.exception)
    result = CliRunner().invoke(
        app,
        [
            "train", "SynthDG", "--data", str(export_dir), "--target", "sketch", "--model", str(tiny_qwen2vl),
            "--out", str(tmp_path), "--method", "rd-mldg", "--engine", "tgi",
        ],
    )  # fmt: skip
    assert "unknown engine 'tgi'" in str(result.exception)


class SimulatedKill(Exception):
    pass


def test_one_round_with_transformers_killed_after_self_labelling_then_resumed(
    train_request,
    export_dir: Path,
    tiny_qwen2vl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "runs"
    run_dir = out / "SynthDG" / "sketch" / "rd-mldg"
    request = train_request(export_dir, tiny_qwen2vl, out, **SARR_FAST, sarr_init="continue")
    trained, prompts = [], []
    real_train_stage, real_open_engine = sarr.train_stage, sarr.open_engine

    def killed_in_round_1(*args, **kwargs):
        if args[5].name == "round-1":
            raise SimulatedKill
        trained.append(args[5].name)
        return real_train_stage(*args, **kwargs)

    def recording_engine(*args, **kwargs):
        engine = real_open_engine(*args, **kwargs)
        generate = engine.generate
        engine.generate = lambda requests, *rest: (
            prompts.extend(r.prompt for r in requests) or generate(requests, *rest)
        )
        return engine

    monkeypatch.setattr(sarr, "train_stage", killed_in_round_1)
    monkeypatch.setattr(sarr, "open_engine", recording_engine)
    with pytest.raises(SimulatedKill):
        train(request)
    assert trained == ["round-0"]
    assert json.loads((run_dir / "state.json").read_text())["done"] == [
        "round-0/train",
        "round-1/self_label",
    ]
    assert not (run_dir / "metrics.json").exists()
    # the model was asked with exactly training's reasoning prompt, the same for every image (no label in it)
    assert prompts == [task_prompt("reasoning", list(CLASSES))] * 4

    with pytest.raises(UserError, match="holds an unfinished rd-mldg run: pass --resume"):
        train(request)

    # A chain the model "wrote" for one image: round 1 must train on it, and must not label again.
    labels_path = run_dir / "round-1" / "self_labels.parquet"
    labels = pl.read_parquet(labels_path)
    marker = chain(labels["class_name"][0], caption="the self-labelled marker chain")
    labels.with_columns(
        chain=pl.when(pl.col("id") == labels["id"][0])
        .then(pl.lit(marker))
        .otherwise(pl.col("chain"))
    ).write_parquet(labels_path)
    seen = {}

    def capture(*args, **kwargs):
        seen["completions"] = [row["completion"][0]["content"][0]["text"] for row in args[2]]
        seen["init"] = kwargs["init_adapter"]
        return real_train_stage(*args, **kwargs)

    def no_engine(*args, **kwargs):
        raise AssertionError("a finished self-labelling step was redone")

    monkeypatch.setattr(sarr, "train_stage", capture)
    monkeypatch.setattr(sarr, "open_engine", no_engine)
    result = train(
        train_request(export_dir, tiny_qwen2vl, out, **SARR_FAST, resume=True, sarr_init="continue")
    )

    assert marker in seen["completions"]
    assert seen["init"] == run_dir / "round-0" / "adapter"  # sarr_init=continue
    assert result.weights.adapter == run_dir / "adapter"
    stats = _check_finished_run(run_dir, "transformers")
    assert stats["candidates_per_image"] == 2 and stats["adapter"] == str(
        run_dir / "round-0" / "adapter"
    )

    with pytest.raises(UserError, match="already holds a finished run: pass --resume"):
        train(request)
    assert train(
        train_request(export_dir, tiny_qwen2vl, out, **SARR_FAST, resume=True, sarr_init="continue")
    ).metrics == (result.metrics)


def test_one_round_with_real_vllm(
    train_request,
    export_dir: Path,
    tiny_qwen2vl: Path,
    vllm_python: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The vLLM engine serves base + round-0 adapter (merged: it adapts the vision tower) for round 1."""
    monkeypatch.setenv("DBR_VLLM_PYTHON", str(vllm_python))
    out = tmp_path / "runs"
    request = train_request(export_dir, tiny_qwen2vl, out, **SARR_FAST, engine="vllm")
    result = sarr.train_sarr(
        request, prepare(request), EngineSettings("vllm", max_model_len=2048).filled_from(request.config)
    )
    run_dir = out / "SynthDG" / "sketch" / "rd-mldg"
    assert result.run_dir == run_dir
    _check_finished_run(run_dir, "vllm")
    assert (run_dir / "round-1" / "vllm.log").is_file()
    # the round-0 adapter adapts the vision tower: merged inside the round's folder, removed after it
    assert "round-1/.vllm-merge-" in (run_dir / "round-1" / "vllm.log").read_text()
    assert not list((run_dir / "round-1").glob(".vllm-merge-*"))


def test_full_fine_tuning_rounds_continue_from_the_previous_model(
    train_request,
    export_dir: Path,
    tiny_qwen2vl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "runs"
    real_train_stage = sarr.train_stage
    started_from = []

    def capture(model, *args, **kwargs):
        started_from.append((model, kwargs["init_adapter"]))
        return real_train_stage(model, *args, **kwargs)

    monkeypatch.setattr(sarr, "train_stage", capture)
    result = train(
        train_request(
            export_dir, tiny_qwen2vl, out, **SARR_FAST, finetune="full", sarr_init="continue"
        )
    )

    run_dir = out / "SynthDG" / "sketch" / "rd-mldg"
    assert started_from == [(str(tiny_qwen2vl), None), (str(run_dir / "round-0" / "model"), None)]
    assert result.weights.model == str(run_dir / "model") and result.weights.adapter is None
    assert not list(run_dir.rglob("adapter_config.json"))
    assert (run_dir / "model" / "model.safetensors").read_bytes() == (
        run_dir / "round-1" / "model" / "model.safetensors"
    ).read_bytes()
    stats = json.loads((run_dir / "round-1" / "self_label_stats.json").read_text())
    assert stats["model"] == str(run_dir / "round-0" / "model") and stats["adapter"] is None
    assert json.loads((run_dir / "metrics.json").read_text())["weights"] == "round-1/model"


def test_round_zero_is_taken_from_a_matching_mtct_run_and_refused_from_another(
    train_request,
    export_dir: Path,
    tiny_qwen2vl: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "runs"
    mtct = train(train_request(export_dir, tiny_qwen2vl, out, **(SARR_FAST | {"method": "mtct"})))
    real_train_stage = sarr.train_stage
    trained = []

    def recording(*args, **kwargs):
        trained.append(args[5].name)
        return real_train_stage(*args, **kwargs)

    monkeypatch.setattr(sarr, "train_stage", recording)
    for changed, named in (({"learning_rate": 0.5}, "learning_rate 0.01 vs 0.5"),
                           ({"target": "photo"}, "target 'sketch' vs 'photo'")):  # fmt: skip
        with pytest.raises(UserError, match=f"cannot be this run's round 0 \\(.*{named}"):
            train(
                train_request(
                    export_dir, tiny_qwen2vl, tmp_path / "other", **SARR_FAST,
                    sarr_round0_from=str(mtct.run_dir), **changed,
                )
            )  # fmt: skip
    with pytest.raises(UserError, match="is not a finished mtct run"):
        train(
            train_request(
                export_dir, tiny_qwen2vl, tmp_path / "third", **SARR_FAST,
                sarr_round0_from=str(tmp_path / "nowhere"),
            )
        )  # fmt: skip
    assert trained == []

    result = train(
        train_request(
            export_dir, tiny_qwen2vl, out, **SARR_FAST, sarr_round0_from=str(mtct.run_dir)
        )
    )
    assert trained == ["round-1"]  # round 0 was copied, not trained
    round_0 = result.run_dir / "round-0"
    assert (round_0 / "adapter" / "adapter_model.safetensors").read_bytes() == (
        mtct.run_dir / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert json.loads((round_0 / "metrics.json").read_text()) == mtct.metrics
    stats = json.loads((result.run_dir / "round-1" / "self_label_stats.json").read_text())
    assert stats["adapter"] == str(round_0 / "adapter")


@pytest.mark.parametrize("where", ["config", "set"])
def test_the_method_of_a_config_file_or_set_is_not_overridden_by_the_flags_default(
    where: str, tmp_path: Path
) -> None:
    """`--config` of a saved rd-mldg run (or `--set method=...`) keeps its method when --method is
    not given. Seen through a check only mtct and rd-mldg make: an odd per-device batch."""
    settings = tmp_path / "config.yaml"
    settings.write_text("per_device_batch_size: 3\n" + ("method: cls\n" if where == "config" else ""))
    args = ["train", "SynthDG", "--data", str(tmp_path), "--target", "sketch", "--model", str(tmp_path / "nope")]
    args += ["--config", str(settings)] + (["--set", "method=cls"] if where == "set" else [])
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UserError)
    assert str(result.exception).startswith(f"model folder {tmp_path / 'nope'} not found")
    with_flag = CliRunner().invoke(app, [*args, "--method", "mtct"])
    assert str(with_flag.exception).startswith("per_device_batch_size 3 is odd")

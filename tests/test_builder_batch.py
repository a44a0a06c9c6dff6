"""`--mode batch`: the builder through the Batch API of the simulated teacher (the remote
service boundary, on 127.0.0.1) and through vLLM's offline runner with the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.builders.batch.batch_files import JOURNAL, Journal
from domainbed_reasoning.builders.batch.batch_mode import BATCH_FOLDER
from domainbed_reasoning.builders.build import build_chains
from domainbed_reasoning.builders.build_config import BatchRunner, BuildConfig, Spending
from domainbed_reasoning.builders.rejection_sampling import REQUEST_ERROR, SamplingPlan
from domainbed_reasoning.builders.store.candidate_store import read_candidates
from domainbed_reasoning.builders.transport.teacher_client import TeacherConfig

from domainbed_reasoning import artefacts
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.offline.sim_batches import SimBatchConfig
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate

SPEC = get_spec("SynthDG")
REPO = Path(__file__).resolve().parents[1]
IMAGES = 20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, images_per_class=1, seed=0, size=32)
    return root


@pytest.fixture
def batch_api(data_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    teacher, batches = getattr(request, "param", ({}, SimBatchConfig()))
    settings = {"seed": 3} | teacher
    with run_sim_teacher(SimTeacherConfig(**settings), data_dir, batches=batches) as url:
        yield url


def config(url: str, data_dir: Path, out: Path, **overrides) -> BuildConfig:
    teacher = TeacherConfig(
        urls=(url,),
        model=overrides.pop("model", "sim-teacher"),
        max_tokens=overrides.pop("max_tokens", 512),
    )
    plan = overrides.pop("plan", SamplingPlan(candidates=2, max_rounds=3, temperatures=(0.5, 0.8, 1.0)))
    return BuildConfig(
        "SynthDG", data_dir, out, teacher, plan=plan, show_progress=False, workers=1, mode="batch",
        batch=overrides.pop("batch", BatchRunner(poll_s=0.02)), **overrides,
    )  # fmt: skip


def served(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)


def journal(out: Path) -> Journal:
    return Journal.load(out / "SynthDG" / BATCH_FOLDER)


@pytest.mark.parametrize("batch_api", [({"p_wrong": 0.4}, SimBatchConfig())], indirect=True)
def test_batches_give_the_same_outputs_as_online(batch_api: str, data_dir: Path, tmp_path: Path) -> None:
    stats = build_chains(config(batch_api, data_dir, tmp_path, spending=Spending(1000.0, 2000.0)))
    assert stats["images"]["attempted"] == IMAGES and stats["run"]["unresolved"] == 0
    assert stats["images"].get("accepted", 0) + stats["images"].get("exhausted", 0) == IMAGES
    raw = read_candidates(artefacts.candidates_dir(tmp_path / "SynthDG"))
    assert set(raw["mode"]) == {"batch"} and raw["round"].max() >= 2  # wrong answers: more passes
    chains = pl.read_parquet(artefacts.chains_path(tmp_path / "SynthDG"))
    assert chains.height == stats["images"]["accepted"]
    assert (chains["conclusion"] == chains["class_name"]).all()
    parts = journal(tmp_path).parts
    assert all(part.ingested and part.batch_id and part.status == "completed" for part in parts)
    assert served(batch_api)["batches_created"] == len(parts) == raw["round"].max()
    assert served(batch_api)["requests"] == 0  # nothing went through chat completions
    assert stats["cost"]["by_mode"]["batch"]["usd"] == pytest.approx(stats["cost"]["usd"])
    assert stats["run"]["spent_usd"] == pytest.approx(stats["cost"]["usd"], rel=1e-3)


@pytest.mark.parametrize(
    "batch_api", [({}, SimBatchConfig(outcome="expired", answered=12))], indirect=True
)
def test_an_expired_batch_leaves_its_requests_pending_without_using_rounds(
    batch_api: str, data_dir: Path, tmp_path: Path
) -> None:
    stats = build_chains(config(batch_api, data_dir, tmp_path))
    raw = read_candidates(artefacts.candidates_dir(tmp_path / "SynthDG"))
    failures = raw.filter(pl.col("reason") == REQUEST_ERROR)
    assert failures.height >= IMAGES - 12 and set(failures["round"]) == {1}  # still round 1
    assert failures["detail"].str.contains("batch_expired").all()
    assert stats["images"].get("accepted", 0) == IMAGES  # later passes sent them again
    assert all(part.status == "expired" for part in journal(tmp_path).parts)


@pytest.mark.parametrize("batch_api", [({}, SimBatchConfig(outcome="failed"))], indirect=True)
def test_a_failed_batch_stops_the_run_with_its_images_pending(
    batch_api: str, data_dir: Path, tmp_path: Path
) -> None:
    stats = build_chains(config(batch_api, data_dir, tmp_path))
    assert stats["run"]["stopped"] == "a whole pass of batches came back without an answer"
    assert stats["run"]["unresolved"] == IMAGES and stats["images"].get("exhausted", 0) == 0


@pytest.mark.parametrize("batch_api", [({}, SimBatchConfig(delay_s=3.0))], indirect=True)
def test_a_killed_batch_build_polls_its_batch_instead_of_paying_twice(
    batch_api: str, data_dir: Path, tmp_path: Path
) -> None:
    argv = [
        sys.executable, "-m", "domainbed_reasoning", "build-chains", "SynthDG",
        "--data-dir", str(data_dir), "--out", str(tmp_path), "--teacher-url", batch_api,
        "--teacher-model", "sim-teacher", "--mode", "batch", "--batch-poll-s", "0.05",
        "--max-rounds", "3", "--no-progress",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    path = tmp_path / "SynthDG" / BATCH_FOLDER / JOURNAL
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (path.is_file() and journal(tmp_path).parts[0].batch_id):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert served(batch_api)["batches_created"] == 1 and not journal(tmp_path).parts[0].ingested

    stats = build_chains(config(batch_api, data_dir, tmp_path))
    assert stats["images"].get("accepted", 0) == IMAGES
    assert served(batch_api)["batches_created"] == 1 and served(batch_api)["files_uploaded"] == 1


def test_run_batch_answers_through_the_builder_with_the_tiny_model(
    tiny_qwen2vl: Path, vllm_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    generate(data_dir, images_per_class=1, seed=3)
    vllm_args = ("--dtype", "float32", "--max-model-len", "2048")
    local = config(
        "http://127.0.0.1:9/v1",  # never reached: no server runs in this mode
        data_dir,
        tmp_path / "chains",
        model="tiny-teacher",
        max_tokens=16,
        limit=4,
        plan=SamplingPlan(candidates=2, max_rounds=1, temperatures=(0.8,)),  # one vLLM start
        teacher_checkpoint=str(tiny_qwen2vl),
        batch=BatchRunner(vllm_args=vllm_args),
    )
    monkeypatch.setenv("DBR_VLLM_PYTHON", str(vllm_python))
    stats = build_chains(local)
    raw = read_candidates(artefacts.candidates_dir(tmp_path / "chains" / "SynthDG"))
    assert set(raw["mode"]) == {"batch"} and (raw["reason"] != REQUEST_ERROR).all()
    assert raw["completion_tokens"].min() > 0 and set(raw["teacher_url"]) == {"vllm-run-batch"}
    assert stats["images"] == {"attempted": 4, "exhausted": 4}  # the tiny model writes gibberish
    assert raw.height == 4 * 2 and stats["run"]["unresolved"] == 0

"""The chain builder against the simulated teacher on SynthDG: faults, resume, shards, secrets.

Transport (retries, replica health, outages) and the candidate store's merging have their own
files: test_builder_transport.py, test_builder_store.py.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.builders.build import build_chains, select_images
from domainbed_reasoning.builders.build_config import BuildConfig, Shard
from domainbed_reasoning.builders.cost.pacing import PacingPlan, RunningUsage
from domainbed_reasoning.builders.cost.rate_limits import RateLimits
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan, parse_temperatures
from domainbed_reasoning.builders.sampling import SAMPLING_GC_THRESHOLDS, Share, rare_collections
from domainbed_reasoning.builders.store.candidate_store import KEY, read_candidates
from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy
from domainbed_reasoning.builders.transport.teacher_client import (
    MessagesTemplate,
    Sample,
    TeacherConfig,
    encode_messages,
    parse_completion,
    request_body,
    request_messages,
    resolve_api_key,
)
from domainbed_reasoning.builders.workers import AUTO, split_shares, worker_count
from PIL import Image
from typer.testing import CliRunner

from domainbed_reasoning import artefacts
from domainbed_reasoning.cli import app
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline import sim_teacher
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate

SPEC = get_spec("SynthDG")
IMAGES = 20  # 1 per (domain, class)
FAST = {"latency_ms": 5.0, "retry_after": 0.01, "seed": 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, images_per_class=1, seed=0, size=32)
    return root


def config(url: str, data_dir: Path, out: Path, **overrides) -> BuildConfig:
    teacher = TeacherConfig(
        urls=overrides.pop("urls", (url,)),
        model=overrides.pop("model", "sim-teacher"),
        timeout=overrides.pop("timeout", 5.0),
        max_retries=overrides.pop("max_retries", 0),
        concurrency=overrides.pop("concurrency", 8),
        **{
            key: overrides.pop(key)
            for key in ("health", "api_key", "api_key_explicit")
            if key in overrides
        },
    )
    plan = overrides.pop("plan", SamplingPlan(candidates=2, max_rounds=2, temperatures=(0.5, 0.8)))
    workers = overrides.pop("workers", 1)
    return BuildConfig(
        "SynthDG", data_dir, out, teacher, plan=plan, show_progress=False, workers=workers,
        **overrides,
    )  # fmt: skip


@pytest.fixture
def teacher(data_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    params = getattr(request, "param", {})
    with run_sim_teacher(SimTeacherConfig(**(FAST | params)), data_dir) as url:
        yield url


def outputs(out: Path) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    folder = artefacts.chains_dir(out, SPEC)
    raw = read_candidates(artefacts.candidates_dir(folder))
    chains = pl.read_parquet(artefacts.chains_path(folder))
    return raw, chains, json.loads(artefacts.stats_path(folder).read_text())


def answers(raw: pl.DataFrame) -> pl.DataFrame:
    return raw.filter(pl.col("reason") != "request_error")


def assert_consistent(out: Path, expected_ids: set[str]) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Every image accepted or exhausted, once; no answer duplicated or lost, no round skipped."""
    raw, chains, stats = outputs(out)
    answered = answers(raw)
    assert answered.height == answered.unique(subset=list(KEY)).height, (
        "an answer was written twice"
    )
    assert set(answered["id"]) == expected_ids
    rounds = answered.group_by("id").agg(pl.col("round").unique().sort())["round"].to_list()
    assert all(r == list(range(1, len(r) + 1)) for r in rounds), "a round was skipped or repeated"
    assert chains["id"].is_unique().all() and set(chains["id"]) <= expected_ids
    assert stats["images"]["attempted"] == len(expected_ids)
    assert stats["images"].get("pending", 0) == 0
    assert stats["images"].get("accepted", 0) + stats["images"].get("exhausted", 0) == len(
        expected_ids
    )
    assert chains.height == stats["images"].get("accepted", 0)
    return raw, chains, stats


def all_ids(data_dir: Path) -> set[str]:
    return set(scan_dataset(SPEC, data_dir).frame["id"])


def test_clean_teacher_gives_one_well_formed_chain_per_image(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    stats = build_chains(config(teacher, data_dir, tmp_path))
    raw, chains, _ = assert_consistent(tmp_path, all_ids(data_dir))
    assert stats["images"] == {"attempted": IMAGES, "accepted": IMAGES}
    assert stats["run"]["requests"] == IMAGES and stats["rounds_needed"] == {"1": IMAGES}
    row = chains.row(0, named=True)
    assert row["chain"].startswith("<SUMMARY>") and row["conclusion"] == row["class_name"]
    assert (row["attempts"], row["round"], row["teacher"]) == (1, 1, "sim-teacher")
    assert row["label"] == SPEC.label_of(row["class_name"])
    assert set(raw["teacher_url"]) == {teacher.removeprefix("http://").removesuffix("/v1")}
    assert stats["run"]["unresolved"] == 0 and stats["request_failures"]["requests"] == 0
    report = (tmp_path / "SynthDG" / "report.md").read_text()
    assert (
        "**20 of 20 attempted images accepted (100.0%)**" in report
        and "| photo | 5 | 5 | 100.0% |" in report
    )


@pytest.fixture
def bodies(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every request body the simulated teacher receives, in arrival order."""
    received: list[dict] = []
    complete = sim_teacher.SimTeacher.complete
    monkeypatch.setattr(
        sim_teacher.SimTeacher,
        "complete",
        lambda self, body, rng: received.append(body) or complete(self, body, rng),
    )
    return received


def test_the_label_never_travels_in_a_request(
    data_dir: Path, tmp_path: Path, bodies: list[dict]
) -> None:
    """Only the pixels and the per-image seed differ between requests; the text comes first."""
    with run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as url:
        build_chains(config(url, data_dir, tmp_path))
    assert len(bodies) == IMAGES
    images, seeds = set(), set()
    for body in bodies:
        text, image = body["messages"][0]["content"]
        assert (text["type"], image["type"]) == ("text", "image_url"), (
            "the image must follow the text"
        )
        images.add(image["image_url"]["url"])
        seeds.add(body.pop("seed"))
        image["image_url"]["url"] = "IMAGE"
    assert len(images) == IMAGES, "each request carries its own image"
    assert len(seeds) == IMAGES, "each image's round has its own seed"
    assert all(body == bodies[0] for body in bodies), (
        "something besides the pixels and the seed differs between images"
    )
    text = json.dumps(bodies[0])
    assert not re.search(r"SynthDG/|\.png|label", text)


def test_images_over_the_caps_are_downscaled_within_the_build(
    data_dir: Path, tmp_path: Path, bodies: list[dict]
) -> None:
    with run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as url:
        build_chains(config(url, data_dir, tmp_path, policy=PayloadPolicy(max_side=24)))
    raw, _, _ = assert_consistent(tmp_path, all_ids(data_dir))
    assert raw["downscaled"].all(), "the records must say the teacher saw fewer pixels"
    assert len(bodies) >= IMAGES
    for body in bodies:
        data_url = body["messages"][0]["content"][1]["image_url"]["url"]
        assert data_url.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))) as image:
            assert max(image.size) == 24


CONTENT_FAULTS = [
    ({"p_wrong": 0.5}, {"wrong_class"}),
    ({"p_malformed": 0.5}, {"missing_stage", "order", "unclosed_tag", "no_conclusion"}),
    ({"p_empty": 0.5}, {"empty_response"}),
]


@pytest.mark.parametrize(
    ("teacher", "reasons"),
    CONTENT_FAULTS,
    indirect=["teacher"],
    ids=[next(iter(f)) for f, _ in CONTENT_FAULTS],
)
def test_every_bad_answer_ends_resolved_or_exhausted_with_its_reason_recorded(
    teacher: str, reasons: set[str], data_dir: Path, tmp_path: Path
) -> None:
    build_chains(config(teacher, data_dir, tmp_path))
    _, _, stats = assert_consistent(tmp_path, all_ids(data_dir))
    assert reasons & set(stats["reasons"]), stats["reasons"]
    assert stats["reasons"]["accepted"] > 0


TRANSPORT_FAULTS = {  # the detail recorded for each, named as the openai SDK names the error
    "p_429": "^RateLimitError: HTTP 429: simulated rate limit$",
    "p_500": "^InternalServerError: HTTP 500: simulated server error$",
    "p_drop": "^APIConnectionError: (ServerDisconnectedError|ClientOSError|ClientPayloadError): ",
    "p_stall": "^APITimeoutError: no answer within 0.5 s$",
}


@pytest.mark.parametrize("fault", TRANSPORT_FAULTS)
def test_a_failed_request_leaves_its_image_pending_and_a_rerun_retries_exactly_those(
    fault: str, data_dir: Path, tmp_path: Path
) -> None:
    """Transport failures never use up an image's rounds."""
    faulty = SimTeacherConfig(**FAST | {fault: 0.4, "stall_s": 5.0})
    with run_sim_teacher(faulty, data_dir) as url:
        first = build_chains(config(url, data_dir, tmp_path, timeout=0.5))
    raw, _, _ = outputs(tmp_path)
    failures = raw.filter(pl.col("reason") == "request_error")
    assert failures.height > 0 and (failures["candidate_index"] == -1).all()
    assert failures["detail"].str.contains(TRANSPORT_FAULTS[fault]).all(), failures["detail"]
    assert first["exhausted"] == {}, "a failed request used up a round"
    pending = first["images"].get("pending", 0) + IMAGES - first["images"]["attempted"]
    assert first["run"]["unresolved"] == pending > 0
    assert first["request_failures"]["pending_images"] == first["images"].get("pending", 0)
    retried = set(failures["id"]) - set(answers(raw).filter(pl.col("reason") == "accepted")["id"])

    with run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as url:
        again = build_chains(config(url, data_dir, tmp_path))
    _, chains, _ = assert_consistent(tmp_path, all_ids(data_dir))
    assert again["run"]["requests"] == len(retried) and again["run"]["unresolved"] == 0
    assert again["images"] == {"attempted": IMAGES, "accepted": IMAGES}
    accepted_round = dict(chains.select("id", "round").iter_rows())
    assert all(accepted_round[id_] == 1 for id_ in retried), "a failed round was not asked again"


@pytest.mark.parametrize("teacher", [{"p_429": 0.3, "p_500": 0.1, "p_drop": 0.05}], indirect=True)
def test_the_client_retries_transport_faults_away(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    stats = build_chains(config(teacher, data_dir, tmp_path, max_retries=30))
    assert_consistent(tmp_path, all_ids(data_dir))
    assert stats["reasons"] == {"accepted": 2 * IMAGES}
    assert stats["request_failures"]["requests"] == 0


@pytest.mark.parametrize("teacher", [{"p_wrong": 1.0}], indirect=True)
def test_a_rerun_resumes_exhausted_images_at_their_next_round(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    one_round = SamplingPlan(candidates=2, max_rounds=1, temperatures=(0.5, 0.8))
    first = build_chains(config(teacher, data_dir, tmp_path, plan=one_round))
    assert first["images"] == {"attempted": IMAGES, "exhausted": IMAGES}
    again = build_chains(config(teacher, data_dir, tmp_path, plan=one_round))
    assert again["run"]["requests"] == 0
    more = build_chains(config(teacher, data_dir, tmp_path, plan=SamplingPlan(2, 3, (0.5, 0.8))))
    raw, _, _ = assert_consistent(tmp_path, all_ids(data_dir))
    assert more["run"]["requests"] == 2 * IMAGES
    per_round = dict(
        raw.group_by("round").agg(pl.col("temperature").unique()).sort("round").iter_rows()
    )
    assert per_round == {1: [0.5], 2: [0.8], 3: [0.8]}


def test_limit_then_full_run_requests_each_image_once(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    assert build_chains(config(teacher, data_dir, tmp_path, limit=7))["run"]["requests"] == 7
    rest = build_chains(config(teacher, data_dir, tmp_path))
    assert rest["run"]["requests"] == IMAGES - 7
    assert_consistent(tmp_path, all_ids(data_dir))


def test_shards_cover_every_id_exactly_once(teacher: str, data_dir: Path, tmp_path: Path) -> None:
    manifest = scan_dataset(SPEC, data_dir).frame
    parts = [set(select_images(manifest, Shard(i, 3), None)["id"]) for i in range(3)]
    assert sum(map(len, parts)) == manifest.height and set().union(*parts) == set(manifest["id"])
    assert all(parts), "a shard got nothing: the hash does not spread"
    for i in range(2):
        build_chains(config(teacher, data_dir, tmp_path, shard=Shard(i, 2)))
    assert_consistent(tmp_path, all_ids(data_dir))


@pytest.mark.parametrize("teacher", [{"p_wrong": 0.4, "p_500": 0.1}], indirect=True)
def test_worker_processes_share_one_build(teacher: str, data_dir: Path, tmp_path: Path) -> None:
    stats = build_chains(
        config(teacher, data_dir, tmp_path, workers=2, concurrency=5, max_retries=10)
    )
    raw, _, _ = assert_consistent(tmp_path, all_ids(data_dir))
    assert stats["run"]["requests"] == raw.filter(pl.col("candidate_index") == 0).height
    assert not multiprocessing.active_children(), "a worker outlived the build"


def test_workers_are_capped_by_images_and_request_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (worker_count(1, 1000, 256), worker_count(4, 3, 256), worker_count(4, 1000, 2)) == (
        1,
        3,
        2,
    )
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    assert worker_count(AUTO, 100_000, 1024) == 5, "8 cores, about 3 busy"
    assert worker_count(AUTO, 100_000, 128) == 2, "one worker per 64 request slots"
    assert worker_count(AUTO, 3_000, 1024) == 1, "too few images to pay for a second process"
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    assert worker_count(AUTO, 100_000, 1024) == 1, "no free core still means one process"


def test_shares_partition_the_images_and_the_concurrency(teacher: str, data_dir: Path) -> None:
    whole = config(teacher, data_dir, Path("unused"), concurrency=7)
    tasks = pl.DataFrame({"id": [f"image-{index}" for index in range(IMAGES)]})
    pacing = PacingPlan(RunningUsage(100), 2, 7, budget_left_usd=3.0, limits=RateLimits(600, 9000))
    shares = split_shares(Share(whole, tasks, "prompt", None, Path("unused"), pacing), 3)
    assert sorted(id_ for share in shares for id_ in share.tasks["id"]) == sorted(tasks["id"])
    assert [share.config.teacher.concurrency for share in shares] == [3, 2, 2]
    assert [share.pacing.concurrency for share in shares] == [3, 2, 2]
    assert {(share.pacing.budget_left_usd, share.pacing.limits) for share in shares} == {
        (1.0, RateLimits(200, 3000))
    }
    assert all(share.config.teacher.urls == whole.teacher.urls for share in shares)


@pytest.mark.parametrize("teacher", [{"latency_ms": 200.0}], indirect=True)
def test_a_worker_killed_from_outside_is_named_and_a_rerun_finishes(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    def kill_first_worker() -> None:
        deadline = time.monotonic() + 30
        while not multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    with pytest.raises(UserError, match=r"^build worker \d stopped before finishing \(exit code -9\): "
                       r"re-run the same command to resume$"):  # fmt: skip
        build_chains(
            config(teacher, data_dir, tmp_path, workers=2, concurrency=2, flush_seconds=0.1)
        )
    killer.join()
    assert not multiprocessing.active_children(), "the other worker was left running"
    build_chains(config(teacher, data_dir, tmp_path, workers=2, concurrency=8))
    assert_consistent(tmp_path, all_ids(data_dir))


def test_requests_spread_over_replicas(data_dir: Path, tmp_path: Path) -> None:
    with (
        run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as one,
        run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as two,
    ):
        build_chains(config(one, data_dir, tmp_path, urls=(one, two)))
    raw, _, _ = assert_consistent(tmp_path, all_ids(data_dir))
    used = raw.group_by("teacher_url").len()["len"].to_list()
    assert len(used) == 2 and min(used) >= IMAGES // 4


def test_the_api_key_appears_in_no_output(teacher: str, data_dir: Path, tmp_path: Path) -> None:
    key = "sk-test-DISTINCTIVE-4f9a1c"
    with run_sim_teacher(SimTeacherConfig(**FAST | {"p_500": 0.5}), data_dir) as url:
        result = CliRunner().invoke(
            app,
            ["build-chains", "SynthDG", "--data-dir", str(data_dir), "--out", str(tmp_path / "out"),
             "--teacher-url", url, "--teacher-model", "sim-teacher", "--max-retries", "0",
             "--api-key-env", "DBR_TEST_KEY", "--no-progress"],
            env={"DBR_TEST_KEY": key},
        )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert outputs(tmp_path / "out")[2]["request_failures"]["requests"] > 0
    said = " ".join(result.output.split())
    assert re.search(r"(\d+) images of this run unresolved \(\1 of them after failed requests;", said)
    assert "Run the same command again to retry exactly those (exit code 3)" in said
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) >= 5
    assert not [p for p in files if key.encode() in p.read_bytes()]
    assert key not in result.output


def test_api_key_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert resolve_api_key(None) == "EMPTY"
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    assert resolve_api_key(None) == "from-openai-env"
    monkeypatch.setenv("MY_KEY", "from-my-env")
    assert resolve_api_key("MY_KEY") == "from-my-env"


def test_a_completion_body_is_read_or_refused_as_malformed() -> None:
    body = {
        "choices": [
            {"message": {"content": "a"}, "finish_reason": "stop"},
            {"message": {"content": None}},
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3},
    }
    assert parse_completion(body) == ((Sample("a", "stop"), Sample("", None)), 7, 3)
    for bad, why in [([], "TypeError"), ({"error": "x"}, "KeyError"), ({"choices": []}, "without choices"),
                     ({"choices": [{"message": "text"}]}, "AttributeError")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_completion(bad)


@pytest.mark.parametrize("text_first", [True, False])
def test_a_body_with_pre_encoded_messages_is_the_plain_json_body(text_first: bool) -> None:
    fields = {"model": "m", "n": 4, "temperature": 0.7, "max_tokens": 9, "seed": 5}
    url = "data:image/png;base64,AAAA"
    body = request_body(encode_messages('say "hi"', url, text_first), fields)
    messages = request_messages('say "hi"', url, text_first)
    assert json.loads(body) == fields | {"messages": messages}
    kinds = [part["type"] for part in messages[0]["content"]]
    assert kinds == (["text", "image_url"] if text_first else ["image_url", "text"])
    template = MessagesTemplate.for_prompt('say "hi"\n\u00e9', text_first)
    assert template.fill(url) == encode_messages('say "hi"\n\u00e9', url, text_first)


def test_temperature_schedule_repeats_its_last_value() -> None:
    plan = SamplingPlan(temperatures=parse_temperatures("0.7, 0.9"))
    assert [plan.temperature(r) for r in range(1, 5)] == [0.7, 0.9, 0.9, 0.9]


def cli_error(
    args: list[str], data_dir: Path, tmp_path: Path, url: str = "http://127.0.0.1:9/v1"
) -> str:
    base = ["build-chains", "SynthDG", "--data-dir", str(data_dir), "--out", str(tmp_path),
            "--teacher-url", url, "--teacher-model", "sim-teacher", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, base + args)
    assert isinstance(result.exception, UserError), result.output
    message = str(result.exception)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard", "2/2"], r"--shard '2/2': write i/n with 0 <= i < n"),
        (["--shard", "half"], r"--shard 'half': write i/n"),
        (["--temperatures", "hot"], r"--temperatures 'hot': give comma-separated numbers"),
        (["--temperatures", "0.7,3"], r"--temperatures 0.7,3.0: give values in \[0, 2\]"),
        (["--candidates", "0"], r"--candidates 0: must be at least 1"),
        (["--max-rounds", "0"], r"--max-rounds 0: must be at least 1"),
        (["--limit", "0"], r"--limit 0: must be at least 1"),
        (["--timeout", "0"], r"--timeout 0.0: must be more than 0 seconds"),
        (["--max-retries", "-1"], r"--max-retries -1: must be 0 or more"),
        (["--concurrency", "0"], r"--concurrency 0: must be at least 1"),
        (["--max-tokens", "0"], r"--max-tokens 0: must be at least 1"),
        (["--top-p", "0"], r"--top-p 0.0: must be in \(0, 1\]"),
        (["--outage-wait", "-1"], r"--outage-wait -1: must be 0 seconds or more"),
        (
            ["--workers", "-1"],
            r"--workers -1: must be 0 \(choose from the free cores\) or more",
        ),
        (
            ["--api-key-env", "DBR_SURELY_UNSET"],
            r"environment variable DBR_SURELY_UNSET is not set",
        ),
    ],
)
def test_bad_options_are_one_line_errors(
    args: list[str], message: str, data_dir: Path, tmp_path: Path
) -> None:
    assert re.search(message, cli_error(args, data_dir, tmp_path))


def test_bad_url_and_unreachable_teacher_say_how_to_fix(data_dir: Path, tmp_path: Path) -> None:
    assert re.search(
        r"--teacher-url 'localhost:8000' is not an http\(s\) URL",
        cli_error([], data_dir, tmp_path, "localhost:8000"),
    )
    message = cli_error([], data_dir, tmp_path)
    assert "teacher at http://127.0.0.1:9/v1 is not reachable" in message
    assert "start it with `make serve-teacher` or pass --teacher-url" in message
    assert not (tmp_path / "SynthDG" / "candidates").exists()


def test_a_model_the_teacher_does_not_serve_is_named(
    teacher: str, data_dir: Path, tmp_path: Path
) -> None:
    message = cli_error(["--teacher-model", "gpt-9"], data_dir, tmp_path, teacher)
    assert "does not serve model 'gpt-9' (it serves sim-teacher): pass --teacher-model" in message


def test_sampling_collects_garbage_rarely_and_restores_the_collector_after() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), rare_collections():
        assert gc.get_threshold() == SAMPLING_GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        raise RuntimeError("a build that fails still hands the collector back")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0

"""The builder's transport against real HTTP servers: the SDK's retry rules, replica health,
outages, a replica killed mid-run, where the API key may go, and what every record states."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx2
import openai
import polars as pl
import pytest
from aiohttp import web
from domainbed_reasoning.builders.build import build_chains
from domainbed_reasoning.builders.rejection_sampling import SamplingPlan
from domainbed_reasoning.builders.store.candidate_store import read_candidates, store_lock
from domainbed_reasoning.builders.transport.replicas import HealthPolicy
from domainbed_reasoning.builders.transport.retry_policy import (
    retry_after,
    retry_delay,
    should_retry,
)
from domainbed_reasoning.builders.transport.teacher_client import (
    TeacherConfig,
    key_travels,
    url_host,
    withheld_key_urls,
)
from test_builder import FAST, IMAGES, all_ids, answers, assert_consistent, config, outputs

from domainbed_reasoning.chains.prompt_templates import load_prompt
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline import sim_teacher
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate

QUICK_HEALTH = HealthPolicy(eject_after=3, probe_first_s=0.1, probe_max_s=0.5, outage_wait_s=30)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, images_per_class=1, seed=0, size=32)
    return root


HEADER_CASES = [
    (500, {}),
    (502, {}),
    (429, {}),
    (429, {"retry-after": "3"}),
    (429, {"retry-after": "121"}),
    (429, {"retry-after-ms": "250"}),
    (429, {"retry-after": "inf"}),
    (429, {"retry-after": "1e999"}),
    (429, {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}),
    (429, {"retry-after": "soon"}),
    (408, {}),
    (409, {}),
    (400, {}),
    (404, {}),
    (400, {"x-should-retry": "true"}),
    (503, {"x-should-retry": "false"}),
]


@pytest.mark.parametrize(("status", "headers"), HEADER_CASES)
def test_retry_decisions_are_the_openai_sdks(status: int, headers: dict[str, str]) -> None:
    """The lean HTTP path keeps the SDK's rules: compared on the same responses."""
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    response = httpx2.Response(
        status, headers=headers, request=httpx2.Request("POST", sdk.base_url)
    )
    assert should_retry(status, response.headers) == sdk._should_retry(response)
    assert retry_after(response.headers) == pytest.approx(
        sdk._parse_retry_after_header(response.headers), abs=2
    )


@pytest.mark.parametrize("retries_taken", [0, 1, 3, 10])
@pytest.mark.parametrize("draw", [0.0, 0.5, 0.999])
def test_backoff_is_the_openai_sdks(
    retries_taken: int, draw: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same jitter draw gives the same wait; a Retry-After wins in both."""
    monkeypatch.setattr(openai._base_client, "random", lambda: draw)
    monkeypatch.setattr(random, "random", lambda: draw)
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1", max_retries=10)
    options = openai._models.FinalRequestOptions(method="post", url="/x")
    theirs = sdk._calculate_retry_timeout(10 - retries_taken, options)
    assert retry_delay(retries_taken) == pytest.approx(theirs)
    told = httpx2.Headers({"retry-after": "2.5"})
    assert (
        retry_delay(retries_taken, told) == sdk._calculate_retry_timeout(10, options, told) == 2.5
    )


def test_an_outage_shorter_than_outage_wait_costs_no_image(data_dir: Path, tmp_path: Path) -> None:
    outage = SimTeacherConfig(**FAST | {"outage_after": 4, "outage_s": 1.0})
    with run_sim_teacher(outage, data_dir) as url:
        stats = build_chains(
            config(url, data_dir, tmp_path, health=QUICK_HEALTH, max_retries=3, concurrency=2)
        )
        served = json.load(urllib.request.urlopen(url.removesuffix("/v1") + "/stats"))
    assert served["outage"] >= 3, "the outage never hit the build"
    assert_consistent(tmp_path, all_ids(data_dir))
    assert stats["images"] == {"attempted": IMAGES, "accepted": IMAGES}
    assert stats["run"]["stopped"] is None and stats["run"]["unresolved"] == 0


def test_a_teacher_whose_engine_died_stops_the_build_at_once_and_says_where_its_log_is(
    data_dir: Path, tmp_path: Path
) -> None:
    """vLLM after its EngineCore died: /models answers, every completion is HTTP 500 "EngineCore
    encountered an issue". Nothing brings it back, so the build stops at the first such answer
    rather than retrying every image into a request_error or waiting out --outage-wait."""
    dead = SimTeacherConfig(**FAST | {"engine_dead_after": 5})
    with run_sim_teacher(dead, data_dir) as url:
        stats = build_chains(
            config(url, data_dir, tmp_path, health=QUICK_HEALTH, max_retries=3, concurrency=2)
        )
        served = json.load(urllib.request.urlopen(url.removesuffix("/v1") + "/stats"))
    stopped = stats["run"]["stopped"]
    assert stopped.startswith(f"the teacher's engine died on {url_host(url)} (every request answered HTTP 500")
    assert "EngineCore encountered an issue" in stopped
    assert "`dbr serve-teacher` writes runs/vllm/teacher.log" in stopped
    assert stopped.endswith("run the same command again to resume")
    assert served["engine_dead"] <= 2  # the requests in flight when it died, none retried
    raw, _, _ = outputs(tmp_path)
    assert raw.height > 0 and "request_error" not in set(raw["reason"])
    assert stats["run"]["unresolved"] == IMAGES - stats["images"]["accepted"] > 0


def test_an_outage_past_outage_wait_stops_the_build_and_a_rerun_accepts_every_image(
    data_dir: Path, tmp_path: Path
) -> None:
    """An outage on part of the images during one run, recovery, a re-run."""
    patience = HealthPolicy(eject_after=3, probe_first_s=0.1, probe_max_s=0.2, outage_wait_s=0.5)
    outage = SimTeacherConfig(**FAST | {"outage_after": 6, "outage_s": 60.0})
    with run_sim_teacher(outage, data_dir) as url:
        first = build_chains(
            config(url, data_dir, tmp_path, health=patience, max_retries=1, concurrency=2)
        )
    assert "every teacher replica stayed down for 0.5 s" in first["run"]["stopped"]
    assert first["run"]["stopped"].endswith("stopped; run the same command again to resume")
    assert first["exhausted"] == {}
    assert 0 < first["images"].get("accepted", 0) < IMAGES
    assert first["run"]["unresolved"] == IMAGES - first["images"]["accepted"]

    with run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as url:
        again = build_chains(config(url, data_dir, tmp_path, health=patience))
    raw, chains, _ = assert_consistent(tmp_path, all_ids(data_dir))
    assert again["images"] == {"attempted": IMAGES, "accepted": IMAGES}
    assert again["run"]["requests"] == first["run"]["unresolved"]
    failed = set(raw.filter(pl.col("reason") == "request_error")["id"])
    assert failed and set(chains.filter(pl.col("id").is_in(failed))["round"]) == {1}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stats_of(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=2) as response:
        return json.load(response)


@pytest.fixture
def doomed_replica(data_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A simulated teacher in its own process, so a test can SIGKILL it like a lost node."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "domainbed_reasoning", "sim-teacher", "--data-dir", str(data_dir),
         "--port", str(port), "--latency-ms", "50", "--p-wrong", "0.5", "--seed", "3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:
        try:
            stats_of(url)
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, (
                "sim-teacher did not start"
            )
            time.sleep(0.1)
    yield url, server
    server.kill()
    server.wait()


def verdicts(out: Path) -> dict[tuple, tuple]:
    raw = answers(outputs(out)[0])
    return {
        (id_, round_, index): (reason, text)
        for id_, round_, index, reason, text in raw.select(
            "id", "round", "candidate_index", "reason", "text"
        ).iter_rows()
    }


def test_a_replica_killed_mid_run_changes_no_outcome(
    data_dir: Path, tmp_path: Path, doomed_replica: tuple[str, subprocess.Popen]
) -> None:
    """Two replicas, one SIGKILLed mid-run: every image resolves exactly as
    with one healthy replica (the simulated teacher answers a request by its body and seed)."""
    doomed_url, doomed = doomed_replica
    survivor = SimTeacherConfig(**FAST | {"latency_ms": 50.0, "p_wrong": 0.5})
    plan = SamplingPlan(candidates=2, max_rounds=3, temperatures=(0.5, 0.8))

    killed_at: list[datetime] = []

    def kill_after_some_answers() -> None:
        deadline = time.monotonic() + 30
        while stats_of(doomed_url)["completions"] < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        doomed.send_signal(signal.SIGKILL)
        killed_at.append(datetime.now(UTC))

    with run_sim_teacher(survivor, data_dir) as url:
        killer = threading.Thread(target=kill_after_some_answers)
        killer.start()
        build_chains(
            config(url, data_dir, tmp_path / "two", urls=(url, doomed_url), plan=plan,
                   health=QUICK_HEALTH, max_retries=2, concurrency=8)
        )  # fmt: skip
        killer.join()
    assert doomed.wait(5) == -signal.SIGKILL
    with run_sim_teacher(survivor, data_dir) as url:
        build_chains(config(url, data_dir, tmp_path / "one", plan=plan, concurrency=8))

    raw, _, two = assert_consistent(tmp_path / "two", all_ids(data_dir))
    _, _, one = assert_consistent(tmp_path / "one", all_ids(data_dir))
    doomed_host = doomed_url.removeprefix("http://").removesuffix("/v1")
    assert raw.filter(pl.col("teacher_url") == doomed_host).height > 0, "the kill came too early"
    assert raw.filter(pl.col("timestamp") > killed_at[0]).height > 0, "the kill came too late"
    assert raw.filter(pl.col("reason") == "request_error").height == 0
    assert verdicts(tmp_path / "two") == verdicts(tmp_path / "one")
    assert (two["images"], two["exhausted"]) == (one["images"], one["exhausted"])


def test_an_unhealthy_replica_leaves_the_rotation_and_comes_back(
    data_dir: Path, tmp_path: Path
) -> None:
    """A replica in an outage draws almost no traffic: it leaves after `eject_after` failures,
    the healthy one takes its share, and it rejoins when a probe answers."""
    slow = FAST | {"latency_ms": 200.0}
    sick = SimTeacherConfig(**slow | {"outage_after": 0, "outage_s": 0.5})
    with (
        run_sim_teacher(SimTeacherConfig(**slow), data_dir) as healthy,
        run_sim_teacher(sick, data_dir) as ailing,
    ):
        build_chains(
            config(healthy, data_dir, tmp_path, urls=(healthy, ailing), health=QUICK_HEALTH,
                   max_retries=3, concurrency=2)
        )  # fmt: skip
        ailing_stats = stats_of(ailing)
    _, _, stats = assert_consistent(tmp_path, all_ids(data_dir))
    assert stats["request_failures"]["requests"] == 0
    assert ailing_stats["outage"] <= 10, "the sick replica kept drawing traffic"
    assert ailing_stats["completions"] > 0, "the replica never came back"


def own_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def test_the_key_crosses_plain_http_only_to_this_machine_unless_named() -> None:
    assert key_travels("http://127.0.0.1:8000/v1", explicit=False)
    assert key_travels("http://localhost:8000/v1", explicit=False)
    assert key_travels("http://[::1]:8000/v1", explicit=False)
    assert key_travels("https://api.openai.com/v1", explicit=False)
    assert not key_travels("http://10.0.0.7:8000/v1", explicit=False)
    assert not key_travels("http://gpu-node-3:8000/v1", explicit=False)
    assert key_travels("http://10.0.0.7:8000/v1", explicit=True)
    urls = ("http://127.0.0.1:8000/v1", "http://10.0.0.7:8000/v1")
    assert withheld_key_urls(TeacherConfig(urls, "m", api_key="sk-x")) == [urls[1]]
    assert withheld_key_urls(TeacherConfig(urls, "m", api_key="sk-x", api_key_explicit=True)) == []
    assert withheld_key_urls(TeacherConfig(urls, "m")) == [], "no key, nothing withheld"


@pytest.fixture
def authorizations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Authorization header of every chat request the simulated teacher receives."""
    seen: list[str] = []
    handler = sim_teacher.SimTeacher.chat_completions

    async def recording(self, request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization", ""))
        return await handler(self, request)

    monkeypatch.setattr(sim_teacher.SimTeacher, "chat_completions", recording)
    return seen


@pytest.mark.parametrize("explicit", [False, True])
def test_openai_api_key_is_not_sent_over_plain_http_to_another_host(
    data_dir: Path, tmp_path: Path, authorizations: list[str], explicit: bool
) -> None:
    address = own_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    key = "sk-test-NOT-FOR-THE-NETWORK"
    with run_sim_teacher(SimTeacherConfig(**FAST), data_dir, host="0.0.0.0") as url:
        remote = url.replace("0.0.0.0", address)
        build_chains(
            config(remote, data_dir, tmp_path, api_key=key, api_key_explicit=explicit, limit=2)
        )
    assert authorizations and set(authorizations) == {f"Bearer {key if explicit else 'EMPTY'}"}


def test_records_state_how_each_answer_was_made(data_dir: Path, tmp_path: Path) -> None:
    """Seed, top_p, max_tokens, the server's model and fingerprint, when,
    and whether the image was downscaled, on every candidate."""
    plan = SamplingPlan(candidates=2, max_rounds=2, temperatures=(0.5, 0.8), seed=11)
    before = datetime.now(UTC)
    with run_sim_teacher(SimTeacherConfig(**FAST | {"p_wrong": 1.0}), data_dir) as url:
        stats = build_chains(config(url, data_dir, tmp_path, plan=plan))
    raw = outputs(tmp_path)[0]
    assert raw.height == IMAGES * 2 * 2
    expected = [
        plan.request_seed(id_, round_) for id_, round_ in raw.select("id", "round").iter_rows()
    ]
    assert raw["seed"].to_list() == expected
    assert raw.select("id", "round", "seed").unique().height == IMAGES * 2, "one seed per round"
    assert set(raw["top_p"]) == {1.0} and set(raw["max_tokens"]) == {1024}
    assert set(raw["server_model"]) == {"sim-teacher"}
    assert set(raw["system_fingerprint"]) == {"sim-3"}
    assert raw["timestamp"].min() >= before and raw["timestamp"].max() <= datetime.now(UTC)
    assert not raw["downscaled"].any()
    assert (stats["run"]["seed"], stats["run"]["top_p"]) == (11, 1.0)


def test_a_folder_keeps_one_teacher_and_one_prompt_unless_allow_mixed(
    data_dir: Path, tmp_path: Path
) -> None:
    with run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as url:
        build_chains(config(url, data_dir, tmp_path, limit=3))
    other = SimTeacherConfig(**FAST | {"model": "other-teacher"})
    with run_sim_teacher(other, data_dir) as url:
        version = load_prompt("teacher").version
        with pytest.raises(UserError) as refused:
            build_chains(config(url, data_dir, tmp_path, model="other-teacher"))
        assert str(refused.value).endswith(
            f"holds answers of teacher 'sim-teacher' with prompt version {version}; this run asks "
            f"teacher 'other-teacher' with prompt version {version}: pass another --out, or "
            "--allow-mixed to add to them"
        )
        stats = build_chains(
            config(url, data_dir, tmp_path, model="other-teacher", allow_mixed=True)
        )
    assert stats["images"] == {"attempted": IMAGES, "accepted": IMAGES}
    raw = outputs(tmp_path)[0]
    assert dict(raw.group_by("teacher").len().iter_rows()) == {
        "sim-teacher": 3 * 2,
        "other-teacher": (IMAGES - 3) * 2,
    }


def test_a_url_that_is_not_an_openai_api_is_one_line(data_dir: Path, tmp_path: Path) -> None:
    with run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as url:
        root = url.removesuffix("/v1")
        with pytest.raises(UserError) as refused:
            build_chains(config(root, data_dir, tmp_path))
    assert str(refused.value) == (
        f"teacher at {root} is not an OpenAI-compatible API (GET {root}/models answered HTTP 404): "
        "pass the base URL the API lives under, e.g. http://HOST:8000/v1"
    )


def test_a_404_mid_run_stops_in_one_line_and_keeps_what_was_answered(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica restarted with another model answers 404: no retry can fix that."""
    handler = sim_teacher.SimTeacher.chat_completions

    async def vanishing(self, request: web.Request) -> web.StreamResponse:
        if self.stats["requests"] >= 5:
            gone = {"error": {"message": "The model `sim-teacher` does not exist."}}
            return web.json_response(gone, status=404)
        return await handler(self, request)

    monkeypatch.setattr(sim_teacher.SimTeacher, "chat_completions", vanishing)
    with (
        run_sim_teacher(SimTeacherConfig(**FAST), data_dir) as url,
        pytest.raises(UserError) as stopped,
    ):
        build_chains(config(url, data_dir, tmp_path, concurrency=1, max_retries=3))
    assert str(stopped.value) == (
        f"teacher at {url} answered 404 to a chat completion (NotFoundError: HTTP 404: The model "
        "`sim-teacher` does not exist.): check --teacher-model and that the URL ends in /v1"
    )
    kept = read_candidates(tmp_path / "SynthDG" / "candidates")
    assert kept.height == 5 * 2 and kept["id"].n_unique() == 5


def test_a_second_build_on_the_same_folder_is_refused(data_dir: Path, tmp_path: Path) -> None:

    with (
        store_lock(tmp_path / "SynthDG"),
        pytest.raises(UserError, match="another `dbr build-chains` is writing to"),
    ):
        build_chains(config("http://127.0.0.1:9/v1", data_dir, tmp_path))


def test_the_exit_code_of_an_unresolved_build_is_documented() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "domainbed_reasoning", "build-chains", "--help"],
        capture_output=True, text=True, check=True, env=os.environ | {"COLUMNS": "200"},
    ).stdout  # fmt: skip
    assert "3 some selected images are unresolved because their requests failed" in " ".join(
        help_text.split()
    )

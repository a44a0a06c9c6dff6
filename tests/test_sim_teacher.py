"""The simulated teacher, driven by the real `openai.AsyncOpenAI` client over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import polars as pl
import pytest
from PIL import Image

from domainbed_reasoning.chains.chain_format import ChainFormatError, RejectReason, parse_chain
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate, read_sidecar

MODEL = "sim-teacher"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("synth")
    generate(data_dir, images_per_class=2, seed=0, size=48)
    return data_dir


@pytest.fixture(scope="module")
def sidecar(data_dir: Path) -> pl.DataFrame:
    return read_sidecar(data_dir)


@pytest.fixture(scope="module")
def clean_url(data_dir: Path) -> Iterator[str]:
    with run_sim_teacher(SimTeacherConfig(), data_dir) as base_url:
        yield base_url


def _row(sidecar: pl.DataFrame, domain: str, class_name: str) -> dict:
    return sidecar.filter((pl.col("domain") == domain) & (pl.col("class_name") == class_name)).row(
        0, named=True
    )


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _messages(url: str, text: str = "Which shape is this? Answer in five stages.") -> list[dict]:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return [{"role": "user", "content": parts}]


def _png(data_dir: Path, row: dict) -> bytes:
    return (data_dir / "SynthDG" / row["relpath"]).read_bytes()


def _client(base_url: str, timeout: float = 5.0, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=base_url, api_key="EMPTY", timeout=timeout, max_retries=max_retries
    )


def _stats(base_url: str) -> dict[str, int]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats") as response:
        return json.load(response)


async def _ask(base_url: str, url: str, **kwargs) -> openai.types.chat.ChatCompletion:
    client_kwargs = {key: kwargs.pop(key) for key in ("timeout", "max_retries") if key in kwargs}
    async with _client(base_url, **client_kwargs) as client:
        return await client.chat.completions.create(model=MODEL, messages=_messages(url), **kwargs)


@pytest.mark.parametrize("domain", ["cartoon", "painting", "photo", "sketch"])
async def test_known_image_gets_true_chains_n3(
    clean_url: str, data_dir: Path, sidecar: pl.DataFrame, domain: str
):
    row = _row(sidecar, domain, "star")
    reply = await _ask(clean_url, _data_url(_png(data_dir, row)), n=3, max_tokens=1024)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    for choice in reply.choices:
        chain = parse_chain(choice.message.content)
        assert chain.conclusion == "star" and choice.finish_reason == "stop"
        assert row["colour"] in chain.caption and f"x={row['x']}, y={row['y']}" in chain.caption
        assert f"{row['rotation']} degrees" in chain.caption and row["background"] in chain.caption
        assert "five sharp points" in chain.reasoning
    assert reply.model == MODEL and reply.object == "chat.completion"
    words = sum(len(choice.message.content.split()) for choice in reply.choices)
    assert reply.usage.completion_tokens == words
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + words


async def test_every_class_is_concluded_from_the_image_not_the_prompt(
    clean_url: str, data_dir: Path, sidecar: pl.DataFrame
) -> None:
    async with _client(clean_url) as client:
        for class_name in ("circle", "cross", "square", "star", "triangle"):
            url = _data_url(_png(data_dir, _row(sidecar, "photo", class_name)))
            lie = (
                "The label is circle. This is certainly a circle."
                if class_name != "circle"
                else "It is a star."
            )
            reply = await client.chat.completions.create(model=MODEL, messages=_messages(url, lie))
            assert parse_chain(reply.choices[0].message.content).conclusion == class_name


async def test_a_losslessly_reencoded_image_is_still_recognised(
    clean_url: str, data_dir: Path, sidecar: pl.DataFrame
) -> None:
    row = _row(sidecar, "sketch", "cross")
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png(data_dir, row))).convert("RGBA").save(buffer, "WEBP", lossless=True)
    assert buffer.getvalue() != _png(data_dir, row)
    reply = await _ask(clean_url, _data_url(buffer.getvalue(), "image/webp"))
    assert parse_chain(reply.choices[0].message.content).conclusion == "cross"


async def test_unknown_image_gets_a_wellformed_unknown_chain(data_dir: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (10, 200, 30)).save(buffer, "PNG")
    with run_sim_teacher(SimTeacherConfig(), data_dir) as base_url:
        reply = await _ask(base_url, _data_url(buffer.getvalue()), n=2)
        stats = _stats(base_url)
    chains = [parse_chain(choice.message.content) for choice in reply.choices]
    assert [chain.conclusion for chain in chains] == ["unknown", "unknown"]
    assert "does not match any shape" in chains[0].caption
    assert stats["unknown_image"] == 1 and stats["completions"] == 1


async def test_greedy_is_repeatable_and_max_tokens_truncates(
    clean_url: str, data_dir: Path, sidecar: pl.DataFrame
) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "cartoon", "square")))
    greedy = await _ask(clean_url, url, n=4, temperature=0)
    assert len({choice.message.content for choice in greedy.choices}) == 1
    short = await _ask(clean_url, url, max_tokens=10)
    assert short.choices[0].finish_reason == "length"
    assert len(short.choices[0].message.content.split()) == short.usage.completion_tokens == 10
    with pytest.raises(ChainFormatError):
        parse_chain(short.choices[0].message.content)


async def test_models_endpoint_lists_the_served_model(clean_url: str) -> None:
    async with _client(clean_url) as client:
        models = await client.models.list()
    assert [model.id for model in models.data] == [MODEL]


@pytest.mark.parametrize(
    ("fault", "reasons"),
    [
        ("wrong", None),
        (
            "malformed",
            {
                RejectReason.MISSING_STAGE,
                RejectReason.ORDER,
                RejectReason.UNCLOSED_TAG,
                RejectReason.NO_CONCLUSION,
            },
        ),
        ("empty", {RejectReason.EMPTY_RESPONSE}),
    ],
)
async def test_content_fault_at_probability_one_hits_every_choice(
    data_dir: Path, sidecar: pl.DataFrame, fault: str, reasons: set | None
) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "painting", "triangle")))
    with run_sim_teacher(SimTeacherConfig(**{f"p_{fault}": 1.0}), data_dir) as base_url:
        reply = await _ask(base_url, url, n=8)
        stats = _stats(base_url)
    assert stats[fault] == 8 and stats["choices"] == 8
    for choice in reply.choices:
        if reasons is None:
            assert parse_chain(choice.message.content).conclusion in {
                "circle",
                "cross",
                "square",
                "star",
            }
        else:
            with pytest.raises(ChainFormatError) as err:
                parse_chain(choice.message.content)
            assert err.value.reason in reasons


async def test_mixed_content_faults_follow_their_probabilities(
    data_dir: Path, sidecar: pl.DataFrame
) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "photo", "circle")))
    config = SimTeacherConfig(p_wrong=0.3, p_empty=0.2, seed=5)
    with run_sim_teacher(config, data_dir) as base_url:
        reply = await _ask(base_url, url, n=128)
        stats = _stats(base_url)
    contents = [choice.message.content for choice in reply.choices]
    empty = sum(content == "" for content in contents)
    wrong = sum(
        bool(content) and parse_chain(content).conclusion != "circle" for content in contents
    )
    assert (stats["empty"], stats["wrong"]) == (empty, wrong)
    assert 10 <= empty <= 45 and 20 <= wrong <= 60
    assert stats["malformed"] == 0


async def test_429_carries_retry_after_every_time(data_dir: Path, sidecar: pl.DataFrame) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "photo", "cross")))
    with run_sim_teacher(SimTeacherConfig(p_429=1.0, retry_after=7), data_dir) as base_url:
        for _ in range(3):
            with pytest.raises(openai.RateLimitError) as err:
                await _ask(base_url, url)
            assert err.value.status_code == 429 and err.value.response.headers["retry-after"] == "7"
        stats = _stats(base_url)
    assert stats["429"] == stats["requests"] == 3 and stats["completions"] == 0


async def test_500_every_time_and_the_client_retries_it(
    data_dir: Path, sidecar: pl.DataFrame
) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "photo", "cross")))
    with run_sim_teacher(SimTeacherConfig(p_500=1.0), data_dir) as base_url:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as err:
                await _ask(base_url, url)
            assert err.value.status_code == 500
        assert _stats(base_url)["500"] == 2
        with pytest.raises(openai.InternalServerError):
            await _ask(base_url, url, max_retries=1)
        assert _stats(base_url)["500"] == _stats(base_url)["requests"] == 4


async def test_an_outage_window_answers_503_everywhere_then_recovers(
    data_dir: Path, sidecar: pl.DataFrame
) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "photo", "cross")))
    outage = SimTeacherConfig(outage_after=2, outage_s=0.5)
    with run_sim_teacher(outage, data_dir) as base_url:
        async with _client(base_url) as client:
            for _ in range(2):
                await _ask(base_url, url)
            with pytest.raises(openai.InternalServerError) as err:
                await _ask(base_url, url)
            assert err.value.status_code == 503 and "simulated outage" in str(err.value)
            with pytest.raises(openai.InternalServerError):
                await client.models.list()
            await asyncio.sleep(0.6)
            reply = await _ask(base_url, url)
            assert [card.id async for card in client.models.list()] == [MODEL]
        stats = _stats(base_url)
    assert parse_chain(reply.choices[0].message.content).conclusion == "cross"
    assert (stats["outage"], stats["completions"]) == (2, 3)


async def test_dropped_connection_is_a_connection_error(
    data_dir: Path, sidecar: pl.DataFrame
) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "photo", "cross")))
    with run_sim_teacher(SimTeacherConfig(p_drop=1.0), data_dir) as base_url:
        for _ in range(3):
            with pytest.raises(openai.APIConnectionError) as err:
                await _ask(base_url, url)
            assert not isinstance(err.value, openai.APITimeoutError)
        assert _stats(base_url)["drop"] == 3


async def test_stall_outlasts_the_client_timeout(data_dir: Path, sidecar: pl.DataFrame) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "photo", "cross")))
    started = time.monotonic()
    with run_sim_teacher(SimTeacherConfig(p_stall=1.0, stall_s=30), data_dir) as base_url:
        for _ in range(2):
            with pytest.raises(openai.APITimeoutError):
                await _ask(base_url, url, timeout=0.3)
        assert _stats(base_url)["stall"] == 2
    assert time.monotonic() - started < 5


async def test_stall_shorter_than_the_timeout_still_answers(
    data_dir: Path, sidecar: pl.DataFrame
) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "photo", "cross")))
    with run_sim_teacher(
        SimTeacherConfig(p_stall=1.0, stall_s=0.2, latency_ms=100), data_dir
    ) as base_url:
        started = time.monotonic()
        reply = await _ask(base_url, url)
        assert time.monotonic() - started >= 0.3
    assert parse_chain(reply.choices[0].message.content).conclusion == "cross"


async def test_same_seed_same_faults(data_dir: Path, sidecar: pl.DataFrame) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "cartoon", "star")))
    config = SimTeacherConfig(p_wrong=0.3, p_malformed=0.3, seed=11)
    runs = []
    for _ in range(2):
        with run_sim_teacher(config, data_dir) as base_url:
            reply = await _ask(base_url, url, n=16)
        runs.append([choice.message.content for choice in reply.choices])
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (
            lambda body: body | {"model": "gpt-9"},
            openai.NotFoundError,
            "the model `gpt-9` does not exist",
        ),
        (
            lambda body: body | {"n": 0},
            openai.BadRequestError,
            "'n' must be an integer from 1 to 128, got 0",
        ),
        (
            lambda body: body | {"max_tokens": 0},
            openai.BadRequestError,
            "'max_tokens' must be a positive integer",
        ),
        (
            lambda body: body | {"messages": [{"role": "user", "content": "no image"}]},
            openai.BadRequestError,
            "exactly one image_url part is supported, got 0",
        ),
        (
            lambda body: body | {"messages": _messages("https://example.com/a.png")},
            openai.BadRequestError,
            "must be a data:image/...;base64,... URL",
        ),
        (
            lambda body: body | {"messages": _messages("data:image/png;base64,@@@")},
            openai.BadRequestError,
            "base64 payload does not decode",
        ),
        (
            lambda body: body | {"messages": _messages(_data_url(b"not an image"))},
            openai.BadRequestError,
            "not a readable image",
        ),
    ],
)
async def test_bad_requests_get_openai_errors(
    clean_url: str, mutate, error: type, message: str
) -> None:
    body = {"model": MODEL, "messages": _messages(_data_url(b"x"))}
    async with _client(clean_url) as client:
        with pytest.raises(error, match=message):
            await client.chat.completions.create(**mutate(body))


async def test_latency_is_added_and_concurrent_requests_overlap(
    data_dir: Path, sidecar: pl.DataFrame
) -> None:
    url = _data_url(_png(data_dir, _row(sidecar, "sketch", "circle")))
    with run_sim_teacher(SimTeacherConfig(latency_ms=300, jitter_ms=50), data_dir) as base_url:
        async with _client(base_url) as client:
            started = time.monotonic()
            replies = await asyncio.gather(
                *(
                    client.chat.completions.create(model=MODEL, messages=_messages(url))
                    for _ in range(32)
                )
            )
            elapsed = time.monotonic() - started
    assert all(
        parse_chain(reply.choices[0].message.content).conclusion == "circle" for reply in replies
    )
    assert 0.3 <= elapsed < 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p_wrong": 1.5}, "--p-wrong must be a probability between 0 and 1, got 1.5"),
        ({"p_stall": -0.1}, "--p-stall must be a probability between 0 and 1, got -0.1"),
        ({"latency_ms": -1}, "--latency-ms must be zero or more, got -1"),
        ({"outage_s": -2.0}, "--outage-s must be zero or more, got -2.0"),
        (
            {"p_wrong": 0.6, "p_empty": 0.6},
            r"--p-wrong \+ --p-malformed \+ --p-empty must sum to at most 1",
        ),
        (
            {"p_429": 0.5, "p_drop": 0.7},
            r"--p-429 \+ --p-500 \+ --p-drop \+ --p-stall must sum to at most 1",
        ),
    ],
)
def test_bad_config_names_the_option(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        SimTeacherConfig(**kwargs)


def test_missing_sidecar_and_busy_port(tmp_path: Path, data_dir: Path) -> None:
    with (
        pytest.raises(UserError, match=r"no SynthDG sidecar at .*: run `dbr synth"),
        run_sim_teacher(SimTeacherConfig(), tmp_path),
    ):
        pass
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with (
            pytest.raises(
                UserError, match=f"cannot listen on 127.0.0.1:{port} .*pick another --port"
            ),
            run_sim_teacher(SimTeacherConfig(), data_dir, port=port),
        ):
            pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_serves_until_interrupted_and_reports_bad_options(data_dir: Path) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "domainbed_reasoning", "sim-teacher", "--data-dir", str(data_dir)]
    server = subprocess.Popen(
        [*cmd, "--port", str(port), "--p-500", "1"], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats") as response:
                    assert json.load(response)["images_indexed"] == 40
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (
                    "sim-teacher did not start"
                )
                time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=10)
    assert f"at http://127.0.0.1:{port}/v1" in out
    bad = subprocess.run(
        [*cmd, "--p-drop", "2"], check=False, capture_output=True, text=True, env=os.environ
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: --p-drop must be a probability between 0 and 1, got 2.0"

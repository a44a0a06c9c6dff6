"""Batch files and the OpenAI Batch API client, against the simulated teacher's /v1/files and
/v1/batches (the remote service boundary, served on 127.0.0.1)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import polars as pl
import pytest
from domainbed_reasoning.builders.batch.batch_files import (
    BatchRequest,
    Journal,
    Part,
    parse_results,
    read_requests,
    write_parts,
)
from domainbed_reasoning.builders.batch.openai_batch import OpenAIBatches
from domainbed_reasoning.builders.transport.image_payload import PayloadPolicy, image_data_url
from domainbed_reasoning.builders.transport.teacher_client import encode_messages, request_body

from domainbed_reasoning.chains.chain_format import parse_chain
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.sim_batches import SimBatchConfig
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import generate

MODEL = "sim-teacher"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, images_per_class=1, seed=0, size=32)
    return root


def batch_requests(data_dir: Path, count: int, model: str = MODEL) -> list[tuple[BatchRequest, bytes]]:
    manifest = scan_dataset(get_spec("SynthDG"), data_dir).frame.head(count)
    requests = []
    for image_id, path in manifest.select("id", "path").iter_rows():
        messages = encode_messages("Which shape?", image_data_url(path, PayloadPolicy()).data_url)
        body = request_body(messages, {"model": model, "n": 2, "temperature": 0.7, "max_tokens": 512})
        requests.append((BatchRequest(image_id, 1, 0.7, seed=11), body))
    return requests


def test_parts_are_the_batch_format_with_a_sidecar_of_requests(data_dir: Path, tmp_path: Path) -> None:
    part = write_parts(batch_requests(data_dir, 3), tmp_path, "round-1")[0]
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    assert [set(row) for row in rows] == [{"custom_id", "method", "url", "body"}] * 3
    assert {(row["method"], row["url"]) for row in rows} == {("POST", "/v1/chat/completions")}
    assert rows[0]["body"]["n"] == 2 and rows[0]["body"]["messages"][0]["role"] == "user"
    sidecar = read_requests(part)
    assert sidecar["custom_id"].to_list() == [row["custom_id"] for row in rows]
    assert sidecar["id"].to_list() == scan_dataset(get_spec("SynthDG"), data_dir).frame["id"].head(3).to_list()
    assert set(sidecar["seed"]) == {11} and max(len(custom) for custom in sidecar["custom_id"]) <= 64


def test_parts_split_under_the_request_and_size_limits(tmp_path: Path) -> None:
    requests = [(BatchRequest(f"img-{i}", 1, 0.7), b"{}") for i in range(25)]
    line = len(write_parts(requests[:1], tmp_path, "one")[0].read_bytes())
    by_count = write_parts(requests, tmp_path, "r1", max_requests=10)
    assert [len(p.read_bytes().splitlines()) for p in by_count] == [10, 10, 5]
    by_size = write_parts(requests, tmp_path, "r2", max_bytes=4 * line + 1)
    assert [read_requests(p).height for p in by_size] == [4] * 6 + [1]
    assert pl.concat([read_requests(p) for p in by_size])["id"].to_list() == [f"img-{i}" for i in range(25)]
    with pytest.raises(UserError, match="lower --max-side"):
        write_parts(requests, tmp_path, "r3", max_bytes=line - 1)


def test_results_and_errors_are_parsed() -> None:
    text = "\n".join(
        json.dumps(row)
        for row in [
            {"custom_id": "a", "response": {"status_code": 200, "body": {"choices": []}}, "error": None},
            {"custom_id": "b", "response": {"status_code": 400, "body": {"error": {"message": "bad image"}}}},
            {"custom_id": "c", "response": None, "error": {"code": "batch_expired", "message": "too late"}},
        ]
    )
    results = {result.custom_id: result for result in parse_results(text)}
    assert results["a"].completion == {"choices": []} and results["a"].error is None
    assert results["b"].completion is None and "bad image" in results["b"].error
    assert results["c"].error == "batch_expired: too late"
    with pytest.raises(ValueError, match="line 1"):
        list(parse_results("not json"))


def test_the_journal_survives_a_restart_and_refuses_garbage(tmp_path: Path) -> None:
    journal = Journal.load(tmp_path)
    journal.parts.append(Part(input_path="p.jsonl", requests=3, batch_id="batch-1"))
    journal.save()
    again = Journal.load(tmp_path)
    assert again.parts == journal.parts and again.open_parts() == journal.parts
    again.parts[0].ingested = True
    assert again.open_parts() == []
    (tmp_path / "batches.json").write_text("{")
    with pytest.raises(UserError, match="batch journal .* is unreadable"):
        Journal.load(tmp_path)


@pytest.fixture
def batch_api(data_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    settings = getattr(request, "param", SimBatchConfig())
    with run_sim_teacher(SimTeacherConfig(), data_dir, batches=settings) as url:
        yield url


def sent_part(data_dir: Path, folder: Path, count: int) -> tuple[Journal, Part]:
    journal = Journal.load(folder)
    path = write_parts(batch_requests(data_dir, count), folder, "round-1")[0]
    part = Part(input_path=str(path), requests=count)
    journal.parts.append(part)
    return journal, part


def stats(url: str) -> dict:
    client = openai.OpenAI(base_url=url, api_key="EMPTY")
    return client.get(url.removesuffix("/v1") + "/stats", cast_to=object)


def test_a_batch_is_uploaded_run_and_downloaded(batch_api: str, data_dir: Path, tmp_path: Path) -> None:
    journal, part = sent_part(data_dir, tmp_path, 4)
    batches = OpenAIBatches(batch_api, "EMPTY", {"dataset": "SynthDG"}, poll_s=0.01)
    progress: list[tuple[int, int]] = []
    batches.submit(part, journal)
    batches.wait(part, journal, lambda _, done, total: progress.append((done, total)))
    assert part.status == "completed" and progress[-1] == (4, 4)
    assert Journal.load(tmp_path).parts[0].batch_id == part.batch_id
    results = list(parse_results(Path(part.output_path).read_text()))
    assert len(results) == 4 and part.errors_path is None
    assert {result.custom_id for result in results} == set(read_requests(Path(part.input_path))["custom_id"])
    for result in results:
        answers = [choice["message"]["content"] for choice in result.completion["choices"]]
        assert len(answers) == 2 and all(parse_chain(answer).conclusion for answer in answers)


def test_a_killed_run_polls_its_batch_instead_of_paying_twice(
    batch_api: str, data_dir: Path, tmp_path: Path
) -> None:
    journal, part = sent_part(data_dir, tmp_path, 2)
    batches = OpenAIBatches(batch_api, "EMPTY", {"dataset": "SynthDG"}, poll_s=0.01)
    batches.submit(part, journal)
    created = part.batch_id
    part.batch_id = None  # killed after the API created the batch, before the journal said so
    batches.submit(part, journal)
    assert part.batch_id == created
    batches.submit(part, journal)  # and a journal that knows it sends nothing at all
    assert stats(batch_api)["batches_created"] == 1 and stats(batch_api)["files_uploaded"] == 1


@pytest.mark.parametrize(
    "batch_api", [SimBatchConfig(outcome="expired", answered=1)], indirect=True
)
def test_an_expired_batch_returns_what_it_finished_and_errors_for_the_rest(
    batch_api: str, data_dir: Path, tmp_path: Path
) -> None:
    journal, part = sent_part(data_dir, tmp_path, 3)
    batches = OpenAIBatches(batch_api, "EMPTY", {"dataset": "SynthDG"}, poll_s=0.01)
    batches.submit(part, journal)
    batches.wait(part, journal, lambda *_: None)
    assert part.status == "expired"
    assert len(list(parse_results(Path(part.output_path).read_text()))) == 1
    errors = list(parse_results(Path(part.errors_path).read_text()))
    assert [error.error.split(":")[0] for error in errors] == ["batch_expired"] * 2


@pytest.mark.parametrize("batch_api", [SimBatchConfig(outcome="failed")], indirect=True)
def test_a_failed_batch_has_no_results(batch_api: str, data_dir: Path, tmp_path: Path) -> None:
    journal, part = sent_part(data_dir, tmp_path, 2)
    batches = OpenAIBatches(batch_api, "EMPTY", {"dataset": "SynthDG"}, poll_s=0.01)
    batches.submit(part, journal)
    batches.wait(part, journal, lambda *_: None)
    assert part.status == "failed" and part.output_path is None and part.errors_path is None


def test_the_simulated_api_validates_input_files_as_openai_does(
    batch_api: str, data_dir: Path, tmp_path: Path
) -> None:
    mixed = batch_requests(data_dir, 1) + batch_requests(data_dir, 1, model="other")
    path = write_parts(mixed, tmp_path, "bad")[0]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace("r1-000001", "r1-000000")]) + "\n")
    journal = Journal.load(tmp_path)
    part = Part(input_path=str(path), requests=2)
    batches = OpenAIBatches(batch_api, "EMPTY", {"dataset": "SynthDG"}, poll_s=0.01)
    batches.submit(part, journal)
    batch = batches.client.batches.retrieve(part.batch_id)
    while batch.status == "validating":
        batch = batches.client.batches.retrieve(part.batch_id)
    messages = {error.message for error in batch.errors.data}
    assert batch.status == "failed"
    assert "all requests of a batch must use the same model" in messages
    assert "every line needs a custom_id, unique in the file" in messages


def test_an_unreachable_api_is_one_line(tmp_path: Path, data_dir: Path) -> None:
    journal, part = sent_part(data_dir, tmp_path, 1)
    batches = OpenAIBatches("http://127.0.0.1:9/v1", "EMPTY", max_retries=0, timeout=2)
    with pytest.raises(UserError, match="Batch API at http://127.0.0.1:9/v1: sending round-1-000.jsonl failed"):
        batches.submit(part, journal)

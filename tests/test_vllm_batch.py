"""vLLM's offline batch runner, for real: the tiny Qwen2-VL on the vLLM CPU build answers a
batch file written in the OpenAI Batch format, with no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from builders.batch_files import BatchRequest, parse_results, read_requests, write_parts
from builders.image_payload import PayloadPolicy, image_data_url
from builders.teacher_client import encode_messages, request_body
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.data.scan import scan_dataset
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.synth import generate
from domainbed_reasoning.serving.vllm_batch import BATCH_MODULE, batch_command, run_batch
from domainbed_reasoning.serving.vllm_server import ServerConfig


def tiny_config(model: Path, vllm_python: Path, log: Path) -> ServerConfig:
    return ServerConfig(
        model=str(model),
        served_model_name="tiny-teacher",
        max_model_len=2048,
        dtype="float32",
        vllm_python=vllm_python,
        log_path=log,
    )


def test_the_batch_command_carries_the_engine_flags() -> None:
    config = ServerConfig(model="org/model", served_model_name="t", tensor_parallel_size=2, extra_args=("--seed", "1"))
    argv = batch_command(config, Path("/py"), Path("in.jsonl"), Path("out.jsonl"))
    assert argv[:7] == ["/py", "-m", BATCH_MODULE, "-i", "in.jsonl", "-o", "out.jsonl"]
    flags = " ".join(argv)
    assert "--model org/model --served-model-name t --tensor-parallel-size 2" in flags
    assert "--host" not in flags and argv[-2:] == ["--seed", "1"]


def test_a_missing_model_folder_is_one_line(tmp_path: Path) -> None:
    config = ServerConfig(model=str(tmp_path / "nothing-here"), vllm_python=Path("/bin/true"))
    with pytest.raises(UserError, match="has no config.json"):
        run_batch(config, tmp_path / "in.jsonl", tmp_path / "out.jsonl")


def test_run_batch_answers_a_batch_file_with_the_tiny_model(
    tiny_qwen2vl: Path, vllm_python: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    generate(data_dir, images_per_class=1, seed=3)
    manifest = scan_dataset(get_spec("SynthDG"), data_dir).frame.head(3)
    requests = []
    for image_id, path in manifest.select("id", "path").iter_rows():
        messages = encode_messages("Which shape is it?", image_data_url(path, PayloadPolicy()).data_url)
        fields = {"model": "tiny-teacher", "n": 2, "temperature": 0.8, "max_tokens": 12}
        requests.append((BatchRequest(image_id, 1, 0.8), request_body(messages, fields)))
    unknown = request_body(messages, {"model": "not-served", "n": 1, "max_tokens": 4})
    requests.append((BatchRequest("SynthDG/unknown", 1, 0.8), unknown))
    part = write_parts(requests, tmp_path, "round-1")[0]
    output = tmp_path / "round-1-000.output.jsonl"

    run_batch(tiny_config(tiny_qwen2vl, vllm_python, tmp_path / "vllm.log"), part, output)

    image_of = dict(read_requests(part).select("custom_id", "id").iter_rows())
    results = {image_of[r.custom_id]: r for r in parse_results(output.read_text())}
    assert set(results) == set(manifest["id"]) | {"SynthDG/unknown"}
    for image_id in manifest["id"]:
        completion = results[image_id].completion
        assert len(completion["choices"]) == 2
        assert completion["usage"]["prompt_tokens"] > 0 and completion["usage"]["completion_tokens"] > 0
    assert results["SynthDG/unknown"].completion is None and results["SynthDG/unknown"].error

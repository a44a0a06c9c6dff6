"""Generation engines: in-process transformers, a real vLLM server (CPU build) and a remote API.

All three answer the same `GenRequest`s; the vLLM engine is started once for the
whole file, with an adapter that touches the vision tower (the merge path).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from domainbed_reasoning.builders.transport.replicas import HealthPolicy, TeacherEngineDied
from domainbed_reasoning.builders.transport.teacher_client import withheld_key_urls
from domainbed_reasoning.train.engines import merge
from domainbed_reasoning.train.engines.base import GenerationEngine, GenRequest, SamplingSpec
from domainbed_reasoning.train.engines.factory import open_engine
from domainbed_reasoning.train.engines.remote_engine import RemoteEngine
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.engines.transformers_engine import TransformersEngine
from domainbed_reasoning.train.engines.vllm_engine import (
    LORA_NAME,
    VLLMEngine,
    serving_plan,
    touches_vision,
)
from domainbed_reasoning.train.model.lora import lora_config
from domainbed_reasoning.train.model.processor import ImageLimits
from peft import get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText

from domainbed_reasoning.chains.matching import matcher_for
from domainbed_reasoning.chains.prompt_templates import class_list, load_prompt
from domainbed_reasoning.chains.verdict import judge
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, run_sim_teacher
from domainbed_reasoning.offline.synth import SPEC, generate, read_sidecar
from domainbed_reasoning.serving.vllm_server import free_port

GREEDY = SamplingSpec(max_new_tokens=12)
SAMPLED = SamplingSpec(n=3, temperature=1.0, max_new_tokens=8, seed=1)
PROMPT = load_prompt("reason").render(classes=class_list(SPEC.classes))


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("synth")
    generate(data_dir, images_per_class=1, seed=0, size=64)
    return data_dir


@pytest.fixture(scope="module")
def labelled(synth_dir: Path) -> list[tuple[GenRequest, str]]:
    """One request per SynthDG image (4 domains x 5 classes), with its true class."""
    root = synth_dir / SPEC.dirname
    rows = read_sidecar(synth_dir).sort("relpath").iter_rows(named=True)
    return [
        (
            GenRequest(row["relpath"], (root / row["relpath"]).read_bytes(), PROMPT),
            row["class_name"],
        )
        for row in rows
    ]


@pytest.fixture(scope="module")
def requests_(labelled: list[tuple[GenRequest, str]]) -> list[GenRequest]:
    return [request for request, _ in labelled[:6]]


def random_adapter(model: Path, out: Path, train_vision: bool) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so it really changes the model."""
    base = AutoModelForImageTextToText.from_pretrained(model)
    peft_model = get_peft_model(base, lora_config(base, 8, 16, 0.0, train_vision))
    torch.manual_seed(0)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vision_adapter(tiny_qwen2vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_adapter(tiny_qwen2vl, tmp_path_factory.mktemp("vision-adapter"), True)


@pytest.fixture(scope="module")
def language_adapter(tiny_qwen2vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_adapter(tiny_qwen2vl, tmp_path_factory.mktemp("language-adapter"), False)


@pytest.fixture(scope="module")
def base_engine(tiny_qwen2vl: Path) -> Iterator[GenerationEngine]:
    with open_engine(EngineSettings("transformers", batch_size=4), str(tiny_qwen2vl)) as engine:
        yield engine


def texts(generations: list) -> list[tuple[str, ...]]:
    return [generation.texts for generation in generations]


# --- transformers engine -------------------------------------------------------------------------------


def test_greedy_is_deterministic_with_one_text_per_request(
    base_engine: GenerationEngine, requests_: list[GenRequest]
) -> None:
    first = base_engine.generate(requests_, GREEDY, progress=False)
    second = base_engine.generate(requests_, GREEDY, progress=False)
    assert first == second
    assert [len(g.texts) for g in first] == [1] * len(requests_)
    assert all(g.error is None and g.texts[0] for g in first)
    # A random model never says its end token within 12 tokens: every answer was cut.
    assert {reason for g in first for reason in g.finish_reasons} == {"length"}


def test_sampling_gives_n_candidates_reproducible_by_seed(
    base_engine: GenerationEngine, requests_: list[GenRequest]
) -> None:
    sampled = base_engine.generate(requests_, SAMPLED, progress=False)
    assert [len(g.texts) for g in sampled] == [3] * len(requests_)
    assert [len(g.finish_reasons) for g in sampled] == [3] * len(requests_)
    assert any(len(set(g.texts)) > 1 for g in sampled)
    assert base_engine.generate(requests_, SAMPLED, progress=False) == sampled
    reseeded = SamplingSpec(n=3, temperature=1.0, max_new_tokens=8, seed=2)
    assert texts(base_engine.generate(requests_, reseeded, progress=False)) != texts(sampled)


def test_prompt_is_the_training_chat_format(base_engine: TransformersEngine) -> None:
    text = base_engine.prompt_text(PROMPT)
    assert text.count("<|image_pad|>") == 1
    assert text.index("<|vision_start|>") < text.index(PROMPT)
    assert text.endswith(f"{PROMPT}<|im_end|>\n<|im_start|>assistant\n")


def test_an_answer_that_ends_with_the_end_token_is_a_stop(
    tiny_qwen2vl: Path, tmp_path: Path, requests_: list[GenRequest]
) -> None:
    # The same weights, but every token ends the answer: generation stops after one token.
    stopper = shutil.copytree(tiny_qwen2vl, tmp_path / "stopper")
    config_path = stopper / "generation_config.json"
    config = json.loads(config_path.read_text())
    vocab = json.loads((stopper / "config.json").read_text())["text_config"]["vocab_size"]
    config["eos_token_id"] = list(range(vocab))
    config_path.write_text(json.dumps(config))
    with open_engine(EngineSettings("transformers"), str(stopper)) as engine:
        generations = engine.generate(requests_[:2], GREEDY, progress=False)
    assert [g.finish_reasons for g in generations] == [("stop",), ("stop",)]


def test_an_adapter_changes_the_answers(
    tiny_qwen2vl: Path,
    vision_adapter: Path,
    language_adapter: Path,
    base_engine: GenerationEngine,
    requests_: list[GenRequest],
) -> None:
    base = texts(base_engine.generate(requests_, GREEDY, progress=False))
    for adapter in (vision_adapter, language_adapter):
        with open_engine(EngineSettings("transformers", batch_size=4), str(tiny_qwen2vl), adapter) as engine:
            adapted = texts(engine.generate(requests_, GREEDY, progress=False))
        assert adapted != base


def test_an_unreadable_image_is_a_failed_generation_not_a_crash(
    base_engine: GenerationEngine, requests_: list[GenRequest]
) -> None:
    broken = GenRequest("broken.png", b"not an image", PROMPT)
    generations = base_engine.generate([requests_[0], broken], GREEDY, progress=False)
    assert generations[0].error is None and len(generations[0].texts) == 1
    assert generations[1].texts == ()
    assert generations[1].error == (
        "image broken.png: the image bytes are not a readable image (UnidentifiedImageError)"
    )


def test_the_engine_loads_the_dtype_it_is_given_by_name(tiny_qwen2vl: Path) -> None:
    with open_engine(EngineSettings("transformers", dtype="bfloat16"), str(tiny_qwen2vl)) as engine:
        assert engine.model.dtype == torch.bfloat16


def test_llava_architecture_generates_too(tiny_llava: Path, requests_: list[GenRequest]) -> None:
    with open_engine(EngineSettings("transformers", batch_size=3), str(tiny_llava)) as engine:
        generations = engine.generate(requests_[:3], SAMPLED, progress=False)
    assert [len(g.texts) for g in generations] == [3, 3, 3]


def wide_requests(count: int) -> list[GenRequest]:
    """4:1 images, which InternVL tiles into a row of crops plus a thumbnail."""
    requests = []
    for index in range(count):
        buffer = io.BytesIO()
        Image.new("RGB", (224, 56), (60 * index % 256, 120, 200)).save(buffer, format="PNG")
        requests.append(GenRequest(f"wide-{index}.png", buffer.getvalue(), PROMPT))
    return requests


def test_internvl_architecture_generates_with_its_tiles_capped(tiny_internvl: Path) -> None:
    with open_engine(EngineSettings("transformers", batch_size=2), str(tiny_internvl)) as engine:
        generations = engine.generate(wide_requests(3), SAMPLED, progress=False)
        tiles = engine.processor.image_processor.max_patches
    assert [len(g.texts) for g in generations] == [3, 3, 3] and tiles == 4
    limits = ImageLimits(max_tiles=2)
    with open_engine(EngineSettings("transformers", image_limits=limits), str(tiny_internvl)) as engine:
        assert engine.processor.image_processor.max_patches == 2
        capped = engine.generate(wide_requests(3), GREEDY, progress=False)
    assert all(g.error is None for g in capped)


def test_answers_depend_on_the_batch_not_on_what_came_before(
    base_engine: GenerationEngine, requests_: list[GenRequest]
) -> None:
    """A share that starts on a batch boundary (batch_size 4) samples what one process would."""
    whole = base_engine.generate(requests_, SAMPLED, progress=False)
    assert base_engine.generate(requests_[4:], SAMPLED, progress=False) == whole[4:]


# --- remote engine (the simulated teacher) ---------------------------------------------------------------


def test_remote_engine_returns_the_teachers_chains_in_request_order(
    synth_dir: Path, labelled: list[tuple[GenRequest, str]]
) -> None:
    matcher = matcher_for(tuple(SPEC.classes))
    requests = [request for request, _ in labelled]
    with (
        run_sim_teacher(SimTeacherConfig(), synth_dir) as base_url,
        open_engine(EngineSettings("remote", base_url=base_url), "sim-teacher") as engine,
    ):
        generations = engine.generate(requests, SamplingSpec(n=2, temperature=1.0), progress=False)
    assert [len(g.texts) for g in generations] == [2] * len(requests)
    for generation, (_, label) in zip(generations, labelled, strict=True):
        for text, reason in zip(generation.texts, generation.finish_reasons, strict=True):
            assert judge(text, matcher, label, reason).accepted


def test_remote_failures_after_retries_are_values(
    synth_dir: Path, requests_: list[GenRequest]
) -> None:
    with (
        run_sim_teacher(SimTeacherConfig(p_500=1.0), synth_dir) as base_url,
        RemoteEngine("sim-teacher", base_url=base_url, max_retries=0) as engine,
    ):
        generations = engine.generate(requests_[:2], GREEDY, progress=False)
    assert [g.texts for g in generations] == [(), ()]
    assert all(g.error and "InternalServerError" in g.error for g in generations)


def test_a_served_engine_that_died_stops_generation_naming_its_log(
    synth_dir: Path, requests_: list[GenRequest]
) -> None:
    health = HealthPolicy(outage_wait_s=1800.0, server_log="runs/x/vllm.log")
    with (
        run_sim_teacher(SimTeacherConfig(engine_dead_after=0), synth_dir) as base_url,
        RemoteEngine("sim-teacher", base_url=base_url, health=health) as engine,
        pytest.raises(TeacherEngineDied, match=r"its log: runs/x/vllm\.log\): restart the teacher"),
    ):
        engine.generate(requests_[:2], GREEDY, progress=False)


def test_remote_engine_that_does_not_answer_fails_at_open() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError, match=rf"^remote engine: teacher at {url} is not reachable"):
        RemoteEngine("gpt-4o", base_url=url, max_retries=0)


def test_remote_engine_names_a_model_it_does_not_serve(synth_dir: Path) -> None:
    with (
        run_sim_teacher(SimTeacherConfig(), synth_dir) as base_url,
        pytest.raises(UserError, match=r"does not serve model 'gpt-4o' \(it serves sim-teacher\)"),
    ):
        open_engine(EngineSettings("remote", base_url=base_url), "gpt-4o")


@pytest.mark.parametrize("named", [True, False])
def test_a_key_named_by_api_key_env_also_goes_to_a_plain_http_host(
    named: bool, synth_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in the builder: OPENAI_API_KEY found by default stays off plain http beyond this machine."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")
    monkeypatch.setenv("ZERO_SHOT_KEY", "sk-named")
    far = "http://10.1.2.3:8000/v1"
    with (
        run_sim_teacher(SimTeacherConfig(), synth_dir) as base_url,
        open_engine(EngineSettings("remote", base_url=base_url, api_key_env="ZERO_SHOT_KEY" if named else None), "sim-teacher") as engine,
    ):
        assert withheld_key_urls(replace(engine.base, urls=(far,))) == ([] if named else [far])


# --- errors ----------------------------------------------------------------------------------------------


def test_unknown_kind() -> None:
    with pytest.raises(
        UserError, match=r"^unknown engine 'tgi': choose one of transformers, vllm, remote$"
    ):
        open_engine(EngineSettings("tgi"), "model")


@pytest.mark.parametrize("kind", ["transformers", "vllm"])
def test_missing_model_folder(kind: str, tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=rf"^model folder {tmp_path}/nope not found or has no config.json"
    ):
        open_engine(EngineSettings(kind), str(tmp_path / "nope"))


@pytest.mark.parametrize("kind", ["transformers", "vllm"])
def test_adapter_folder_without_adapter_config(
    kind: str, tiny_qwen2vl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A python that exists: the adapter must be refused before anything is started.
    monkeypatch.setenv("DBR_VLLM_PYTHON", "/bin/sh")
    with pytest.raises(
        UserError,
        match=rf"^adapter folder {tmp_path} has no adapter_config.json: pass the `adapter/`",
    ):
        open_engine(EngineSettings(kind), str(tiny_qwen2vl), tmp_path)


@pytest.mark.parametrize("kind", ["transformers", "vllm"])
def test_a_full_checkpoint_passed_as_adapter_is_named(
    kind: str, tiny_qwen2vl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBR_VLLM_PYTHON", "/bin/sh")
    with pytest.raises(
        UserError,
        match=rf"^{tiny_qwen2vl} is a full checkpoint \(config.json\), not a LoRA adapter",
    ):
        open_engine(EngineSettings(kind), str(tiny_qwen2vl), tiny_qwen2vl)


def test_remote_engine_refuses_an_adapter(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match="a remote engine serves its own weights, it cannot apply adapter"
    ):
        open_engine(EngineSettings("remote", base_url="http://127.0.0.1:1/v1"), "gpt-4o", tmp_path)


def test_vllm_engine_without_vllm_says_make_vllm_env(tiny_qwen2vl: Path) -> None:
    with pytest.raises(
        UserError, match=r"vLLM python /no/python does not exist: run `make vllm-env`"
    ):
        open_engine(EngineSettings("vllm", vllm_python=Path("/no/python")), str(tiny_qwen2vl))


def test_adapter_rank_above_vllms_limit(tiny_qwen2vl: Path, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1024}))
    with pytest.raises(
        UserError, match=r"LoRA rank 1024, above vLLM's maximum 512: use the transformers engine"
    ):
        open_engine(EngineSettings("vllm", vllm_python=Path("/bin/sh")), str(tiny_qwen2vl), tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n": 4}, r"4 copies of the greedy answer: set a temperature above 0"),
        ({"n": 0}, r"^sampling n=0: ask for at least 1"),
        ({"temperature": -1.0}, r"^temperature -1.0: must be 0 \(greedy\) or more"),
        ({"max_new_tokens": 0}, r"^max_new_tokens 0: must be at least 1"),
    ],
)
def test_bad_sampling(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        SamplingSpec(**options)


def test_bad_batch_size(tiny_qwen2vl: Path) -> None:
    with pytest.raises(UserError, match=r"^--batch-size 0: must be at least 1$"):
        open_engine(EngineSettings("transformers", batch_size=0), str(tiny_qwen2vl))


# --- vLLM engine: which adapters are merged, then one real server ---------------------------------------


def test_only_adapters_on_the_vision_tower_are_merged(
    tiny_qwen2vl: Path, vision_adapter: Path, language_adapter: Path, tmp_path: Path
) -> None:
    assert touches_vision(str(tiny_qwen2vl), vision_adapter)
    assert not touches_vision(str(tiny_qwen2vl), language_adapter)
    served, lora_modules, request_model = serving_plan(
        str(tiny_qwen2vl), language_adapter, tmp_path
    )
    assert (served, lora_modules, request_model) == (
        str(tiny_qwen2vl),
        {LORA_NAME: language_adapter},
        LORA_NAME,
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def vllm_engine(
    tiny_qwen2vl: Path,
    vision_adapter: Path,
    vllm_python: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[VLLMEngine]:
    with VLLMEngine(
        str(tiny_qwen2vl),
        vision_adapter,
        vllm_python=vllm_python,
        log_path=tmp_path_factory.mktemp("vllm-engine") / "server.log",
    ) as engine:
        yield engine


def test_vllm_engine_serves_the_merged_checkpoint(
    vllm_engine: VLLMEngine, requests_: list[GenRequest]
) -> None:
    served = Path(vllm_engine.server.config.model)
    assert served.parent == vllm_engine.work_dir and (served / "model.safetensors").is_file()
    assert vllm_engine.server.config.lora_modules == {}
    greedy = vllm_engine.generate(requests_, GREEDY, progress=False)
    assert [len(g.texts) for g in greedy] == [1] * len(requests_)
    assert vllm_engine.generate(requests_, GREEDY, progress=False) == greedy
    sampled = vllm_engine.generate(requests_, SAMPLED, progress=False)
    assert [len(g.texts) for g in sampled] == [3] * len(requests_)
    assert all(r in {"stop", "length"} for g in sampled for r in g.finish_reasons)


def test_vllm_engine_agrees_with_transformers_on_the_merged_model(
    vllm_engine: VLLMEngine, tiny_qwen2vl: Path, vision_adapter: Path, requests_: list[GenRequest]
) -> None:
    """Same prompt format, same image processing, same weights: the same greedy answer."""
    short = SamplingSpec(max_new_tokens=4)
    with open_engine(EngineSettings("transformers", batch_size=1), str(tiny_qwen2vl), vision_adapter) as engine:
        expected = texts(engine.generate(requests_, short, progress=False))
    assert texts(vllm_engine.generate(requests_, short, progress=False)) == expected


def test_vllm_engine_reports_a_bad_image_as_a_value(
    vllm_engine: VLLMEngine, requests_: list[GenRequest]
) -> None:
    broken = GenRequest("broken.png", b"\x89PNG\r\n\x1a\n truncated", PROMPT)
    generations = vllm_engine.generate([broken, requests_[0]], GREEDY, progress=False)
    assert generations[0].texts == () and generations[0].error
    assert generations[1].error is None and len(generations[1].texts) == 1


def test_vllm_samples_are_seeded_per_image_so_a_redone_share_repeats_the_first_try(
    vllm_engine: VLLMEngine, requests_: list[GenRequest]
) -> None:
    """A SARR share redone after a kill asks its images alone, beside other requests than the
    first try's: each image's chains come from its own seed (run seed, round, image id), so they
    are the first try's; the next round draws other chains."""
    round_1 = SamplingSpec(n=2, temperature=1.0, max_new_tokens=8, seed=0, round=1)
    first = texts(vllm_engine.generate(requests_, round_1, progress=False))
    redone = texts(vllm_engine.generate(requests_[2:], round_1, progress=False))
    assert redone == first[2:]
    round_2 = texts(vllm_engine.generate(requests_, replace(round_1, round=2), progress=False))
    assert round_2 != first


def test_a_server_that_died_is_a_clear_error_and_closing_cleans_up(
    vllm_engine: VLLMEngine, requests_: list[GenRequest]
) -> None:
    # Runs after the module server's other tests: it kills that server.
    work_dir, process = vllm_engine.work_dir, vllm_engine.server.process
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with pytest.raises(UserError, match=r"^vLLM server for .*merged exited with code -9: "):
        vllm_engine.generate(requests_[:1], GREEDY, progress=False)
    vllm_engine.close()
    assert vllm_engine.server is None and not work_dir.exists()


def test_vllm_serves_internvl_and_agrees_with_transformers_under_the_same_tile_cap(
    tiny_internvl: Path, vllm_python: Path, tmp_path: Path
) -> None:
    """InternVL3's `*-hf` layout on vLLM's CPU build, its tile cap passed as --mm-processor-kwargs."""
    limits = ImageLimits(max_tiles=2)
    requests = wide_requests(4)
    short = SamplingSpec(max_new_tokens=4)
    with open_engine(EngineSettings("transformers", image_limits=limits, batch_size=1), str(tiny_internvl)) as engine:
        expected = texts(engine.generate(requests, short, progress=False))
    with VLLMEngine(
        str(tiny_internvl),
        vllm_python=vllm_python,
        image_limits=limits,
        max_model_len=2048,
        log_path=tmp_path / "server.log",
    ) as engine:
        assert engine.server.config.mm_processor_kwargs == {"max_patches": 2}
        assert texts(engine.generate(requests, short, progress=False)) == expected


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_process_killed_mid_generation_takes_its_vllm_server_with_it(
    tiny_qwen2vl: Path, vllm_python: Path, tmp_path: Path
) -> None:
    """What torchrun does to the other ranks when one fails: SIGTERM. The server, in a session
    of its own, must be stopped by the dying process, not left holding the GPU."""
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    repo = Path(__file__).resolve().parents[1]
    worker = subprocess.Popen(
        [sys.executable, str(repo / "tests" / "workers" / "vllm_killed.py"),
         str(tiny_qwen2vl), str(image), str(vllm_python), str(tmp_path)],
        cwd=repo, env=os.environ | {"PYTHONPATH": str(repo)},
    )  # fmt: skip
    try:
        for _ in range(6000):  # the server's start-up, at most ten minutes
            if (tmp_path / "generating").is_file() or worker.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "generating").is_file(), "the worker never started generating"
        server = int((tmp_path / "server.pid").read_text())
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 128 + signal.SIGTERM
        assert not _group_alive(server)
    finally:
        worker.kill()
        if (tmp_path / "server.pid").is_file() and _group_alive(server := int((tmp_path / "server.pid").read_text())):
            os.killpg(server, signal.SIGKILL)


def test_the_processes_of_a_machine_share_one_merged_checkpoint(
    tiny_qwen2vl: Path, vision_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first process to take the folder's lock merges; one arriving meanwhile waits for it
    and serves the same folder instead of writing its own copy."""
    merges = []
    real_merge = merge.merge_adapter
    monkeypatch.setattr(merge, "merge_adapter", lambda *args: merges.append(args[2]) or real_merge(*args))
    at_the_lock, real_flock = threading.Event(), fcntl.flock

    def flock(file, operation) -> None:
        at_the_lock.set()
        real_flock(file, operation)

    monkeypatch.setattr(merge.fcntl, "flock", flock)
    folder = tmp_path / "step"
    folder.mkdir()
    with open(folder / merge.LOCK, "w") as lock:  # another process of the machine, merging now
        real_flock(lock, fcntl.LOCK_EX)
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            merge.merged_checkpoint, str(tiny_qwen2vl), vision_adapter, folder
        )
        assert at_the_lock.wait(timeout=60)
        real_merge(str(tiny_qwen2vl), vision_adapter, folder / merge.MERGED)  # what it writes
    assert waiting.result(timeout=60) == folder / merge.MERGED and merges == []
    merge.discard_merged(folder)
    assert merge.merged_checkpoint(str(tiny_qwen2vl), vision_adapter, folder) == folder / merge.MERGED
    assert merges == [folder / merge.MERGED] and (folder / merge.MERGED / "config.json").is_file()


def test_a_merged_folder_is_served_only_for_the_weights_it_was_made_from(
    tiny_qwen2vl: Path, vision_adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder left by another checkpoint, or by a run trained again since, is merged anew."""
    merges = []
    real_merge = merge.merge_adapter
    monkeypatch.setattr(merge, "merge_adapter", lambda *args: merges.append(args[1]) or real_merge(*args))
    other = tmp_path / "checkpoint-2"
    shutil.copytree(vision_adapter, other)
    folder = tmp_path / "step"
    for adapter in (vision_adapter, vision_adapter, other):
        merge.merged_checkpoint(str(tiny_qwen2vl), adapter, folder)
    assert merges == [vision_adapter, other]
    weights = other / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    merge.merged_checkpoint(str(tiny_qwen2vl), other, folder)
    assert merges == [vision_adapter, other, other]


def test_the_size_of_a_merge_is_known_before_the_base_loads(tiny_qwen2vl: Path, tmp_path: Path) -> None:
    weights = (tiny_qwen2vl / "model.safetensors").stat().st_size
    assert merge.checkpoint_bytes(str(tiny_qwen2vl)) == weights
    assert merge.checkpoint_bytes(str(tmp_path)) is None


def test_a_merge_without_room_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=rf"^the merged checkpoint for vLLM needs [\d.]+ GiB in {tmp_path}, which has [\d.]+ GiB free: .*vllm_merge_dir"):
        merge.check_space(tmp_path, 2**70)

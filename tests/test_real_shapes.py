"""What a user's `--model` brings, met on random-weight models with real checkpoints' files.

InternVL3-2B-hf and Qwen2-VL-2B-Instruct as saved on the Hub, minus the weights: their
151k-token tokenizers, chat templates and processors, with 2-layer random weights
(`real_shapes.build_real_shape`). Through the commands a user runs: `dbr train --method
mtct` with LoRA on both towers, one SARR self-labelling round, `dbr eval` in both modes,
the token budget at real image sizes, and the real vLLM CPU server serving the model as
`dbr build-chains`' teacher and as the vLLM engine (one server for both).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import datasets
import polars as pl
import pytest
from domainbed_reasoning.builders.store.candidate_store import read_candidates
from domainbed_reasoning.train.engines.base import GenRequest, SamplingSpec
from domainbed_reasoning.train.engines.vllm_engine import SERVED_NAME, VLLMEngine
from domainbed_reasoning.train.model.processor import ImageLimits, load_processor
from domainbed_reasoning.train.mtct.mtct_data import build_examples, task_prompt, user_message
from domainbed_reasoning.train.mtct.mtct_trainer import LENGTH_STEP, MTCTTrainer
from domainbed_reasoning.train.mtct.token_budget import image_tokens, longest_prompt
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig
from trl.data_utils import apply_chat_template
from typer.testing import CliRunner

from domainbed_reasoning import artefacts
from domainbed_reasoning.chains.chain_format import format_chain
from domainbed_reasoning.cli import app
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.offline.synth import generate

CLASSES = get_spec("SynthDG").classes
PROMPT = task_prompt("reasoning", CLASSES)
SIZES = {"227x227": (227, 227), "640x480": (480, 640), "16:9": (720, 1280)}  # (height, width)
# Image tokens the checkpoints' own processors spend, as their model cards describe:
# InternVL3 a 448-px tile (256 tokens) per crop plus a thumbnail, between <img> and </img>;
# Qwen2-VL one token per 28x28 pixels.
IMAGE_TOKENS = {
    "real_internvl": {"227x227": 256 + 2, "640x480": 13 * 256 + 2, "16:9": 9 * 256 + 2},
    "real_qwen2vl": {"227x227": 64, "640x480": 391, "16:9": 1196},
}
# With the training defaults (image_max_tiles 6, image_max_pixels 1,003,520).
CAPPED_TOKENS = {
    "real_internvl": {"227x227": 256 + 2, "640x480": 7 * 256 + 2, "16:9": 3 * 256 + 2},
    "real_qwen2vl": IMAGE_TOKENS["real_qwen2vl"],
}


def dbr(*argv: str) -> str:
    result = CliRunner().invoke(app, list(argv), env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def real_length(processor, size: tuple[int, int]) -> int:
    text = apply_chat_template({"prompt": user_message(PROMPT)}, processor)["prompt"]
    image = Image.new("RGB", (size[1], size[0]), "gray")
    return len(processor(images=[[image]], text=[text], add_special_tokens=False)["input_ids"][0])


@pytest.mark.parametrize("fixture", ["real_internvl", "real_qwen2vl"])
def test_training_groups_rows_by_what_their_images_cost(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The length-grouped sampler counts the tokens the checkpoint's processor spends on each
    image: a 640x480 photo's class-name row ranks longer than a 227x227 image's chain row."""
    model_dir = request.getfixturevalue(fixture)
    chain = format_chain(
        {"summary": "s", "caption": "a red circle " * 20, "reasoning": "r", "reflection": "f", "conclusion": "circle"}
    )
    sizes = [SIZES["227x227"], SIZES["640x480"]]
    split = datasets.Dataset.from_list(
        [
            {"id": f"SynthDG/photo/circle/{i}.png", "label": 0, "image": Image.new("RGB", (w, h)), "chain": chain}
            for i, (h, w) in enumerate(sizes)
        ],
        features=datasets.Features(
            {
                "id": datasets.Value("string"),
                "label": datasets.ClassLabel(names=list(CLASSES)),
                "image": datasets.Image(),
                "chain": datasets.Value("string"),
            }
        ),
    )
    examples = build_examples(split, "mtct", CLASSES)  # cls, reasoning of 227x227, then of 640x480
    args = SFTConfig(
        output_dir=str(tmp_path), train_sampling_strategy="group_by_length", use_cpu=True, report_to="none"
    )
    trainer = MTCTTrainer(
        model=AutoModelForImageTextToText.from_pretrained(model_dir),
        args=args,
        train_dataset=examples,
        processing_class=AutoProcessor.from_pretrained(model_dir),
    )
    lengths = trainer._get_train_sampler().lengths
    assert lengths[2] > lengths[1] > lengths[0] and lengths[3] > lengths[2]
    assert abs(lengths[2] - IMAGE_TOKENS[fixture]["640x480"] // LENGTH_STEP) <= 1


@pytest.mark.parametrize("fixture", ["real_internvl", "real_qwen2vl"])
def test_the_token_budget_at_real_image_sizes(fixture: str, request: pytest.FixtureRequest) -> None:
    model = str(request.getfixturevalue(fixture))
    for limits, expected in ((None, IMAGE_TOKENS), (ImageLimits(6, 1003520), CAPPED_TOKENS)):
        processor = load_processor(model, limits)
        counted = {name: image_tokens(processor, [size])[0] for name, size in SIZES.items()}
        assert counted == expected[fixture]
        text = real_length(processor, (32, 32)) - image_tokens(processor, [(32, 32)])[0]
        for name, size in SIZES.items():
            assert real_length(processor, size) == text + counted[name], name
        assert longest_prompt(processor, PROMPT) >= text + max(counted.values())


def test_real_templates_and_padding(real_internvl: Path, real_qwen2vl: Path) -> None:
    """Qwen2-VL's template adds a system prompt and its tokenizer pads on the left; InternVL's neither."""
    rendered = {}
    for name, model in (("internvl", real_internvl), ("qwen2vl", real_qwen2vl)):
        processor = load_processor(str(model))
        rendered[name] = apply_chat_template({"prompt": user_message(PROMPT)}, processor)["prompt"]
    assert rendered["qwen2vl"].startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert rendered["internvl"].startswith("<|im_start|>user\n<IMG_CONTEXT>\n")


TRAIN = [
    "max_train_images=4", "max_steps=1", "per_device_batch_size=2", "global_batch_size=4",
    "gradient_checkpointing=false", "save_steps=1", "logging_steps=1", "learning_rate=1e-3",
    "dataloader_num_workers=0", "train_vision=true",
]  # fmt: skip


@pytest.fixture(scope="module", params=["real_internvl", "real_qwen2vl"])
def mtct_run(
    request: pytest.FixtureRequest, export_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """(model, finished `dbr train --method mtct` run) with LoRA on the vision and language towers."""
    model = request.getfixturevalue(request.param)
    out = tmp_path_factory.mktemp(request.param)
    dbr(
        "train", "SynthDG", "--data", str(export_dir), "--target", "sketch", "--model", str(model),
        "--out", str(out), "--method", "mtct", "--no-evaluate",
        *(arg for pair in TRAIN for arg in ("--set", pair)),
    )  # fmt: skip
    return model, out / "SynthDG" / "sketch" / "mtct"


def test_mtct_trains_lora_on_both_towers_of_a_real_checkpoint(mtct_run: tuple[Path, Path]) -> None:
    model, run_dir = mtct_run
    vision = "visual" if "qwen2_vl" in (model / "config.json").read_text() else "vision_tower"
    trained = list(load_file(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any(f".{vision}." in name for name in trained)
    assert any(".language_model." in name for name in trained)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    losses = [entry for entry in metrics["log_history"] if "loss_cls" in entry]
    assert losses and all(entry["loss_cls"] > 0 and entry["loss_reasoning"] > 0 for entry in losses)


def test_eval_in_both_modes_scores_every_image(mtct_run: tuple[Path, Path]) -> None:
    _, run_dir = mtct_run
    dbr("eval", "--run", str(run_dir), "--direct-tokens", "4", "--max-new-tokens", "8", "--no-progress")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for split in ("test", "validation"):
        for mode in ("direct", "reasoning"):
            scores = metrics["results"][split][mode]
            assert scores["n"] > 0 and "request_error" not in scores["unparseable_reasons"], (split, mode)


@pytest.mark.parametrize("mtct_run", ["real_internvl"], indirect=True)  # the paper's backbone
def test_one_sarr_round_labels_every_image_with_the_transformers_engine(
    mtct_run: tuple[Path, Path], export_dir: Path
) -> None:
    model, mtct = mtct_run
    out = mtct.parents[2] / "rd-mldg"
    sarr = [
        *TRAIN, "sarr_rounds=1", f"sarr_round0_from={mtct}",
        "self_label_candidates=2", "self_label_temperature=1.0", "self_label_max_new_tokens=8",
        "generation_batch_size=2",
    ]  # fmt: skip
    dbr(
        "train", "SynthDG", "--data", str(export_dir), "--target", "sketch", "--model", str(model),
        "--out", str(out), "--method", "rd-mldg", "--no-evaluate",
        *(arg for pair in sarr for arg in ("--set", pair)),
    )  # fmt: skip
    run_dir = out / "SynthDG" / "sketch" / "rd-mldg"
    stats = json.loads((run_dir / "round-1" / "self_label_stats.json").read_text())
    assert stats["images"] == 4 and stats["candidates"] == 8
    assert pl.read_parquet(run_dir / "round-1" / "self_labels.parquet").height == 4
    assert (run_dir / "metrics.json").is_file()


# --- the real vLLM CPU server, one for the module: the vLLM engine's own, also `dbr build-chains`' teacher


@pytest.fixture(scope="module")
def internvl_served(
    real_internvl: Path, vllm_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMEngine]:
    log = tmp_path_factory.mktemp("vllm-real") / "server.log"
    with VLLMEngine(
        str(real_internvl), vllm_python=vllm_python, max_model_len=4096, log_path=log
    ) as engine:
        yield engine


def photo(size: tuple[int, int], colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_the_vllm_engine_answers_seeded_requests_at_real_image_sizes(
    internvl_served: VLLMEngine,
) -> None:
    """A 640x480 photo is 13 tiles, a 3,447-token prompt: prefilled whole, seeded, answered."""
    requests = [
        GenRequest(f"{name}-{colour}", photo(size, colour), PROMPT)
        for name, size in SIZES.items()
        for colour in ("red", "blue")
    ]
    sampling = SamplingSpec(n=2, temperature=1.0, max_new_tokens=8, seed=7)
    generations = internvl_served.generate(requests, sampling, progress=False)
    assert [g.error for g in generations] == [None] * len(requests)
    assert all(len(g.texts) == 2 for g in generations)
    assert "--no-enable-chunked-prefill" in internvl_served.server.process.args


def test_build_chains_with_the_real_checkpoint_as_teacher_answers_every_request(
    internvl_served: VLLMEngine, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    generate(data_dir, images_per_class=1, seed=3, size=227)
    out = tmp_path / "chains"
    dbr(
        "build-chains", "SynthDG", "--data-dir", str(data_dir), "--out", str(out),
        "--teacher-url", internvl_served.server.base_url, "--teacher-model", SERVED_NAME,
        "--candidates", "2", "--max-rounds", "1", "--max-tokens", "16", "--concurrency", "8",
        "--no-progress",
    )  # fmt: skip
    spec = get_spec("SynthDG")
    candidates = read_candidates(artefacts.candidates_dir(artefacts.chains_dir(out, spec)))
    images = len(spec.domains) * len(spec.classes)
    assert candidates.height == images * 2
    assert "request_error" not in set(candidates["reason"])
    assert candidates["prompt_tokens"].min() > 256  # the prompt and a whole 448-px tile

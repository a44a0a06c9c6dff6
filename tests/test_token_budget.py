"""Image limits per architecture and the longest request checked against the engine's context.

The budget is the processor's own count; these tests hold it against what the processor
really produces, on the three tiny architectures and on an InternVL processor at
InternVL3's real tile size (448 px, 256 tokens a tile, up to 12 tiles plus a thumbnail).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.evaluation.evaluate import (
    EvalSettings,
    ZeroShotRequest,
    evaluate_model,
)
from domainbed_reasoning.train.model.processor import ImageLimits, load_processor
from domainbed_reasoning.train.mtct.mtct_data import task_prompt, user_message
from domainbed_reasoning.train.mtct.token_budget import (
    PROBE_RATIOS,
    check_budget,
    longest_prompt,
    probe_size,
)
from domainbed_reasoning.train.stages.run import train
from PIL import Image
from trl.data_utils import apply_chat_template

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.offline.tiny_models import build_tiny_model, cached_tiny_model

CLASSES = ("circle", "cross", "square", "star", "triangle")
PROMPT = task_prompt("reasoning", CLASSES)


def real_length(processor, size: tuple[int, int]) -> int:
    """Tokens the processor really produces for the prompt with a (height, width) image."""
    text = apply_chat_template({"prompt": user_message(PROMPT)}, processor)["prompt"]
    image = Image.new("RGB", (size[1], size[0]), "gray")
    return len(processor(images=[[image]], text=[text], add_special_tokens=False)["input_ids"][0])


@pytest.mark.parametrize("fixture", ["tiny_qwen2vl", "tiny_llava", "tiny_internvl"])
def test_the_budget_is_what_the_processor_really_produces(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    processor = load_processor(str(request.getfixturevalue(fixture)))
    longest = longest_prompt(processor, PROMPT)
    real = [real_length(processor, probe_size(ratio)) for ratio in PROBE_RATIOS[:8]]
    assert max(real) == longest


@pytest.fixture(scope="module")
def internvl3_sized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A processor with InternVL3's tiling (448-px tiles, up to 12, 256 tokens each)."""
    return cached_tiny_model(
        build_tiny_model, tmp_path_factory.mktemp("internvl3"), architecture="internvl",
        tile_size=448, max_tiles=12,
    )


def test_internvl3_tiles_cost_3300_tokens_and_the_default_cap_halves_them(
    internvl3_sized: Path,
) -> None:
    text_only = longest_prompt(load_processor(str(internvl3_sized), ImageLimits(max_tiles=1)), PROMPT)
    text = text_only - 256 - 2  # one tile, between <img> and </img>
    uncapped = longest_prompt(load_processor(str(internvl3_sized)), PROMPT)
    capped = longest_prompt(load_processor(str(internvl3_sized), ImageLimits(max_tiles=6)), PROMPT)
    assert uncapped - text == 13 * 256 + 2  # 12 tiles + thumbnail, as a 4:3 photo gets
    assert capped - text == 7 * 256 + 2
    four_three = real_length(load_processor(str(internvl3_sized)), (480, 640))
    assert four_three == uncapped  # a 640x480 photo already gets all 12 tiles


def test_a_request_longer_than_the_context_is_one_line_naming_the_fix(tiny_qwen2vl: Path) -> None:
    processor = load_processor(str(tiny_qwen2vl))
    budget = check_budget(processor, PROMPT, 100, 4096, "evaluation", "raise --max-model-len")
    assert budget.fits and budget.needed == longest_prompt(processor, PROMPT) + 100
    with pytest.raises(UserError) as error:
        check_budget(processor, PROMPT, 1024, 512, "SARR self-labelling", "raise vllm_max_model_len")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"SARR self-labelling needs up to {budget.needed - 100 + 1024:,} tokens")
    assert message.endswith("more than the context of 512: raise vllm_max_model_len")


def test_training_is_refused_before_it_starts_when_self_labelling_cannot_fit(
    train_request, export_dir: Path, tiny_qwen2vl: Path, tmp_path: Path
) -> None:
    request = train_request(
        export_dir, tiny_qwen2vl, tmp_path, method="rd-mldg", engine="vllm", vllm_max_model_len=256,
        self_label_max_new_tokens=1024,
    )  # fmt: skip
    with pytest.raises(UserError, match="SARR self-labelling with the vllm engine needs up to .* "
                       "more than the context of 256: use --set vllm_max_model_len=512"):  # fmt: skip
        train(request)
    assert not list(tmp_path.rglob("checkpoints"))


def test_evaluation_is_refused_before_the_engine_starts(
    export_dir: Path, tmp_path: Path, tiny_internvl: Path
) -> None:
    request = ZeroShotRequest("SynthDG", str(export_dir), "sketch", str(tiny_internvl), tmp_path)
    settings = EvalSettings(engine=EngineSettings("vllm", max_model_len=16), progress=False)
    with pytest.raises(
        UserError,
        match=r"^evaluation \(direct mode\) with the vllm engine needs up to .* raise --max-model-len \(now 16\)",
    ):
        evaluate_model(request, settings)
    assert not (tmp_path / "SynthDG" / "sketch").exists()

"""Token counts, prices and the dry-run estimate: OpenAI's published examples, a real processor."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from domainbed_reasoning.builders.cost.dry_run import (
    ASSUMED_ANSWER_TOKENS,
    DryRunInputs,
    Measured,
    estimate,
    measure,
    render,
)
from domainbed_reasoning.builders.cost.pricing import GPT_4O, resolve_price
from domainbed_reasoning.builders.cost.token_estimate import (
    high_detail_tiles,
    openai_image_tokens,
    processor_prompt_tokens,
    sent_size,
    text_tokens,
    tile_cost,
)
from domainbed_reasoning.builders.store.candidate_store import CANDIDATE_SCHEMA
from PIL import Image
from transformers import AutoProcessor

from domainbed_reasoning.errors import UserError

GPT_4O_TILES = tile_cost("gpt-4o")


@pytest.mark.parametrize(
    ("size", "detail", "tokens"),
    [
        ((1024, 1024), "high", 765),  # OpenAI's examples: scaled to 768x768, 4 tiles
        ((2048, 4096), "high", 1105),  # 1024x2048, then 768x1536: 6 tiles
        ((4096, 8192), "low", 85),  # low is flat
        ((227, 227), "high", 255),  # PACS: one tile, never enlarged
        ((227, 227), "auto", 255),  # auto is counted as high
        ((513, 200), "high", 425),  # two tiles wide
    ],
)
def test_gpt4o_image_tokens_follow_the_tile_formula(size: tuple[int, int], detail: str, tokens: int) -> None:
    assert openai_image_tokens(*size, detail, GPT_4O_TILES) == tokens


def test_model_families_and_unknown_models() -> None:
    assert tile_cost("gpt-4o-2024-08-06") == GPT_4O_TILES
    mini = tile_cost("gpt-4o-mini-2024-07-18")
    assert (mini.base, mini.tile) == (2833, 5667)
    assert openai_image_tokens(227, 227, "high", mini) == 2833 + 5667
    assert tile_cost("teacher") is None and tile_cost("gpt-4oo") is None
    with pytest.raises(UserError, match="--detail 'medium'"):
        openai_image_tokens(10, 10, "medium", GPT_4O_TILES)


def test_sizes_sent_and_tiles() -> None:
    assert sent_size(2048, 1536, 1024) == (1024, 768)
    assert sent_size(227, 227, 1024) == (227, 227)
    assert high_detail_tiles(768, 768) == 4 and high_detail_tiles(512, 512) == 1
    assert text_tokens("x" * 400) == 100 + 7


def test_prices_list_batch_user_and_unknown() -> None:
    assert resolve_price("gpt-4o", None, None, batch=False) == GPT_4O
    batch = resolve_price("gpt-4o", None, None, batch=True)
    assert (batch.input, batch.output) == (1.25, 5.0) and "Batch API" in batch.source
    assert GPT_4O.describe().startswith("$2.50 in / $10.00 out per 1M tokens (OpenAI list price since 2024-08-06")
    assert "$0.075 in / $0.30 out" in resolve_price("gpt-4o-mini", None, None, batch=True).describe()
    assert resolve_price("teacher", None, None, batch=False) is None
    mine = resolve_price("teacher", 0.1, 0.2, batch=True)
    assert (mine.input, mine.output) == (0.1, 0.2)  # typed prices are taken as given
    assert mine.cost(1_000_000, 500_000) == pytest.approx(0.2)
    with pytest.raises(UserError, match="go together"):
        resolve_price("gpt-4o", 1.0, None, batch=False)


def images(count: int, rounds_left: int = 3, size: int = 227) -> pl.DataFrame:
    return pl.DataFrame(
        {"width": [size] * count, "height": [size] * count, "rounds_left": [rounds_left] * count}
    )


def inputs(**overrides) -> DryRunInputs:
    settings = {
        "dataset": "PACS",
        "selected": 100,
        "images": images(100),
        "model": "gpt-4o",
        "prompt": "p" * 400,
        "candidates": 4,
        "max_tokens": 1024,
        "max_side": 1024,
        "detail": "high",
        "price": GPT_4O,
    }
    return DryRunInputs(**(settings | overrides))


def test_dry_run_ranges_and_cost_for_gpt4o() -> None:
    result = estimate(inputs())
    per_request = 255 + 107
    assert result.requests == (100, 300)
    assert result.prompt_tokens == (100 * per_request, 300 * per_request)
    assert result.answer_tokens == ASSUMED_ANSWER_TOKENS
    low = GPT_4O.cost(100 * per_request, 100 * 4 * ASSUMED_ANSWER_TOKENS)
    assert result.cost(0, result.answer_tokens) == pytest.approx(low)
    text = "\n".join(render(result))
    assert "100 (every image accepted at its next round) to 300" in text
    assert f"${low:,.2f} to" in text and "at most $" in text
    assert "assumed; none measured yet" in text and "Left out" in text


def test_unknown_price_and_unknown_tokens_are_said_not_guessed() -> None:
    result = estimate(inputs(model="teacher", price=None))
    text = "\n".join(render(result))
    assert result.prompt_tokens is None and result.cost(0, 400) is None
    assert "no price known for model 'teacher': pass --price-in and --price-out" in text
    assert "unknown for model 'teacher': pass --teacher-checkpoint" in text
    assert "cost " not in text


def candidates(rows: list[tuple]) -> pl.DataFrame:
    """(id, round, index, reason, prompt_tokens, completion_tokens) rows of the candidate store."""
    base = {name: None for name in CANDIDATE_SCHEMA} | {"teacher": "gpt-4o", "temperature": 0.7}
    records = [
        base
        | dict(zip(("id", "round", "candidate_index", "reason", "prompt_tokens", "completion_tokens"), row, strict=True))
        for row in rows
    ]
    return pl.DataFrame(records, schema=CANDIDATE_SCHEMA)


def test_measured_figures_replace_the_assumptions() -> None:
    store = candidates(
        [
            ("a", 1, 0, "accepted", 700, 800),
            ("a", 1, 1, "wrong_class", 700, 800),
            ("b", 1, 0, "wrong_class", 500, 400),
            ("b", 1, 1, "wrong_class", 500, 400),
            ("c", 1, 0, "request_error", 0, 0),
        ]
    )
    measured = measure(store, "gpt-4o")
    assert measured == Measured(requests=2, prompt_tokens=600.0, answer_tokens=300.0, acceptance=0.5)
    assert measure(store, "another-model") is None
    assert measured.expected_requests(3) == pytest.approx(1 + 0.5 + 0.25)
    result = estimate(inputs(measured=measured))
    assert result.prompt_tokens == (60_000, 180_000)
    assert result.expected_requests == pytest.approx(175)
    assert "measured" in result.answer_source and "175 at the measured acceptance" in "\n".join(render(result))


def test_a_local_teachers_prompt_is_counted_by_its_processor(tiny_qwen2vl: Path) -> None:
    prompt = "Which class is this? dog, elephant, giraffe."
    counts = processor_prompt_tokens(str(tiny_qwen2vl), prompt, [(56, 56), (112, 112), (56, 56)])
    assert set(counts) == {(56, 56), (112, 112)}
    processor = AutoProcessor.from_pretrained(tiny_qwen2vl)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    real = processor(text=[text], images=[Image.new("RGB", (112, 112), "red")])
    assert counts[(112, 112)] == len(real["input_ids"][0])
    assert counts[(112, 112)] > counts[(56, 56)]  # more pixels, more image tokens
    local = inputs(model="teacher", price=None, prompt=prompt, processor=str(tiny_qwen2vl), images=images(3, size=112))
    result = estimate(local)
    assert result.prompt_tokens == (3 * counts[(112, 112)], 9 * counts[(112, 112)])
    with pytest.raises(UserError, match="--teacher-checkpoint .* no processor loads from it"):
        processor_prompt_tokens(str(tiny_qwen2vl / "missing"), prompt, [(8, 8)])

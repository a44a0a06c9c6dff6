"""One packed row per image for MTCT: the prefix both paths share is computed once.

An image's class-name row and reasoning row start with the same tokens - chat template,
image tokens, most of the question and the class list - and differ only from the task's
own words on. Packed, the row is `[shared prefix][class-name suffix][reasoning suffix]`:
the image tokens appear once (the vision tower runs once per image), every token keeps
the position it has in its own row, and a 4-D additive attention mask lets each suffix
see the prefix and itself, causally, never the other suffix. Each token then has the
same hidden state as in its own row, so the per-example losses - and the MTCT loss built
from them - are today's.

The prefix is cut before the first scored token of either row (the last prefix token
would otherwise have to predict two different next tokens) and must hold every image
token of both rows; a pair that does not meet that stays two rows, in the same batch.
Labels are passed pre-shifted (`shift_labels`), each from its own row, so the first
token of a suffix is predicted from the token before it in its own row.

Eager and SDPA attention take such a mask; flash-attention (varlen needs contiguous
documents, not a prefix tree), flex attention and architectures whose positions are not
known here train as two rows, said once in the log (`sharing_blocker`).

Flash-attention gets the other saving instead: a padding-free micro-batch (`flat`), every
example one after the other in a single row with no padding, each at its own positions
(restarting from 0, which is how transformers' varlen path finds where an example ends;
Qwen2-VL's text positions go first, as its model expects for packed input). The
bookkeeping - which token came from which row, its label, its position - is the same
`pack_batch` as for the shared prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

MASK_BACKENDS = ("eager", "sdpa")
# Backends that run the examples of a padding-free row apart, from their positions alone.
VARLEN_BACKENDS = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")
# 1-D RoPE positions are a row's column; Qwen2-VL's 3-D ones come from its own get_rope_index.
POSITIONS_OF = {"llava": "columns", "internvl": "columns", "qwen2_vl": "rope_index"}
# The keys TRL's vision collator emits for these architectures; any other means an unknown layout.
KNOWN_KEYS = {
    "input_ids",
    "attention_mask",
    "labels",
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
}
PREFIX, PAD = 0, -1


def flat_blocker(config: Any) -> str | None:
    """Why this model cannot train padding-free, or None when it can."""
    backend = getattr(config, "_attn_implementation", None) or "sdpa"
    if config.model_type not in POSITIONS_OF:
        return f"model type {config.model_type} is not one whose positions are known here"
    if backend not in VARLEN_BACKENDS:
        return f"attention backend {backend} would attend across examples of one row"
    return None


def sharing_blocker(config: Any) -> str | None:
    """Why this model cannot train with a shared prefix, or None when it can."""
    backend = getattr(config, "_attn_implementation", None) or "sdpa"
    if config.model_type not in POSITIONS_OF:
        return (
            f"model type {config.model_type} is not one whose positions the shared prefix knows "
            f"({', '.join(POSITIONS_OF)})"
        )
    if backend not in MASK_BACKENDS:
        return (
            f"attention backend {backend} cannot take the prefix-sharing 4-D mask "
            f"(set attn_implementation to {' or '.join(MASK_BACKENDS)} to share)"
        )
    return None


@dataclass(frozen=True)
class Segment:
    """Columns [start, end) of two-row batch row `row`, placed in a packed row as segment `segment`."""

    row: int
    start: int
    end: int
    segment: int


def shared_length(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    image: torch.Tensor,
    rows: list[int],
    lengths: list[int],
) -> int:
    """How many leading tokens the rows of one image can share; 0 when they cannot.

    The shared tokens are identical in every row, end before each row's first scored
    token, and include every image token of every row.
    """
    if len(rows) < 2:
        return 0
    shortest = min(lengths[r] for r in rows)
    same = (input_ids[rows, :shortest] == input_ids[rows[0], :shortest]).all(0)
    differ = (~same).nonzero()
    length = int(differ[0]) if len(differ) else shortest
    for r in rows:
        scored = (labels[r, : lengths[r]] != -100).nonzero()
        if len(scored):
            length = min(length, int(scored[0]) - 1)
        pictured = image[r, : lengths[r]].nonzero()
        if len(pictured) and int(pictured[-1]) >= length:
            return 0
    return max(length, 0)


def flat_plan(lengths: list[int]) -> tuple[list[list[Segment]], list[int]]:
    """One row holding every example whole, one after the other; every image is kept."""
    return [[Segment(r, 0, length, r + 1) for r, length in enumerate(lengths)]], list(range(len(lengths)))


def plan_rows(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    lengths: list[int],
    image: torch.Tensor,
    keys: list[str],
) -> tuple[list[list[Segment]], list[int]]:
    """The packed rows (as segments of the two-row batch) and which rows' images the batch keeps."""
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    packed: list[list[Segment]] = []
    kept_images: list[int] = []
    for rows in groups.values():
        prefix = shared_length(input_ids, labels, image, rows, lengths)
        if not prefix:
            packed += [[Segment(r, 0, lengths[r], PREFIX)] for r in rows]
            kept_images += rows
            continue
        first = rows[0]
        segments = [Segment(first, 0, prefix, PREFIX)]
        segments += [Segment(r, prefix, lengths[r], n + 1) for n, r in enumerate(rows)]
        packed.append(segments)
        kept_images.append(first)
    return packed, kept_images


def image_chunks(pixel_values: torch.Tensor, image_tokens: list[int]) -> list[int] | None:
    """Rows of `pixel_values` per image, in proportion to its image tokens; None when not whole.

    InternVL spends a fixed number of tokens per tile, Qwen2-VL per merged patch group and
    LLaVA per image, so each image's share of the pixel rows is its share of the tokens.
    """
    total = sum(image_tokens)
    if not total or any(n * pixel_values.shape[0] % total for n in image_tokens):
        return None
    return [n * pixel_values.shape[0] // total for n in image_tokens]


def pack_batch(
    batch: dict[str, Any],
    keys: list[str],
    image_token_id: int,
    pad_token_id: int,
    layout: str = "shared",
) -> dict[str, Any] | None:
    """The `layout` ("shared" or "flat") of a two-row collator batch (rows right-padded); None
    when the batch's layout is unknown."""
    if set(batch) - KNOWN_KEYS or len(batch.get("image_grid_thw", keys)) != len(keys):
        return None
    input_ids, labels = batch["input_ids"], batch["labels"]
    image = input_ids == image_token_id
    chunks = (
        image_chunks(batch["pixel_values"], image.sum(1).tolist())
        if "pixel_values" in batch
        else None
    )
    if "pixel_values" in batch and chunks is None:
        return None
    lengths = batch["attention_mask"].sum(1).tolist()
    if layout == "flat":
        plan, kept = flat_plan(lengths)
    else:
        plan, kept = plan_rows(input_ids, labels, lengths, image, keys)
    return _packed(batch, plan, kept, chunks, pad_token_id, layout)


def _packed(
    batch: dict[str, Any],
    plan: list[list[Segment]],
    kept: list[int],
    chunks: list[int] | None,
    pad_token_id: int,
    layout: str,
) -> dict[str, Any]:
    """The packed tensors of `plan`: tokens, pre-shifted labels, the kept images, and where each token came from."""
    input_ids, labels, attention_mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    width = max(sum(s.end - s.start for s in row) for row in plan)
    rows, columns = input_ids.shape
    source = torch.full((len(plan), width), PAD, dtype=torch.long)
    segment = torch.full((len(plan), width), PAD, dtype=torch.long)
    shift_labels = torch.full((len(plan), width), -100, dtype=torch.long)
    next_labels = torch.cat([labels[:, 1:], labels.new_full((rows, 1), -100)], dim=1)
    next_labels[attention_mask == 0] = -100
    for index, row in enumerate(plan):
        at = 0
        for part in row:
            span = slice(at, at + part.end - part.start)
            source[index, span] = part.row * columns + torch.arange(part.start, part.end)
            segment[index, span] = part.segment
            shift_labels[index, span] = next_labels[part.row, part.start : part.end]
            at = span.stop
    real = source >= 0
    flat = source.clamp(min=0)
    out: dict[str, Any] = {
        "input_ids": input_ids.flatten()[flat].masked_fill(~real, pad_token_id),
        "shift_labels": shift_labels,
    }
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = batch["mm_token_type_ids"].flatten()[flat].masked_fill(~real, 0)
    if chunks is not None:
        starts = [0, *torch.tensor(chunks).cumsum(0).tolist()]
        out["pixel_values"] = torch.cat(
            [batch["pixel_values"][starts[r] : starts[r + 1]] for r in kept]
        )
        if "image_grid_thw" in batch:
            out["image_grid_thw"] = batch["image_grid_thw"][kept]
    out["shared_prefix"] = {
        "layout": layout,
        "source": source,
        "segment": segment,
        "example_of": torch.where(real, flat // columns, PAD),
        "rows": {
            k: batch[k]
            for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")
            if k in batch
        },
    }
    return out


def prefix_mask(segment: torch.Tensor, backend: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask `[rows, 1, L, L]`: causal, and a suffix sees only the prefix and itself.

    Boolean (True = attend) for SDPA, additive in `dtype` for eager attention, which adds
    its mask to the scores. Padding attends to itself only, so its (unused) output stays finite.
    """
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = causal & ((key == query) | ((key == PREFIX) & (query != PAD)))
    allowed = (allowed | torch.eye(width, dtype=torch.bool, device=segment.device))[:, None]
    if backend == "sdpa":
        return allowed
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segment.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def packed_positions(backbone: Any, model_type: str, packing: dict[str, Any]) -> torch.Tensor:
    """Each packed token's position in its own row: a column (1-D RoPE) or Qwen2-VL's 3-D
    position, after the columns as text positions in a padding-free row."""
    source, rows = packing["source"], packing["rows"]
    columns = rows["input_ids"].shape[1]
    flat = source.clamp(min=0)
    text = (flat % columns).masked_fill(source < 0, 0)
    if POSITIONS_OF[model_type] == "columns":
        return text
    positions, _ = backbone.get_rope_index(
        rows["input_ids"],
        rows["mm_token_type_ids"],
        image_grid_thw=rows.get("image_grid_thw"),
        attention_mask=rows["attention_mask"],
    )
    spatial = positions.flatten(1)[:, flat].masked_fill(source < 0, 0)
    return torch.cat([text[None], spatial]) if packing["layout"] == "flat" else spatial


def packed_example_nll(
    log_probs: torch.Tensor, label_mask: torch.Tensor, example_of: torch.Tensor, examples: int
) -> torch.Tensor:
    """Mean NLL over each example's own completion tokens, `[examples]`, from a packed batch."""
    owner = example_of.to(log_probs.device).masked_fill(~label_mask, PAD).flatten()
    scored = owner >= 0
    index = owner[scored]
    sums = log_probs.new_zeros(examples).index_add(0, index, -log_probs.flatten()[scored])
    counts = log_probs.new_zeros(examples).index_add(0, index, torch.ones_like(sums[index]))
    return sums / counts.clamp(min=1)

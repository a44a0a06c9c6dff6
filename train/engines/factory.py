"""`open_engine`: the one place that knows every engine; callers see only `base.GenerationEngine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domainbed_reasoning.train.config import TrainConfig
from domainbed_reasoning.train.engines.base import KINDS, GenerationEngine
from domainbed_reasoning.train.engines.remote_engine import RemoteEngine
from domainbed_reasoning.train.engines.transformers_engine import (
    DEFAULT_BATCH_SIZE,
    TransformersEngine,
)
from domainbed_reasoning.train.engines.vllm_engine import DEFAULT_MAX_MODEL_LEN, VLLMEngine
from domainbed_reasoning.train.mtct.token_budget import model_context

from domainbed_reasoning.errors import UserError


def open_engine(
    kind: str, model: str, adapter: Path | None = None, **options: Any
) -> GenerationEngine:
    """The engine of `kind` serving `model` (+ `adapter`); for "remote", `model` is the served name.

    Options are the chosen engine's own keyword arguments (e.g. batch_size for
    transformers, vllm_python/port for vllm, base_url/api_key_env for remote).
    """
    if kind == "transformers":
        return TransformersEngine(model, adapter, **options)
    if kind == "vllm":
        return VLLMEngine(model, adapter, **options)
    if kind == "remote":
        if adapter is not None:
            raise UserError(
                f"a remote engine serves its own weights, it cannot apply adapter {adapter}: "
                "drop the adapter, or use the vllm or transformers engine"
            )
        return RemoteEngine(model, **options)
    raise UserError(f"unknown engine {kind!r}: choose one of {', '.join(KINDS)}")


def batch_unit(kind: str, options: dict[str, Any]) -> int:
    """Requests an engine generates as one batch: work cut on multiples of it gives the same answers."""
    return options.get("batch_size", DEFAULT_BATCH_SIZE) if kind == "transformers" else 1


def config_options(config: TrainConfig, kind: str) -> dict[str, Any]:
    """The training settings an engine of `kind` must share with training (image limits, attention)
    or takes from them (vLLM's context and tensor parallelism)."""
    if kind == "transformers":
        return {
            "image_limits": config.image_limits(),
            "attn_implementation": config.attn_implementation,
            "batch_size": config.generation_batch_size,
        }
    if kind == "vllm":
        return {
            "image_limits": config.image_limits(),
            "max_model_len": config.vllm_max_model_len,
            "tensor_parallel_size": config.vllm_tensor_parallel_size,
        }
    return {}


def engine_context(kind: str, model: str, options: dict[str, Any]) -> int | None:
    """The longest sequence an engine holds: vLLM's max_model_len (at most the model's own), the
    model's own for transformers."""
    if kind == "vllm":
        return min(options.get("max_model_len", DEFAULT_MAX_MODEL_LEN), model_context(model))
    if kind == "transformers":
        return model_context(model)
    return None

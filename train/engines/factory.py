"""`open_engine`: the one place that knows every engine; callers see only `base.GenerationEngine`."""

from __future__ import annotations

from pathlib import Path

from domainbed_reasoning.train.engines.base import GenerationEngine
from domainbed_reasoning.train.engines.remote_engine import RemoteEngine
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.engines.transformers_engine import (
    DEFAULT_BATCH_SIZE,
    TransformersEngine,
)
from domainbed_reasoning.train.engines.vllm_engine import DEFAULT_MAX_MODEL_LEN, VLLMEngine
from domainbed_reasoning.train.mtct.token_budget import model_context

from domainbed_reasoning.errors import UserError


def open_engine(
    settings: EngineSettings, model: str, adapter: Path | None = None
) -> GenerationEngine:
    """The engine `settings.kind` serving `model` (+ `adapter`); for "remote", `model` is the served name."""
    options = settings.options()
    if settings.kind == "transformers":
        return TransformersEngine(model, adapter, **options)
    if settings.kind == "vllm":
        return VLLMEngine(model, adapter, **options)
    if adapter is not None:
        raise UserError(
            f"a remote engine serves its own weights, it cannot apply adapter {adapter}: "
            "drop the adapter, or use the vllm or transformers engine"
        )
    return RemoteEngine(model, **options)


def batch_unit(settings: EngineSettings) -> int:
    """Requests an engine generates as one batch: work cut on multiples of it gives the same answers."""
    if settings.kind == "transformers":
        return settings.batch_size or DEFAULT_BATCH_SIZE
    return 1


def engine_context(settings: EngineSettings, model: str) -> int | None:
    """The longest sequence an engine holds: vLLM's max_model_len (at most the model's own), the
    model's own for transformers."""
    if settings.kind == "vllm":
        return min(settings.max_model_len or DEFAULT_MAX_MODEL_LEN, model_context(model))
    if settings.kind == "transformers":
        return model_context(model)
    return None

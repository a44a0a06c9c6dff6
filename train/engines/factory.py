"""`open_engine`: the one place that knows every engine; callers see only `base.GenerationEngine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domainbed_reasoning.errors import UserError
from train.engines.base import KINDS, GenerationEngine
from train.engines.remote_engine import RemoteEngine
from train.engines.transformers_engine import TransformersEngine
from train.engines.vllm_engine import VLLMEngine


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

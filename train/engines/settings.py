"""`EngineSettings`: everything an engine is opened with, one typed record instead of keyword dicts.

A field left None means "not given": `filled_from` takes the training run's value for it
(the image limits, dtype and attention the model was trained with, vLLM's context and tensor
parallelism, the memory share vLLM may take), and what is still None when the engine
opens is the engine's own default. A field that the chosen engine cannot use is an
error at once, named as the command-line flag that sets it.
"""

from __future__ import annotations

import dataclasses
import socket
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from domainbed_reasoning.train.config import TrainConfig
from domainbed_reasoning.train.engines.base import KINDS
from domainbed_reasoning.train.model.processor import ImageLimits

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.serving.vllm_server import resolve_vllm_python

# Which engine(s) read each field.
APPLIES_TO = {
    "batch_size": "transformers",
    "attn_implementation": "transformers",
    "image_limits": ("transformers", "vllm"),
    "dtype": ("transformers", "vllm"),
    "vllm_python": "vllm",
    "max_model_len": "vllm",
    "tensor_parallel_size": "vllm",
    "gpu_memory_utilization": "vllm",
    "log_path": "vllm",
    "merge_dir": "vllm",
    "concurrency": ("vllm", "remote"),
    "base_url": "remote",
    "api_key_env": "remote",
}


@dataclass(frozen=True)
class EngineSettings:
    kind: str = "transformers"
    batch_size: int | None = None
    attn_implementation: str | None = None
    image_limits: ImageLimits | None = None
    dtype: str | None = None
    vllm_python: Path | None = None
    max_model_len: int | None = None
    tensor_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    log_path: Path | None = None
    merge_dir: Path | None = None
    concurrency: int | None = None
    base_url: str | None = None
    api_key_env: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"unknown engine {self.kind!r}: choose one of {', '.join(KINDS)}")
        wrong = [
            f"--{name.replace('_', '-')}"
            for name, kinds in APPLIES_TO.items()
            if getattr(self, name) is not None and self.kind not in kinds
        ]
        if wrong:
            raise UserError(
                f"{', '.join(wrong)} do(es) not apply to the {self.kind} engine: drop it or pick its engine"
            )
        if self.kind == "remote" and self.base_url is None:
            raise UserError(
                "the remote engine needs --base-url (an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1)"
            )

    @classmethod
    def for_run(cls, config: TrainConfig) -> EngineSettings:
        """The engine a training run self-labels and evaluates with; vLLM's python is checked now,
        before any model loads, so a missing environment does not surface after round 0."""
        filled = cls(config.engine).filled_from(config)
        if filled.kind == "vllm":
            return replace(filled, vllm_python=resolve_vllm_python(filled.vllm_python))
        return filled

    def filled_from(self, config: TrainConfig) -> EngineSettings:
        """The run's values for every field not given: what the engine must share with training
        (image limits, dtype, attention) or takes from it (vLLM's context, parallelism, memory share)."""
        run: dict[str, Any] = {"image_limits": config.image_limits(), "dtype": config.dtype_name()}
        if self.kind == "transformers":
            run |= {
                "attn_implementation": config.attn_implementation,
                "batch_size": config.generation_batch_size,
            }
        elif self.kind == "vllm":
            run |= {
                "max_model_len": config.vllm_max_model_len,
                "tensor_parallel_size": config.vllm_tensor_parallel_size,
                "gpu_memory_utilization": config.vllm_gpu_memory_utilization,
                "merge_dir": Path(config.vllm_merge_dir) if config.vllm_merge_dir else None,
            }
        else:
            run = {}
        return replace(self, **{name: value for name, value in run.items() if getattr(self, name) is None})

    def for_step(self, folder: Path, rank: int, processes: int) -> EngineSettings:
        """The settings of one step writing into `folder`: vLLM's server log there (one per rank
        under several processes), and the machine's merged checkpoint in a folder of the step's
        own, under the chosen `merge_dir` or else `folder`. Other engines keep nothing on disk."""
        if self.kind != "vllm":
            return self
        name = "vllm.log" if processes == 1 else f"vllm-rank-{rank}.log"
        step = zlib.crc32(str(folder.resolve()).encode())
        merge = (self.merge_dir or folder) / f".vllm-merge-{socket.gethostname()}-{step:08x}"
        return replace(self, log_path=folder / name, merge_dir=merge)

    def options(self) -> dict[str, Any]:
        """The given fields as the engine's keyword arguments (the engine's defaults for the rest)."""
        return {
            field.name: getattr(self, field.name)
            for field in fields(self)
            if field.name != "kind" and getattr(self, field.name) is not None
        }

    def record(self) -> dict[str, Any]:
        """What the answers depend on, as JSON (paths, which do not, are left out)."""
        return {
            name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            for name, value in self.options().items()
            if dataclasses.is_dataclass(value) or isinstance(value, str | int | float | bool)
        }

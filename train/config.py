"""The training stage's settings: one dataclass, filled from YAML, then from `--set` overrides.

The YAML file holds the paper's defaults (train/configs/mtct.yaml) so a run is
reproducible from the resolved copy saved beside its adapter; overrides are
`key=value` strings parsed as YAML scalars so `--set learning_rate=1e-4` and
`--set train_vision=false` get the right types without a flag per field. transformers'
HfArgumentParser brings every value to its field's type, as it does a training script's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

import torch
import yaml
from domainbed_reasoning.train.model.processor import ImageLimits
from transformers import HfArgumentParser

from domainbed_reasoning.atomic import write_text
from domainbed_reasoning.errors import UserError

METHODS = ("mtct", "cls", "reasoning", "rd-mldg")
ENGINES = ("transformers", "vllm")
SARR_INITS = ("base", "continue")
FINETUNES = ("lora", "full")
REPORT_TO = ("tensorboard", "wandb", "none")
# Which weights are tested: the last (the paper's), or DomainBed's training-domain validation pick.
SELECTIONS = ("last", "training-domain")
CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "mtct.yaml"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what one training stage does (the paper's setup, docs/training.md)."""

    method: str = "mtct"
    epochs: float = 3.0
    max_steps: int = -1
    global_batch_size: int = 128
    per_device_batch_size: int = 8
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    optimizer: str = "adamw_torch"
    finetune: str = "lora"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    train_vision: bool = True
    reasoning_weight: float = 1.0
    bf16: str = "auto"
    gradient_checkpointing: bool = True
    max_length: int | None = None
    holdout_fraction: float = 0.2
    max_train_images: int | None = None
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    report_to: str = "tensorboard"
    attn_implementation: str | None = None
    mtct_shared_prefix: bool = True
    padding_free: bool = True
    group_by_length: bool = False
    dataloader_num_workers: int | None = None
    distributed_timeout_s: int = 10800
    image_max_tiles: int | None = 6
    image_max_pixels: int | None = 1003520
    vllm_max_model_len: int = 8192
    vllm_tensor_parallel_size: int = 1
    vllm_gpu_memory_utilization: float = 0.85
    vllm_merge_dir: str | None = None
    generation_batch_size: int = 8
    seed: int = 0
    sarr_rounds: int = 3
    sarr_init: str = "base"
    sarr_round0_from: str | None = None
    self_label_candidates: int = 4
    self_label_temperature: float = 1.0
    self_label_max_new_tokens: int = 1024
    engine: str = "transformers"
    model_selection: str = "last"

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.image_max_tiles, self.image_max_pixels)

    def uses_bf16(self) -> bool:
        """`bf16: auto` is bfloat16 where a GPU supports it, float32 elsewhere."""
        if self.bf16 == "auto":
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return self.bf16 == "true"

    def dtype(self) -> torch.dtype:
        """The dtype the weights are loaded, trained and served in."""
        return torch.bfloat16 if self.uses_bf16() else torch.float32

    def dtype_name(self) -> str:
        """`dtype()` as run.json, vLLM's --dtype and torch's attribute name spell it."""
        return str(self.dtype()).removeprefix("torch.")

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """How many micro-batches make one optimiser step of `global_batch_size` examples."""
        per_step = self.per_device_batch_size * world_size
        if self.global_batch_size % per_step:
            raise UserError(
                f"global_batch_size {self.global_batch_size} is not a multiple of per_device_batch_size "
                f"{self.per_device_batch_size} x {world_size} device(s): change one with --set"
            )
        return self.global_batch_size // per_step


def _check(config: TrainConfig) -> None:
    if config.method not in METHODS:
        raise UserError(f"unknown method {config.method!r}: choose one of {', '.join(METHODS)}")
    if config.finetune not in FINETUNES:
        raise UserError(
            f"unknown finetune {config.finetune!r}: choose one of {', '.join(FINETUNES)}"
        )
    if config.bf16 not in ("auto", "true", "false"):
        raise UserError(f"bf16 must be auto, true or false, not {config.bf16!r}")
    if config.method in ("mtct", "rd-mldg") and config.per_device_batch_size % 2:
        raise UserError(
            f"per_device_batch_size {config.per_device_batch_size} is odd: MTCT keeps an image's two "
            "examples in one batch, so set an even per_device_batch_size"
        )
    for name in ("global_batch_size", "per_device_batch_size", "lora_rank"):
        if getattr(config, name) < 1:
            raise UserError(f"{name} must be at least 1, not {getattr(config, name)}")
    if not 0.0 < config.holdout_fraction < 1.0:
        raise UserError(f"holdout_fraction must be between 0 and 1, not {config.holdout_fraction}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise UserError(
            f"warmup_ratio {config.warmup_ratio} is not a fraction of the training steps: set it in [0, 1)"
        )
    _check_runtime(config)
    _check_sarr(config)


def _check_runtime(config: TrainConfig) -> None:
    if config.model_selection not in SELECTIONS:
        raise UserError(
            f"unknown model_selection {config.model_selection!r}: choose one of {', '.join(SELECTIONS)}"
        )
    if config.report_to not in REPORT_TO:
        raise UserError(
            f"unknown report_to {config.report_to!r}: choose one of {', '.join(REPORT_TO)}"
        )
    if config.dataloader_num_workers is not None and config.dataloader_num_workers < 0:
        raise UserError(
            f"dataloader_num_workers must be 0 or more (or null for auto), not {config.dataloader_num_workers}"
        )
    if not 0.0 < config.vllm_gpu_memory_utilization <= 1.0:
        raise UserError(
            f"vllm_gpu_memory_utilization {config.vllm_gpu_memory_utilization} is not a share of the GPU: "
            "set it in (0, 1], e.g. 0.85"
        )
    for name in (
        "distributed_timeout_s",
        "vllm_max_model_len",
        "vllm_tensor_parallel_size",
        "generation_batch_size",
        "image_max_tiles",
        "image_max_pixels",
    ):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, not {value}")


def _check_sarr(config: TrainConfig) -> None:
    if config.method == "rd-mldg" and config.sarr_rounds < 1:
        raise UserError(
            f"sarr_rounds {config.sarr_rounds} leaves rd-mldg without self-labelling: set sarr_rounds to 1 or "
            "more, or train with --method mtct"
        )
    if config.sarr_init not in SARR_INITS:
        raise UserError(
            f"unknown sarr_init {config.sarr_init!r}: choose one of {', '.join(SARR_INITS)}"
        )
    if config.engine not in ENGINES:
        raise UserError(f"unknown engine {config.engine!r}: choose one of {', '.join(ENGINES)}")
    for name in ("self_label_candidates", "self_label_max_new_tokens"):
        if getattr(config, name) < 1:
            raise UserError(f"{name} must be at least 1, not {getattr(config, name)}")
    if config.self_label_temperature < 0:
        raise UserError(
            f"self_label_temperature must be 0 or more, not {config.self_label_temperature}"
        )
    if config.self_label_candidates > 1 and config.self_label_temperature == 0:
        raise UserError(
            f"self_label_candidates {config.self_label_candidates} at self_label_temperature 0 are copies of one "
            "greedy chain: set self_label_temperature above 0 (e.g. 1.0) or self_label_candidates=1"
        )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "train_vision=false"]` -> typed values (YAML scalars)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(
                f"override {pair!r} is not KEY=VALUE: write e.g. --set learning_rate=1e-4"
            )
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return overrides


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (the paper's defaults when `path` is None), then overrides on top."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise UserError(f"training config {path} not found: pass --config train/configs/mtct.yaml")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(
            f"training config {path} is not valid YAML ({_first_line(err)}): fix the file"
        ) from err
    if not isinstance(values, dict):
        raise UserError(f"training config {path} must be a mapping of setting: value")
    return build_config({**values, **(overrides or {})}, source=str(path))


def build_config(values: dict[str, Any], source: str = "overrides") -> TrainConfig:
    """`values` (YAML-typed, as a config file or `--set` gives them) as a checked TrainConfig.

    transformers' HfArgumentParser types each value by its field, as for a training script's
    flags; a null goes in as the parser's default, since a flag cannot spell None.
    """
    known = [field.name for field in fields(TrainConfig)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(
            f"unknown training setting(s) {', '.join(unknown)} in {source}: known ones are {', '.join(known)}"
        )
    hints = get_type_hints(TrainConfig)
    parser = HfArgumentParser(TrainConfig, allow_abbrev=False, exit_on_error=False)
    for key in (key for key, value in values.items() if value is None):
        if type(None) not in get_args(hints[key]):
            raise UserError(f"setting {key} needs a value")
        parser.set_defaults(**{key: None})
    argv = [f"--{key}={_flag_text(value)}" for key, value in values.items() if value is not None]
    try:
        (config,) = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    except argparse.ArgumentError as err:
        key = err.argument_name.split("/")[0].removeprefix("--")
        kind = next(arg for arg in (*get_args(hints[key]), hints[key]) if arg is not type(None))
        raise UserError(
            f"setting {key}={values[key]!r} is not a valid {kind.__name__}: fix it in the config or --set"
        ) from None
    return config


def _flag_text(value: Any) -> str:
    """A YAML value as the text of its flag; booleans as YAML writes them, so `bf16: false` is "false"."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def save_config(config: TrainConfig, target: Path) -> None:
    write_text(target, yaml.safe_dump(config.to_dict(), sort_keys=False))


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]

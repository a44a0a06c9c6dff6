"""In-process batched generation with `transformers`: the engine for machines without vLLM.

The prompt is built by the very functions the training collator uses (TRL's
`apply_chat_template` over `mtct_data.user_message`, left padding, no extra
special tokens), so the model is asked exactly what it was trained on. Decoding is
plain greedy or pure temperature sampling: a checkpoint's own top-k/top-p/repetition
defaults are ignored, as the vLLM engine ignores them, so the two engines agree.

Images are decoded one batch at a time, and each batch is seeded from the sampling
seed, round and its first request's id: the answers depend on the batch, not on what was
generated before it, so a split cut into shares on batch boundaries (several
processes, sharding.py) gives the same chains as one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import PartialState
from domainbed_reasoning.train.engines.base import (
    ClosingEngine,
    Generation,
    GenRequest,
    SamplingSpec,
    adapter_config,
    decode_image,
)
from domainbed_reasoning.train.model.processor import ImageLimits, load_processor
from domainbed_reasoning.train.mtct.mtct_data import user_message
from peft import PeftModel
from PIL import Image
from rich.progress import track
from transformers import AutoModelForImageTextToText, GenerationConfig, PreTrainedModel
from trl.data_utils import apply_chat_template

from domainbed_reasoning.errors import UserError
from domainbed_reasoning.model_folder import check_model_folder

Decoded = tuple[int, GenRequest, Image.Image]
DEFAULT_BATCH_SIZE = 8
REPLACEMENT = "\ufffd"  # what decoding makes of an incomplete UTF-8 sequence


def load_merged(
    model: str,
    adapter: Path | None,
    dtype: torch.dtype | str,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The base model with the LoRA adapter folded in: generation then costs what the base costs."""
    base = AutoModelForImageTextToText.from_pretrained(
        model, dtype=dtype, attn_implementation=attn_implementation
    )
    if adapter is None:
        return base
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def default_device() -> str:
    """This process's accelerator (rank r of `accelerate launch` gets cuda:r), else the CPU."""
    return str(PartialState().device) if torch.cuda.is_available() else "cpu"


def engine_dtype(dtype: torch.dtype | str | None, device: str) -> torch.dtype:
    """The dtype asked for (a training run's own, by name or as a torch dtype); without one,
    bfloat16 on a GPU that has it, float32 elsewhere."""
    if isinstance(dtype, str):
        return getattr(torch, dtype)
    if dtype is not None:
        return dtype
    on_gpu = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if on_gpu else torch.float32


def generation_config(
    sampling: SamplingSpec, eos_token_id: int | list[int], pad_token_id: int | None
) -> GenerationConfig:
    sampled = {"temperature": sampling.temperature, "top_k": 0, "top_p": 1.0}
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=sampling.n,
        do_sample=not sampling.greedy,
        **(sampled if not sampling.greedy else {}),
        repetition_penalty=1.0,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


class TransformersEngine(ClosingEngine):
    name = "transformers"

    def __init__(
        self,
        model: str,
        adapter: Path | None = None,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        image_limits: ImageLimits | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be at least 1")
        check_model_folder(model)
        if adapter is not None:
            adapter_config(adapter)
        self.batch_size = batch_size
        self.processor = load_processor(model, image_limits)
        device = device or default_device()
        self.model = (
            load_merged(model, adapter, engine_dtype(dtype, device), attn_implementation)
            .to(device)
            .eval()
        )
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.processor.tokenizer.pad_token_id
        self._prompt_texts: dict[str, str] = {}

    def prompt_text(self, prompt: str) -> str:
        """The chat-templated prompt, rendered once per distinct prompt."""
        if prompt not in self._prompt_texts:
            example = {"prompt": user_message(prompt)}
            self._prompt_texts[prompt] = apply_chat_template(example, self.processor)["prompt"]
        return self._prompt_texts[prompt]

    def generate(
        self, requests: Sequence[GenRequest], sampling: SamplingSpec, progress: bool = True
    ) -> list[Generation]:
        batches = [
            requests[start : start + self.batch_size]
            for start in range(0, len(requests), self.batch_size)
        ]
        results: list[Generation] = []
        for batch in track(batches, description="generating (transformers)", disable=not progress):
            results += self._generate_requests(batch, sampling)
        return results

    def _generate_requests(
        self, batch: Sequence[GenRequest], sampling: SamplingSpec
    ) -> list[Generation]:
        """One batch, decoded only now; an unreadable image fails alone."""
        results: list[Generation | None] = [None] * len(batch)
        decoded: list[Decoded] = []
        for index, request in enumerate(batch):
            try:
                decoded.append((index, request, decode_image(request.image)))
            except UserError as err:
                results[index] = Generation.failed(f"image {request.id}: {err}")
        if decoded:
            torch.manual_seed(sampling.request_seed(batch[0].id))
            for (index, _, _), generation in zip(
                decoded, self._generate_batch(decoded, sampling), strict=True
            ):
                results[index] = generation
        return results

    @torch.inference_mode()
    def _generate_batch(self, batch: list[Decoded], sampling: SamplingSpec) -> list[Generation]:
        inputs = self.processor(
            images=[[image] for _, _, image in batch],
            text=[self.prompt_text(request.prompt) for _, request, _ in batch],
            padding=True,
            padding_side="left",
            add_special_tokens=False,
            return_tensors="pt",
        ).to(self.model.device, dtype=self.model.dtype)
        output = self.model.generate(
            **inputs,
            generation_config=generation_config(sampling, list(self.eos_ids), self.pad_id),
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        # An answer cut inside a multi-byte character ends in U+FFFD here; vLLM's detokenizer never
        # emits those pending bytes, so they are dropped and both engines return the same text.
        texts = [
            text.rstrip(REPLACEMENT)
            for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        ]
        finished = [bool(self.eos_ids & set(row.tolist())) for row in new_tokens]
        n = sampling.n
        return [
            Generation(
                tuple(texts[start : start + n]),
                tuple("stop" if done else "length" for done in finished[start : start + n]),
            )
            for start in range(0, len(texts), n)
        ]

    def close(self) -> None:
        """Drop the weights now, so a following engine (or training round) gets the memory."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

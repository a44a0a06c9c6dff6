"""MTCT training step vs plain TRL SFT on the same examples: samples/s, tokens/s, peak memory.

The MTCT trainer adds a task tensor, a grouped sampler and its own loss on top of
SFTTrainer; this measures what that costs. On the CPU it uses the tiny LLaVA; with
CUDA it builds a LLaVA at InternVL3-2B's sizes (a 300M-class vision tower, a
1.5B-class Qwen2 LM, 256 image tokens) with random weights, so the numbers say
something about real runs. Not a test: run `python bench/bench_train.py`.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import datasets
import torch
from domainbed_reasoning.train.model.lora import lora_config
from domainbed_reasoning.train.mtct.mtct_data import build_examples
from domainbed_reasoning.train.mtct.mtct_trainer import MTCTTrainer
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import SFTConfig, SFTTrainer

from domainbed_reasoning.offline.demo_clock import machine
from domainbed_reasoning.offline.tiny_models import build_tiny_model

CLASSES = ("circle", "cross", "square", "star", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "white")
GPU_SHAPE = {  # InternVL3-2B: InternViT-300M (1024 x 24) + Qwen2.5-1.5B (1536 x 28, 12 heads, 2 KV heads)
    "hidden": 1536,
    "layers": 28,
    "heads": 12,
    "kv_heads": 2,
    "vision_hidden": 1024,
    "vision_layers": 24,
    "vision_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "vocab_size": 151_674,
}


def _split(images: int, size: int) -> datasets.Dataset:
    chain = "<SUMMARY>plan</SUMMARY><CAPTION>{c}</CAPTION><REASONING>{c} means {n}</REASONING>" * 4
    rows = [
        {
            "id": f"img{index}",
            "label": index % len(CLASSES),
            "image": Image.new("RGB", (size, size), COLOURS[index % len(CLASSES)]),
            "chain": chain.format(c=COLOURS[index % 5], n=CLASSES[index % 5])
            + f"<REFLECTION>sure</REFLECTION><CONCLUSION>{CLASSES[index % 5]}</CONCLUSION>",
        }
        for index in range(images)
    ]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(CLASSES)),
            "image": datasets.Image(),
            "chain": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def _run(
    trainer_cls: type[SFTTrainer], model_dir: Path, examples: datasets.Dataset, args: SFTConfig
) -> dict:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=examples.remove_columns(["task", "id"])
        if trainer_cls is SFTTrainer
        else examples,
        processing_class=AutoProcessor.from_pretrained(model_dir),
        peft_config=lora_config(model, 8, 16, 0.05, train_vision=True),
    )
    tokens = 0
    collate = trainer.data_collator

    def counting(rows: list[dict]) -> dict:
        """Counts the examples' own tokens, the same way for both trainers: the attention mask's
        ones, or for MTCT (whose packed rows hold a shared prefix once) the count its collator keeps."""
        nonlocal tokens
        batch = collate(rows)
        tokens += int(batch["layout"][0]) if "layout" in batch else int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    samples = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "trainer": trainer_cls.__name__,
        "samples_per_s": round(samples / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_memory_gib": round(peak, 2),
        "seconds": round(seconds, 2),
        "mfu": _mfu(model, tokens / seconds),
    }


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def _mfu(model: torch.nn.Module, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation, estimated: with LoRA the frozen weights still need the forward
    pass and the activation gradients, about 4 FLOPs per parameter per token (6 for full training).
    """
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak is None:
        return None
    params = sum(parameter.numel() for parameter in model.parameters())
    return round(4 * params * tokens_per_s / peak, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per trainer")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (even)")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the results as JSON here"
    )
    options = parser.parse_args()
    gpu = torch.cuda.is_available()
    steps, batch = options.steps or (20 if gpu else 4), options.batch or (8 if gpu else 4)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = build_tiny_model(
            Path(scratch) / "model", "llava", vocab_words=CLASSES, **(GPU_SHAPE if gpu else {})
        )
        examples = build_examples(_split(steps * batch // 2, 224 if gpu else 32), "mtct", CLASSES)
        args = SFTConfig(
            output_dir=str(Path(scratch) / "out"),
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=5e-4,
            bf16=gpu,
            use_cpu=not gpu,
            gradient_checkpointing=gpu,
            report_to="none",
            save_strategy="no",
            logging_steps=steps,
            disable_tqdm=True,
        )
        results = [_run(cls, model_dir, examples, args) for cls in (SFTTrainer, MTCTTrainer)]
    report = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "machine": machine(),
        "steps": steps,
        "batch": batch,
        "runs": results,
    }
    print(json.dumps(report, indent=2))
    if options.out:
        options.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""MTCT as two rows per image vs one row sharing the prefix, side by side: samples/s, tokens/s, peak RSS.

The model is InternVL3-2B-hf's architecture at its real widths (InternViT-300M, the
Qwen2.5-1.5B language model, the 151k-token vocabulary and head) with 2 layers per tower
and random weights, built from the checkpoint's own tokenizer, processor and config, so
an image costs what it costs the real model: 256 tokens for a 227x227 PACS-sized image,
12 tiles and a thumbnail (about 3,300 tokens) for a 640x480 photo. Images are SynthDG's,
resized; every chain is 300 tokens. Each variant trains in its own process (so its peak
RSS is its own) from the same weights on the same batches, in float32 without dropout,
so their first-step losses must agree. The last line is the summary.

With `--full` (bench/gpu_mtct.sh, on a GPU) the model is InternVL3-2B-hf at its full depth,
built in GPU memory from its config with random weights, trained in bf16 with gradient
checkpointing; each row then adds the peak GPU memory and the MFU (6 x parameters x the
examples' tokens per second / the GPU's peak dense bf16 FLOP/s).

    python bench/bench_mtct.py [--real-shapes DIR] [--images 2] [--steps 3] [--full]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch
from domainbed_reasoning.train.model.lora import lora_config
from domainbed_reasoning.train.mtct.mtct_data import build_examples
from domainbed_reasoning.train.mtct.mtct_trainer import MTCTTrainer
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from trl import SFTConfig

from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.offline.demo_clock import machine
from domainbed_reasoning.offline.real_shapes import build_real_shape_model
from domainbed_reasoning.offline.synth import render

REPO = Path(__file__).resolve().parents[1]
SIZES = {"227x227": (227, 227), "640x480": (640, 480)}
CHAIN_TOKENS = 300
VARIANTS = ("rows", "shared")
# Peak dense bf16 FLOP/s (no sparsity) by the name CUDA gives the card, for the MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def chain(processor, name: str, colour: str) -> str:
    """A five-stage chain of exactly CHAIN_TOKENS tokens that ends on its conclusion."""
    tail = f"</REFLECTION><CONCLUSION>{name}</CONCLUSION>"
    body = (
        f"<SUMMARY>Identify the shape.</SUMMARY><CAPTION>A {colour} {name} on a textured "
        f"background.</CAPTION><REASONING>"
        + f"The outline, its corners and its symmetry match a {name}, not another class. "
        * 40
    )
    tokenizer = processor.tokenizer
    room = CHAIN_TOKENS - len(tokenizer(tail, add_special_tokens=False).input_ids) - 8
    head = tokenizer.decode(tokenizer(body, add_special_tokens=False).input_ids[:room])
    return f"{head}</REASONING><REFLECTION>sure{tail}"


def split(processor, images: int, size: tuple[int, int]) -> datasets.Dataset:
    spec = get_spec("SynthDG")
    rows = []
    for index in range(images):
        label = index % len(spec.classes)
        name = spec.classes[label]
        attrs, image = render(0, "photo", name, index, 512)
        rows.append(
            {
                "id": f"SynthDG/photo/{name}/{index}.png",
                "label": label,
                "image": image.resize(size),
                "chain": chain(processor, name, attrs.colour),
            }
        )
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(spec.classes)),
            "image": datasets.Image(),
            "chain": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


class StepClock(TrainerCallback):
    """Wall time of every optimiser step (the first, with its one-off costs, is left out)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.seconds.append(time.perf_counter() - self.starts[-1])


def load_model(model_dir: Path, full: bool):
    """The saved 2-layer model in float32 on the CPU, or (`full`) the whole architecture of
    `model_dir`'s config built in bf16 on the GPU, the same random weights in both variants."""
    if not full:
        return AutoModelForImageTextToText.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForImageTextToText.from_config(
            AutoConfig.from_pretrained(model_dir), dtype=torch.bfloat16
        )


def gpu_figures(model, tokens_per_s: float) -> dict:
    """Peak GPU memory and the MFU, where the card's peak bf16 rate is known."""
    name = torch.cuda.get_device_name()
    peak = next((flops for card, flops in PEAK_BF16.items() if card in name), None)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "gpu": name,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mfu": 6 * parameters * tokens_per_s / peak if peak else None,
    }


def child(model_dir: Path, variant: str, size: str, images: int, steps: int, full: bool) -> dict:
    """One variant's run: steps of `2 x images` examples (each image's two paths)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = load_model(model_dir, full)
    examples = build_examples(
        split(processor, images * steps, SIZES[size]), "mtct", get_spec("SynthDG").classes
    )
    args = SFTConfig(
        output_dir=str(REPO / ".cache" / "bench-mtct" / variant),
        per_device_train_batch_size=2 * images,
        max_length=None,  # a 640x480 image alone is about 3,300 tokens: nothing may be cut
        max_steps=steps,
        learning_rate=5e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=not full,
        bf16=full,
        gradient_checkpointing=full,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = MTCTTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        processing_class=processor,
        peft_config=lora_config(model, 8, 16, 0.0, train_vision=True),
        shared_prefix=variant == "shared",
    )
    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss_cls" in entry]
    timed = clock.seconds[1:] or clock.seconds
    per_step = sum(timed) / len(timed)
    tokens = logs[-1]["num_tokens"] / len(logs)
    result = {
        "variant": variant,
        "size": size,
        "samples_per_s": 2 * images / per_step,
        "tokens_per_s": tokens / per_step,
        "seconds_per_step": per_step,
        "padding_fraction": sum(e["padding_fraction"] for e in logs) / len(logs),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "first_loss": logs[0]["loss"],
    }
    return result | (gpu_figures(model, tokens / per_step) if full else {})


def run_child(model_dir: Path, variant: str, size: str, options: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--child", variant, "--size", size, "--model", str(model_dir),
        "--images", str(options.images), "--steps", str(options.steps),
        *(["--full"] if options.full else []),
    ]  # fmt: skip
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{variant} at {size} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(results: dict, full: bool) -> None:
    gpu = f" {'peak GPU GiB':>13} {'MFU':>6}" if full else ""
    print(
        f"{'image':>8} {'layout':>7} {'samples/s':>10} {'tokens/s':>9} {'s/step':>7} "
        f"{'padding':>8} {'peak RSS GiB':>13}{gpu}"
    )
    for (size, variant), r in results.items():
        mfu = f"{r['mfu']:>6.1%}" if r.get("mfu") is not None else f"{'-':>6}"
        gpu = f" {r['peak_gpu_gib']:>13.2f} {mfu}" if full else ""
        print(
            f"{size:>8} {variant:>7} {r['samples_per_s']:>10.3f} {r['tokens_per_s']:>9.1f} "
            f"{r['seconds_per_step']:>7.2f} {r['padding_fraction']:>8.1%} {r['peak_rss_gib']:>13.2f}{gpu}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("DBR_REAL_SHAPES") or str(REPO.parent / "shared" / "real_shapes")
    parser.add_argument("--real-shapes", default=default, help="folder holding internvl3_2b_hf/")
    parser.add_argument("--images", type=int, default=2, help="images per step (2 examples each)")
    parser.add_argument(
        "--steps", type=int, default=3, help="optimiser steps (the first is not timed)"
    )
    parser.add_argument(
        "--full", action="store_true", help="the full-depth model in bf16 on a GPU (gpu_mtct.sh)"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=SIZES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        figures = child(
            Path(options.model), options.child, options.size, options.images, options.steps, options.full
        )
        print(json.dumps(figures))
        return
    source = Path(options.real_shapes) / "internvl3_2b_hf"
    if not (source / "config.json").is_file():
        sys.exit(
            f"no InternVL3-2B-hf files at {source}: pass --real-shapes DIR (or set DBR_REAL_SHAPES)"
        )
    if options.full and not torch.cuda.is_available():
        sys.exit("--full trains the whole model in bf16 on a GPU, and no CUDA device is visible")
    # --full builds the model from the source's config in GPU memory; its processor is the source's.
    model_dir = source if options.full else build_real_shape_model(
        source, REPO / ".cache" / "real-shapes" / "internvl3_2b_hf-2layers"
    )
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(f"machine: {machine()}{gpu}", flush=True)
    results = {
        (size, variant): run_child(model_dir, variant, size, options)
        for size in SIZES
        for variant in VARIANTS
    }
    print_table(results, options.full)
    ratios = [
        results[size, "shared"]["samples_per_s"] / results[size, "rows"]["samples_per_s"]
        for size in SIZES
    ]
    loss_diff = max(
        abs(results[size, "shared"]["first_loss"] - results[size, "rows"]["first_loss"])
        / abs(results[size, "rows"]["first_loss"])
        for size in SIZES
    )
    print(
        f"mtct shared-prefix vs two rows: {ratios[0]:.2f}x samples/s at 227x227, {ratios[1]:.2f}x at "
        f"640x480; loss rel. diff {loss_diff:.1e}"
    )


if __name__ == "__main__":
    main()

"""MTCT as two rows per image vs one row sharing the prefix, side by side: samples/s, tokens/s, peak RSS.

The model is InternVL3-2B-hf's architecture at its real widths (InternViT-300M, the
Qwen2.5-1.5B language model, the 151k-token vocabulary and head) with 2 layers per tower
and random weights, built from the checkpoint's own tokenizer, processor and config, so
an image costs what it costs the real model: 256 tokens for a 227x227 PACS-sized image,
12 tiles and a thumbnail (about 3,300 tokens) for a 640x480 photo. Images are SynthDG's,
resized; every chain is 300 tokens. Each variant trains in its own process (so its peak
RSS is its own) from the same weights on the same batches, in float32 without dropout,
so their first-step losses must agree. The last line is the summary.

    python bench/bench_mtct.py [--real-shapes DIR] [--images 2] [--steps 3]
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
from domainbed_reasoning.train.model.lora import lora_config
from domainbed_reasoning.train.mtct.mtct_data import build_examples
from domainbed_reasoning.train.mtct.mtct_trainer import MTCTTrainer
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from trl import SFTConfig

from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.offline.real_shapes import build_real_shape_model
from domainbed_reasoning.offline.synth import render

REPO = Path(__file__).resolve().parents[1]
SIZES = {"227x227": (227, 227), "640x480": (640, 480)}
CHAIN_TOKENS = 300
VARIANTS = ("rows", "shared")


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


def child(model_dir: Path, variant: str, size: str, images: int, steps: int) -> dict:
    """One variant's run: steps of `2 x images` examples (each image's two paths)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    examples = build_examples(
        split(processor, images * steps, SIZES[size]), "mtct", get_spec("SynthDG").classes
    )
    args = SFTConfig(
        output_dir=str(REPO / ".cache" / "bench-mtct" / variant),
        per_device_train_batch_size=2 * images,
        max_steps=steps,
        learning_rate=5e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
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
    return {
        "variant": variant,
        "size": size,
        "samples_per_s": 2 * images / per_step,
        "tokens_per_s": tokens / per_step,
        "seconds_per_step": per_step,
        "padding_fraction": sum(e["padding_fraction"] for e in logs) / len(logs),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "first_loss": logs[0]["loss"],
    }


def run_child(model_dir: Path, variant: str, size: str, images: int, steps: int) -> dict:
    command = [
        sys.executable, __file__, "--child", variant, "--size", size, "--model", str(model_dir),
        "--images", str(images), "--steps", str(steps),
    ]  # fmt: skip
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("DBR_REAL_SHAPES") or str(REPO.parent / "shared" / "real_shapes")
    parser.add_argument("--real-shapes", default=default, help="folder holding internvl3_2b_hf/")
    parser.add_argument("--images", type=int, default=2, help="images per step (2 examples each)")
    parser.add_argument(
        "--steps", type=int, default=3, help="optimiser steps (the first is not timed)"
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=SIZES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(
            json.dumps(
                child(
                    Path(options.model), options.child, options.size, options.images, options.steps
                )
            )
        )
        return
    source = Path(options.real_shapes) / "internvl3_2b_hf"
    if not (source / "config.json").is_file():
        sys.exit(
            f"no InternVL3-2B-hf files at {source}: pass --real-shapes DIR (or set DBR_REAL_SHAPES)"
        )
    model_dir = build_real_shape_model(
        source, REPO / ".cache" / "real-shapes" / "internvl3_2b_hf-2layers"
    )
    results = {
        (size, variant): run_child(model_dir, variant, size, options.images, options.steps)
        for size in SIZES
        for variant in VARIANTS
    }
    print(
        f"{'image':>8} {'layout':>7} {'samples/s':>10} {'tokens/s':>9} {'s/step':>7} {'padding':>8} {'peak RSS GiB':>13}"
    )
    for (size, variant), r in results.items():
        print(
            f"{size:>8} {variant:>7} {r['samples_per_s']:>10.3f} {r['tokens_per_s']:>9.1f} "
            f"{r['seconds_per_step']:>7.1f} {r['padding_fraction']:>8.1%} {r['peak_rss_gib']:>13.2f}"
        )
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

"""How long `dbr demo` should take on this machine, said before it starts.

A few seconds of the demo's own kind of work - training steps and a batched generation
of a model of the demo's size on SynthDG-sized images, through the same processor and
kernels - timed here and on the machine the reference run came from. The demo's
expected duration is the reference run's, scaled by the ratio. Kernels, vector
instructions, threads and a busy machine all show in the calibration as they do in
the demo, which a count of cores or a clock speed would not see.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from domainbed_reasoning.offline.tiny_models import build_demo_qwen2vl

BATCH = 16
TRAIN_STEPS = 6
NEW_TOKENS = 24
QUESTION = "Which shape is this?"
ANSWER = "It is a circle with no corners."


@dataclass(frozen=True)
class Reference:
    """One measured `make demo` (its steps in total) and the calibration of the same machine."""

    machine: str
    calibration_s: float
    demo_s: float


# `dbr demo` prints both figures, its calibration at the start and its steps' total at the end:
# these are one idle run's on the machine named. Update them together, from one run.
REFERENCE = Reference(
    machine="AMD EPYC, 2 cores, AVX2 (torch), torch threads 2", calibration_s=1.6, demo_s=461.0
)


@dataclass(frozen=True)
class Estimate:
    calibration_s: float
    expected_s: float
    reference_s: float
    reference: Reference


def machine() -> str:
    """The CPU model, its cores and the vector ISA torch's kernels dispatch to, as the README quotes them."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()} (torch), "
        f"torch threads {torch.get_num_threads()}"
    )


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def calibrate() -> float:
    """Seconds for TRAIN_STEPS training steps and one generation of a demo-sized Qwen2-VL."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_demo_qwen2vl(Path(tmp), conversations=[(QUESTION, ANSWER)])
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    images = [[Image.new("RGB", (64, 64), (16 * index, 90, 160))] for index in range(BATCH)]
    question = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}
    ]
    answered = [*question, {"role": "assistant", "content": ANSWER}]
    text = processor.apply_chat_template(answered, tokenize=False)
    prompt = processor.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        batch = processor(images=images, text=[text] * BATCH, return_tensors="pt")
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # the first call pays one-off set-up, as the demo's first step does
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS):
        step()
    ask = processor(images=images, text=[prompt] * BATCH, return_tensors="pt")
    with torch.inference_mode():
        model.generate(**ask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return time.perf_counter() - start


def estimate(reference_s: float, reference: Reference = REFERENCE) -> Estimate:
    """A run that took `reference_s` on the reference machine, scaled by the calibration's ratio."""
    seconds = calibrate()
    return Estimate(
        seconds, reference_s * seconds / reference.calibration_s, reference_s, reference
    )

"""One MTCT optimiser step under `accelerate launch`; rank 0 saves the update and the logs.

tests/test_distributed.py runs it with 1 process x micro-batch 2b and 2 processes x b on
the same rows and compares: with SGD at lr 1 and no clipping the update is minus the
gradient, so equal updates mean equal gradients. tests/test_mtct_shared_prefix.py runs it
with an image's paths in one packed row (`shared`) and as two rows (`rows`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import datasets
import torch
from domainbed_reasoning.train.model.lora import lora_config
from domainbed_reasoning.train.mtct.mtct_data import build_examples
from domainbed_reasoning.train.mtct.mtct_trainer import MTCTTrainer
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
from trl import SFTConfig

CLASSES = ("circle", "cross", "square", "star", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "white")


def rows(images: Sequence[int] = range(7)) -> datasets.Dataset:
    """By default 7 images, 2 of them (2 and 5) without a chain: 12 rows (5 pairs, 2
    class-name-only rows)."""
    records = []
    for index in images:
        name = CLASSES[index % 5]
        chain = (
            f"<SUMMARY>colour</SUMMARY><CAPTION>{COLOURS[index % 5]} {'x' * index}</CAPTION>"
            f"<REASONING>so</REASONING><REFLECTION>sure</REFLECTION><CONCLUSION>{name}</CONCLUSION>"
        )
        records.append(
            {
                "id": f"SynthDG/photo/{name}/{index}.png",
                "label": index % 5,
                "image": Image.new("RGB", (32, 32), COLOURS[index % 5]),
                "chain": None if index in (2, 5) else chain,
            }
        )
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(CLASSES)),
            "image": datasets.Image(),
            "chain": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(records, features=features)


class GradientCapture(TrainerCallback):
    """The step's gradients as the optimiser sees them (after accumulation and DDP's average).

    Read directly, not as a weight update: an update of 1e-5 on a weight of 1 keeps only
    about two significant digits in float32.
    """

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        self.grads = {
            k: v.grad.detach().clone() for k, v in model.named_parameters() if v.grad is not None
        }


def mtct_trainer(
    model_dir: Path,
    out: Path,
    shared_prefix: bool = False,
    attention: str | None = None,
    padding_free: bool = False,
    images: Sequence[int] = range(7),
    **settings: object,
) -> MTCTTrainer:
    """An MTCT trainer with LoRA on vision and language over `rows(images)`, for one step."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attention)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        max_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        **settings,
    )
    return MTCTTrainer(
        model=model,
        args=args,
        train_dataset=build_examples(rows(images), "mtct", CLASSES),
        processing_class=AutoProcessor.from_pretrained(model_dir),
        peft_config=lora_config(model, 8, 16, 0.0, train_vision=True),
        shared_prefix=shared_prefix,
        padding_free=padding_free,
    )


def main(model_dir: Path, out: Path, batch: int, layout: str = "rows") -> None:
    trainer = mtct_trainer(
        model_dir,
        out,
        shared_prefix=layout == "shared",
        per_device_train_batch_size=batch,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=False,  # TRL would autocast to bf16 even on the CPU; the comparisons are float32
    )
    capture = GradientCapture()
    trainer.add_callback(capture)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    if trainer.accelerator.is_main_process:
        save_file(capture.grads, out / "grads.safetensors")
        after = dict(trainer.model.named_parameters())
        update = {k: (after[k].detach() - v).contiguous() for k, v in before.items()}
        save_file(update, out / "update.safetensors")
        logs = [entry for entry in trainer.state.log_history if "loss_cls" in entry]
        report = {"processes": trainer.accelerator.num_processes, "logs": logs}
        (out / "logs.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])

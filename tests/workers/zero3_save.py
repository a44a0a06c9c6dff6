"""One MTCT step of a LoRA model under DeepSpeed ZeRO-3, then `stage.save_weights` from every rank.

Rank 0 records, for each LoRA tensor, its shape in the saved adapter, the shape rank 0's
own (sharded) parameter has, whether the saved values equal the gathered parameter, and
what the main process alone would have saved (`model.save_pretrained` on rank 0, the old
way): tests/test_distributed.py checks the adapter is whole and right.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from domainbed_reasoning.train.stages.stage import save_weights
from safetensors.torch import load_file

from tests.workers.mtct_step import mtct_trainer


def main(model_dir: Path, out: Path) -> None:
    trainer = mtct_trainer(
        model_dir,
        out,
        per_device_train_batch_size=6,
        learning_rate=1e-2,
        bf16=False,
        ddp_backend="gloo",  # DeepSpeed on the CPU: without it accelerate sees one process
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        trainer.model.save_pretrained(out / "main-process-alone")
    target = out / "adapter"
    save_weights(trainer, trainer.processing_class, target, "card")
    lora = {name: p for name, p in trainer.model.named_parameters() if "lora_" in name}
    local = {name: p.numel() for name, p in lora.items()}
    with deepspeed.zero.GatheredParameters(list(lora.values())):
        gathered = {name: p.detach().clone() for name, p in lora.items()}
    if trainer.accelerator.is_main_process:
        saved = load_file(target / "adapter_model.safetensors")
        alone = load_file(out / "main-process-alone" / "adapter_model.safetensors")
        report = {
            "alone_elements": sum(value.numel() for value in alone.values()),
            "saved_elements": sum(value.numel() for value in saved.values()),
            "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage,
            "processes": trainer.accelerator.num_processes,
            "saved": {key: list(value.shape) for key, value in saved.items()},
            "local": local,
            "equal": all(
                torch.equal(saved[key], gathered[name])
                for name in gathered
                for key in saved
                if name.replace(".default", "").endswith(key.removeprefix("base_model.model."))
            ),
            "matched": sum(
                1
                for name in gathered
                for key in saved
                if name.replace(".default", "").endswith(key.removeprefix("base_model.model."))
            ),
        }
        (out / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

"""Stage 1 end to end on the CPU with tiny random models of two architectures.

Covers the settings (paper defaults, overrides, errors), LoRA target resolution,
the MTCT trainer (loss falls; gradient accumulation changes nothing), and the
`train` stage: validation before any model load, artefacts, reload + generate,
resume.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import re
import shutil
import weakref
from pathlib import Path

import datasets
import polars as pl
import pytest
import torch
import yaml
from domainbed_reasoning.train.config import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    TrainConfig,
    build_config,
    load_config,
    parse_overrides,
)
from domainbed_reasoning.train.evaluation.evaluate import EvalSettings, evaluate_run
from domainbed_reasoning.train.model.lora import lora_config, target_modules_regex
from domainbed_reasoning.train.mtct.mtct_data import build_examples
from domainbed_reasoning.train.mtct.mtct_trainer import MTCTTrainer
from domainbed_reasoning.train.stages import stage
from domainbed_reasoning.train.stages.run import train
from domainbed_reasoning.train.stages.stage import load_start, sft_config
from peft import PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import SFTConfig
from typer.testing import CliRunner

from domainbed_reasoning.cli import app
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.hub.loading import load_domains

SYNTH_CLASSES = ("circle", "cross", "square", "star", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "white")

# --- settings -----------------------------------------------------------------------------------------


def test_default_config_is_the_papers_setup() -> None:
    config = load_config(DEFAULT_CONFIG)
    assert config == TrainConfig()
    assert (config.epochs, config.global_batch_size, config.learning_rate) == (3.0, 128, 5e-4)
    assert (config.optimizer, config.lora_rank, config.train_vision) == ("adamw_torch", 8, True)
    assert config.gradient_checkpointing and config.bf16 == "auto"
    assert config.gradient_accumulation_steps(world_size=4) == 4


def test_overrides_are_typed() -> None:
    overrides = parse_overrides(
        ["learning_rate=1e-4", "train_vision=false", "max_length=null", "epochs=1"]
    )
    config = load_config(DEFAULT_CONFIG, overrides)
    assert config.learning_rate == 1e-4 and config.train_vision is False
    assert config.max_length is None and config.epochs == 1.0
    yaml_booleans = build_config(parse_overrides(["bf16=false", "image_max_tiles=null", "max_steps=-1"]))
    assert (yaml_booleans.bf16, yaml_booleans.image_max_tiles, yaml_booleans.max_steps) == ("false", None, -1)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"learing_rate": 1},
            "unknown training setting\\(s\\) learing_rate in overrides: known ones are method,",
        ),
        ({"lora_rank": "eight"}, "setting lora_rank='eight' is not a valid int"),
        ({"train_vision": "maybe"}, "setting train_vision='maybe' is not a valid bool"),
        (
            {"per_device_batch_size": 3},
            "per_device_batch_size 3 is odd: MTCT keeps an image's two examples",
        ),
        ({"method": "both"}, "unknown method 'both': choose one of mtct, cls, reasoning"),
        ({"bf16": "sometimes"}, "bf16 must be auto, true or false, not 'sometimes'"),
        ({"holdout_fraction": 1.5}, "holdout_fraction must be between 0 and 1, not 1.5"),
        ({"epochs": None}, "setting epochs needs a value"),
        ({"finetune": "qlora"}, "unknown finetune 'qlora': choose one of lora, full"),
    ],
)
def test_bad_settings_are_one_line_errors(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config(values)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="training config .*nope.yaml not found: pass --config"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [3\n")
    with pytest.raises(UserError, match="broken.yaml is not valid YAML"):
        load_config(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(UserError, match="must be a mapping of setting: value"):
        load_config(listed)
    with pytest.raises(UserError, match="override 'epochs' is not KEY=VALUE"):
        parse_overrides(["epochs"])


def test_runtime_settings_reach_the_trainer(tmp_path: Path) -> None:
    config = build_config(
        {"warmup_ratio": 0.1, "attn_implementation": "eager", "distributed_timeout_s": 7200}
    )
    args = sft_config(config, tmp_path, has_eval=False)
    # a ratio of the training steps, not a step count: 10% of 95 steps is 10 (rounded up)
    assert args.get_warmup_steps(95) == 10 and args.get_warmup_steps(1000) == 100
    assert args.model_init_kwargs["attn_implementation"] == "eager"
    assert args.ddp_timeout == 7200 and args.report_to == []  # TensorBoard: our callback, logs/
    assert args.dataloader_num_workers == 0  # auto on the CPU: the loader would compete with it
    assert sft_config(build_config({"dataloader_num_workers": 3}), tmp_path, False).dataloader_num_workers == 3
    assert args.train_sampling_strategy == "random"  # images shuffled, an image's paths together
    grouped = sft_config(build_config({"group_by_length": True}), tmp_path, False)
    assert grouped.train_sampling_strategy == "group_by_length"
    defaults = TrainConfig()
    assert (defaults.report_to, defaults.distributed_timeout_s) == ("tensorboard", 10800)
    assert (defaults.image_max_tiles, defaults.vllm_max_model_len) == (6, 8192)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"warmup_ratio": 1.5}, "warmup_ratio 1.5 is not a fraction of the training steps"),
        ({"report_to": "mlflow"}, "unknown report_to 'mlflow': choose one of tensorboard, wandb, none"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers must be 0 or more"),
        ({"image_max_tiles": 0}, "image_max_tiles must be at least 1, not 0"),
        ({"vllm_max_model_len": 0}, "vllm_max_model_len must be at least 1, not 0"),
    ],
)
def test_bad_runtime_settings_are_one_line_errors(values: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config(values)


def test_report_to_wandb_without_wandb_is_refused_before_training(
    train_request, export_dir: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(UserError, match="report_to wandb needs the wandb package: `pip install wandb`"):
        train(train_request(export_dir, tiny_llava, tmp_path, report_to="wandb"))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("launch_config", sorted((CONFIG_DIR.parent / "accelerate").glob("*.yaml")))
def test_bf16_false_wins_over_the_launch_configs_mixed_precision(
    launch_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`accelerate launch --config_file` exports the yaml's mixed_precision, which transformers
    reads before the arguments' bf16: the training config must decide."""
    launched = yaml.safe_load(launch_config.read_text()).get("mixed_precision", "no")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    args = sft_config(build_config({"bf16": "false"}), tmp_path, has_eval=False)
    assert (args.bf16, args.mixed_precision) == (False, "no")
    assert args.model_init_kwargs["dtype"] == torch.float32


def test_a_continued_adapter_keeps_the_bf16_base_dtype_under_zero3(
    tiny_llava: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SARR's `sarr_init: continue` under ZeRO-3: PEFT would load the adapter upcast to float32
    beside a bfloat16 base, which ZeRO-3 cannot gather (TypeError at the first step)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is the optional extra: pip install -e '.[deepspeed]'")
    adapter = tmp_path / "adapter"
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava)
    get_peft_model(base, lora_config(base, 4, 8, 0.0, True)).save_pretrained(adapter)
    for name, value in {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    args = sft_config(build_config({"bf16": "true"}), tmp_path, has_eval=False)
    assert args.deepspeed_plugin.zero_stage == 3
    unset_hf_deepspeed_config()  # a single CPU process cannot build the model sharded; the dtype is the point
    model = load_start(str(tiny_llava), adapter, args)
    lora = {param.dtype for name, param in model.named_parameters() if "lora_" in name}
    assert lora == {torch.bfloat16}


def test_global_batch_must_divide() -> None:
    with pytest.raises(
        UserError, match="global_batch_size 128 is not a multiple of per_device_batch_size 8 x 3"
    ):
        TrainConfig().gradient_accumulation_steps(world_size=3)


# --- LoRA targets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "vision_layer", "language_layer"),
    [
        (
            "tiny_qwen2vl",
            "model.visual.blocks.0.attn.qkv",
            "model.language_model.layers.0.self_attn.q_proj",
        ),
        (
            "tiny_llava",
            "model.vision_tower.encoder.layers.0.self_attn.out_proj",
            "model.language_model.layers.1.mlp.down_proj",
        ),
        (
            "tiny_internvl",
            "model.vision_tower.encoder.layer.1.attention.projection_layer",
            "model.language_model.layers.0.self_attn.q_proj",
        ),
    ],
)
def test_lora_targets_vision_and_language_per_architecture(
    fixture: str, vision_layer: str, language_layer: str, request: pytest.FixtureRequest
) -> None:
    model = AutoModelForImageTextToText.from_pretrained(request.getfixturevalue(fixture))
    both = lora_config(model, 8, 16, 0.0, train_vision=True).target_modules
    language_only = lora_config(model, 8, 16, 0.0, train_vision=False).target_modules
    assert re.fullmatch(both, vision_layer) and re.fullmatch(both, language_layer)
    assert re.fullmatch(language_only, language_layer) and not re.fullmatch(
        language_only, vision_layer
    )
    assert not re.fullmatch(both, "lm_head")
    targeted = [module for name, module in model.named_modules() if re.fullmatch(both, name)]
    assert targeted and all(isinstance(module, torch.nn.Linear) for module in targeted)


@pytest.mark.parametrize(
    ("fixture", "projector"),
    [
        ("tiny_qwen2vl", "model.visual.merger."),
        ("tiny_llava", "model.multi_modal_projector."),
        ("tiny_internvl", "model.multi_modal_projector."),
    ],
)
def test_one_projector_rule_on_every_architecture_frozen_under_lora(
    fixture: str, projector: str, request: pytest.FixtureRequest
) -> None:
    """LoRA on the vision tower and the language model; the vision-language projector frozen."""
    model = AutoModelForImageTextToText.from_pretrained(request.getfixturevalue(fixture))
    peft_model = get_peft_model(model, lora_config(model, 8, 16, 0.0, train_vision=True))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    projector_params = [name for name, _ in peft_model.named_parameters() if projector in name]
    assert projector_params and not any(projector in name for name in trainable)
    assert any("language_model" in name for name in trainable)
    assert any(part in name for name in trainable for part in ("visual.blocks", "vision_tower"))


def test_numbered_linear_layers_do_not_pull_in_their_blocks_or_convs() -> None:
    regex = target_modules_regex(
        ["model.visual.blocks.0.mlp.0", "model.language_model.layers.0.mlp.up_proj"]
    )
    assert re.fullmatch(regex, "model.visual.blocks.0.mlp.0")
    assert not re.fullmatch(regex, "model.visual.blocks.0")
    assert not re.fullmatch(
        target_modules_regex(["model.visual.blocks.0.attn.proj", "model.language_model.x.q"]),
        "model.visual.patch_embed.proj",
    )


def test_model_without_a_language_model_is_refused() -> None:
    with pytest.raises(UserError, match="found no linear layers under a `language_model` module"):
        target_modules_regex(["encoder.layer.0.dense"])


# --- the trainer ------------------------------------------------------------------------------------------


def _colour_split(images: int) -> datasets.Dataset:
    """A learnable task: the colour decides the class, and the chain names it."""
    rows = []
    for index in range(images):
        label = index % len(SYNTH_CLASSES)
        name = SYNTH_CLASSES[label]
        rows.append(
            {
                "id": f"SynthDG/photo/{name}/{index}.png",
                "label": label,
                "image": Image.new("RGB", (32, 32), COLOURS[label]),
                "chain": f"<SUMMARY>colour</SUMMARY><CAPTION>{COLOURS[label]}</CAPTION><REASONING>so</REASONING>"
                f"<REFLECTION>sure</REFLECTION><CONCLUSION>{name}</CONCLUSION>",
            }
        )
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(SYNTH_CLASSES)),
            "image": datasets.Image(),
            "chain": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


def _trainer(model_dir: Path, out: Path, examples: datasets.Dataset, **overrides) -> MTCTTrainer:
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    settings = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "gradient_checkpointing": False,
        "use_cpu": True,
        "seed": 0,
    } | overrides
    return MTCTTrainer(
        model=model,
        args=SFTConfig(**settings),
        train_dataset=examples,
        processing_class=AutoProcessor.from_pretrained(model_dir),
        peft_config=lora_config(model, 8, 16, 0.0, train_vision=True),
    )


@pytest.mark.parametrize("fixture", ["tiny_qwen2vl", "tiny_llava", "tiny_internvl"])
def test_mtct_loss_falls_on_a_learnable_task(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    examples = build_examples(_colour_split(4), "mtct", SYNTH_CLASSES)
    trainer = _trainer(
        request.getfixturevalue(fixture),
        tmp_path,
        examples,
        max_steps=8,
        lr_scheduler_type="constant",
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss_cls" in entry]
    assert len(logs) == 8
    assert logs[-1]["loss"] < logs[0]["loss"] - 1.0  # nats, from about 13.6 = 2 x ln(vocab)
    assert (
        logs[-1]["loss_cls"] < logs[0]["loss_cls"]
        and logs[-1]["loss_reasoning"] < logs[0]["loss_reasoning"]
    )
    # the step loss is L_cls + L_reasoning (both means over this step's examples)
    assert logs[0]["loss"] == pytest.approx(
        logs[0]["loss_cls"] + logs[0]["loss_reasoning"], rel=1e-4
    )


def test_gradient_accumulation_gives_the_same_update(tiny_llava: Path, tmp_path: Path) -> None:
    """One step of 4 examples == one step of 2 micro-batches of 2 (SGD, so the update is the gradient)."""
    examples = build_examples(_colour_split(2), "mtct", SYNTH_CLASSES)
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        trainer = _trainer(
            tiny_llava,
            tmp_path / f"ga{accumulation}",
            examples,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
        )
        before = {k: v.clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
        trainer.train()
        weights.append(
            {
                k: v.detach() - before[k]
                for k, v in trainer.model.named_parameters()
                if v.requires_grad
            }
        )
    whole = torch.cat([update.flatten() for update in weights[0].values()])
    accumulated = torch.cat([weights[1][name].flatten() for name in weights[0]])
    assert whole.norm() > 0
    # the two runs differ by ~0.2% (float32 accumulation over micro-batches); a normalisation
    # by micro-batch instead of by step would be off by 100% here
    assert (accumulated - whole).norm() < 1e-2 * whole.norm()


# --- the stage --------------------------------------------------------------------------------------------


def _rewrite(export_dir: Path, tmp_path: Path, change: dict) -> Path:
    """A copy of the export whose rows have some columns replaced (a broken dataset)."""
    copy = tmp_path / "domainbed-reasoning"
    shutil.copytree(export_dir, copy)
    for shard in (copy / "SynthDG").glob("*.parquet"):
        frame = pl.read_parquet(shard)
        pl.from_arrow(frame.to_arrow()).with_columns(**change).write_parquet(shard)
    return copy


def _scanned(export_dir: Path) -> dict[str, int]:
    """Images per domain in the manifest the chains were built from (what `dbr scan` found)."""
    manifest = pl.read_parquet(export_dir.parent / "chains" / "SynthDG" / "manifest.parquet")
    return dict(manifest.group_by("domain").len().iter_rows())


def test_unknown_target_domain_is_refused(
    train_request, export_dir: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    request = train_request(export_dir, tiny_llava, tmp_path, target="mars")
    with pytest.raises(
        UserError, match="unknown target domain 'mars' for SynthDG: choose one of cartoon, painting"
    ):
        train(request)
    assert not any(tmp_path.iterdir())


def test_processor_without_chat_template_is_refused(
    train_request, export_dir: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_llava, model)
    (model / "chat_template.jinja").unlink()
    with pytest.raises(UserError, match="the processor of .* has no chat template"):
        train(train_request(export_dir, model, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_missing_model_folder_is_refused(train_request, export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model folder .*nowhere/model not found"):
        train(train_request(export_dir, tmp_path / "nowhere" / "model", tmp_path / "runs"))


def test_dataset_without_chains_is_refused(
    train_request,
    export_dir: Path,
    tiny_llava: Path,
    tmp_path: Path,
) -> None:
    broken = _rewrite(export_dir, tmp_path, {"chain": pl.lit(None, dtype=pl.String)})
    with pytest.raises(
        UserError, match="no image of the train split has an accepted reasoning chain: build chains first"
    ):
        train(train_request(broken, tiny_llava, tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_missing_images_are_refused(
    train_request,
    export_dir: Path,
    tiny_llava: Path,
    tmp_path: Path,
) -> None:
    gone = pl.struct(bytes=pl.lit(None, dtype=pl.Binary), path=pl.lit(str(tmp_path / "gone.png")))
    broken = _rewrite(export_dir, tmp_path, {"image": gone})
    with pytest.raises(
        UserError, match="in the train split is missing \\(no bytes, no readable file\\)"
    ):
        train(train_request(broken, tiny_llava, tmp_path / "runs", method="cls"))


def test_cli_prints_one_red_line_for_user_errors(
    export_dir: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "train",
            "SynthDG",
            "--data",
            str(export_dir),
            "--target",
            "mars",
            "--model",
            str(tiny_llava),
            "--out",
            str(tmp_path),
            "--set",
            "epochs=1",
        ],
    )
    assert isinstance(result.exception, UserError)
    assert "unknown target domain 'mars'" in str(result.exception)


def test_train_stage_end_to_end_then_reload_generate_and_resume(
    train_request, export_dir: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    request = train_request(export_dir, tiny_llava, out)
    result = train(request)
    run_dir = out / "SynthDG" / "sketch" / "mtct"
    assert result.run_dir == run_dir
    for name in (
        "split.parquet",
        "config.yaml",
        "run.json",
        "metrics.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/README.md",
        "adapter/processor_config.json",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    assert load_config(run_dir / "config.yaml") == request.config
    split = pl.read_parquet(run_dir / "split.parquet")
    assert set(split["split"]) == {"train", "validation", "test"}
    assert all(
        row_id.startswith("SynthDG/sketch/")
        for row_id in split.filter(pl.col("split") == "test")["id"]
    )
    assert not any("/sketch/" in row_id for row_id in split.filter(pl.col("split") != "test")["id"])
    steps = [entry["step"] for entry in result.metrics["log_history"] if "loss_cls" in entry]
    assert steps == [1, 2] and result.metrics["train_loss"] > 0
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "base_model:" in card and "the vision-language projector is frozen" in card
    # every image of every split is counted; only the reasoning path needs a chain
    scanned = _scanned(export_dir)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["test_images"] == scanned["sketch"] == split.filter(pl.col("split") == "test").height
    assert info["train_images"] + info["validation_images"] == sum(
        count for domain, count in scanned.items() if domain != "sketch"
    )
    assert 0 < info["train_images_with_chain"] < info["train_images"]
    assert info["dtype"] == "float32"  # bf16: auto on a machine without a bf16 GPU

    processor = AutoProcessor.from_pretrained(run_dir / "adapter")
    model = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_llava), run_dir / "adapter"
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape?"}]}
    ]
    inputs = processor(
        images=[Image.new("RGB", (32, 32), "red")],
        text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
        return_tensors="pt",
    )
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    with pytest.raises(UserError, match="already holds a finished run: pass --resume"):
        train(train_request(export_dir, tiny_llava, out))
    assert train(train_request(export_dir, tiny_llava, out, resume=True)).metrics == result.metrics
    with pytest.raises(UserError, match="--resume with settings that differ from"):
        train(train_request(export_dir, tiny_llava, out, resume=True, learning_rate=0.5))

    # a crash after checkpoint-1: the unfinished run refuses a fresh start, and --resume finishes it
    for name in ("metrics.json", "adapter", "checkpoints/checkpoint-2"):
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    with pytest.raises(UserError, match="holds checkpoints of an unfinished run: pass --resume"):
        train(train_request(export_dir, tiny_llava, out))
    resumed = train(train_request(export_dir, tiny_llava, out, resume=True))
    steps = [entry["step"] for entry in resumed.metrics["log_history"] if "loss_cls" in entry]
    assert steps == [
        1,
        2,
    ]  # step 1 comes from the checkpoint's history, only step 2 was trained again
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_training_frees_the_trainer_model_and_optimiser_before_anything_else_loads(
    train_request, export_dir: Path, tiny_llava: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vLLM server started after training needs the GPU memory back: the trainer, the model and
    the optimiser must be gone when `train` returns, not waiting in a reference cycle (under bf16
    accelerate rebinds `model.forward` to a wrapper bound to the model) for a garbage collection
    that may come after the server's start."""
    alive = []

    class Recorded(MTCTTrainer):
        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            alive.extend(weakref.ref(thing) for thing in (self, self.model, optimizer))
            return optimizer

    monkeypatch.setattr(stage, "MTCTTrainer", Recorded)
    gc.disable()  # nothing collects behind the code's back
    try:
        request = train_request(
            export_dir, tiny_llava, tmp_path / "runs", max_steps=1, save_steps=10, bf16="true"
        )
        train(request)
    finally:
        gc.enable()
    assert len(alive) == 3 and [ref() for ref in alive] == [None, None, None]


def test_cli_trains_then_evaluates_the_held_out_domain(
    fast_train, export_dir: Path, tiny_llava: Path, tmp_path: Path
) -> None:
    """With --resume (what `make train` passes): a fresh folder trains and evaluates, and a second
    run finds both finished and leaves them as they are."""
    overrides = [arg for key, value in fast_train.items() for arg in ("--set", f"{key}={value}")]
    argv = [
        "train", "SynthDG", "--data", str(export_dir), "--target", "sketch",
        "--model", str(tiny_llava), "--out", str(tmp_path), "--method", "cls", *overrides, "--resume",
    ]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    evaluation = tmp_path / "SynthDG/sketch/cls/eval/metrics.json"
    metrics = json.loads(evaluation.read_text())
    assert set(metrics["results"]) == {"test", "validation"}
    assert set(metrics["results"]["test"]) == {"direct"}
    # DomainBed's protocol: the whole held-out domain, images without a teacher chain included
    test = metrics["results"]["test"]["direct"]
    assert test["n"] == _scanned(export_dir)["sketch"] == test["per_domain"]["sketch"]["n"]
    sketch = load_domains(export_dir, "SynthDG")["sketch"]
    unchained = [row["id"] for row in sketch if row["chain"] is None]
    assert unchained and set(unchained) <= set(
        pl.read_parquet(tmp_path / "SynthDG/sketch/cls/eval/predictions-test-direct.parquet")["id"]
    )
    assert "held-out sketch" in result.output

    written = {path: path.stat().st_mtime_ns for path in (tmp_path / "SynthDG").rglob("*")}
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0, again.output
    assert "(finished before)" in again.output and "held-out sketch" not in again.output
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "SynthDG").rglob("*")} == written


def test_full_fine_tuning_saves_a_model_that_engines_and_evaluation_load(
    train_request, export_dir: Path, tiny_qwen2vl: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    result = train(train_request(export_dir, tiny_qwen2vl, out, method="cls", finetune="full"))
    run_dir = out / "SynthDG" / "sketch" / "cls"
    assert result.weights.model == str(run_dir / "model") and result.weights.adapter is None
    assert not (run_dir / "adapter").exists()
    card = (run_dir / "model" / "README.md").read_text()
    assert "fully fine-tuned" in card and "projector included" in card
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen2vl).state_dict()
    tuned = AutoModelForImageTextToText.from_pretrained(run_dir / "model").state_dict()
    changed = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert any("visual" in name for name in changed) and any(
        "language_model" in name for name in changed
    )

    metrics = evaluate_run(run_dir, EvalSettings(progress=False, cache_dir=tmp_path / "cache"))
    assert metrics["model"] == str(run_dir / "model") and metrics["adapter"] is None
    assert metrics["results"]["test"]["direct"]["n"] == len(
        load_domains(export_dir, "SynthDG")["sketch"]
    )

"""Session fixtures shared by the suite: the tiny model and the real vLLM teacher serving it.

Both are expensive (a model build, a ~60 s vLLM start), so each happens once per
session; the model folder is also cached on disk across sessions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import polars as pl
import pytest
import yaml
from PIL import Image

from domainbed_reasoning import artefacts
from domainbed_reasoning.chains.chain_format import format_chain
from domainbed_reasoning.chains.prompt_templates import load_prompt
from domainbed_reasoning.data.registry import SPECS, get_spec
from domainbed_reasoning.offline import synth
from domainbed_reasoning.offline.real_shapes import build_real_shape
from domainbed_reasoning.offline.tiny_models import build_tiny_model, cached_tiny_model
from domainbed_reasoning.serving.vllm_server import Endpoint, ServerConfig, VLLMServer, free_port

REPO = Path(__file__).resolve().parents[1]
TINY_MODELS = REPO / ".cache" / "tiny-models"
REAL_SHAPE_MODELS = REPO / ".cache" / "real-shape-models"
# The non-weight files of real checkpoints (one folder each): $DBR_REAL_SHAPES, else the
# `shared/real_shapes` folder beside the checkout, where CI keeps them.
REAL_SHAPES = Path(os.environ.get("DBR_REAL_SHAPES") or REPO.parent / "shared" / "real_shapes")
REPO_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"

# Class and domain names become whole tokens, so chains about them stay short.
TINY_VOCAB = sorted(
    {name for spec in SPECS if spec.name != "DomainNet" for name in spec.classes + spec.domains}
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tag every test that needs real vLLM, so `-m "not vllm"` can leave them out."""
    for item in items:
        if "vllm_python" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """$DBR_VLLM_PYTHON (set by `make test`), else the repo's .venv-vllm; skip without either."""
    if env := os.environ.get("DBR_VLLM_PYTHON"):
        return Path(env)
    if not REPO_VLLM_PYTHON.is_file():
        pytest.skip("real vLLM tests need .venv-vllm: run `make vllm-env` or set DBR_VLLM_PYTHON")
    return REPO_VLLM_PYTHON


@pytest.fixture(scope="session")
def tiny_qwen2vl() -> Path:
    return cached_tiny_model(
        build_tiny_model, TINY_MODELS, architecture="qwen2vl", vocab_words=TINY_VOCAB
    )


@pytest.fixture(scope="session")
def tiny_llava() -> Path:
    """A second architecture (CLIP tower + Qwen2 LM, LLaVA-1.5 layout) for per-architecture code."""
    return cached_tiny_model(
        build_tiny_model, TINY_MODELS, architecture="llava", vocab_words=TINY_VOCAB
    )


@pytest.fixture(scope="session")
def tiny_internvl() -> Path:
    """The paper's backbone family: InternVL3's `*-hf` layout (InternViT, pixel-shuffle projector, Qwen2 LM)."""
    return cached_tiny_model(
        build_tiny_model, TINY_MODELS, architecture="internvl", vocab_words=TINY_VOCAB
    )


def real_shape_model(folder: str) -> Path:
    """A random-weight model with the real tokenizer, template, processor and config in `folder`."""
    source = REAL_SHAPES / folder
    if not (source / "config.json").is_file():
        pytest.skip(
            f"real-checkpoint tests need {source}/ (tokenizer, template, processor and config files "
            "of the checkpoint, no weights): set DBR_REAL_SHAPES to the folder that holds it"
        )
    return cached_tiny_model(build_real_shape, REAL_SHAPE_MODELS, source=str(source.resolve()))


@pytest.fixture(scope="session")
def real_internvl() -> Path:
    """InternVL3-2B-hf's own files (151,675-token tokenizer, template, tiling processor), 2 layers."""
    return real_shape_model("internvl3_2b_hf")


@pytest.fixture(scope="session")
def real_qwen2vl() -> Path:
    """Qwen2-VL-2B-Instruct's own files (system prompt, left padding, legacy pixel keys), 2 layers."""
    return real_shape_model("qwen2_vl_2b_instruct")


# vLLM's prefix caching is on for the tiny teacher, so that the builder's text-first prompt can be
# seen served from it. That CPU build crashes when a cached prefix makes it prefill a seeded request
# in parts, which needs an image's encoding to wait for the step's encoder budget (2,048 tokens,
# the context); the tiny processor caps an image at 16 tokens, and 128 sequences a step at most
# need 2,048: it cannot happen here.
TINY_TEACHER_ARGS = ("--enable-prefix-caching", "--max-num-seqs", "128")


@pytest.fixture(scope="session")
def vllm_teacher(
    tiny_qwen2vl: Path, vllm_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Endpoint]:
    """The real vLLM OpenAI server with the tiny model; its setup time shows in `--durations`."""
    config = ServerConfig(
        model=str(tiny_qwen2vl),
        served_model_name="tiny-teacher",
        port=free_port(),
        max_model_len=2048,
        dtype="float32",
        vllm_python=vllm_python,
        log_path=tmp_path_factory.mktemp("vllm") / "server.log",
        extra_args=TINY_TEACHER_ARGS,
    )
    with VLLMServer(config) as server:
        yield server.endpoint


# --- DomainBed-Reasoning chain runs (the builder's output contract), for export/publish/loading tests.

CHAIN_DROPPED_INDEX = 1  # images with this index in class 0 get no accepted chain: acceptance < 100%
TEACHER_PROMPT = load_prompt("teacher")
TEMPERATURES = (0.7, 0.9, 1.0)
MAX_ROUNDS = 3


def _write_png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)


def _candidate(id_: str, round_: int, index: int, reason: str, text: str, predicted: str | None) -> dict:
    return {
        "id": id_, "round": round_, "candidate_index": index, "temperature": TEMPERATURES[round_ - 1],
        "text": text, "finish_reason": "stop", "reason": reason, "predicted": predicted,
        "detail": None if reason == "accepted" else f"{reason} in the fixture",
        "prompt_tokens": 100, "completion_tokens": 40, "latency_s": 0.1,
        "teacher": "tiny-teacher", "teacher_url": "127.0.0.1", "prompt_version": TEACHER_PROMPT.version,
    }  # fmt: skip


def _answers(id_: str, chain: str, wrong: str, accepted: bool, odd: bool) -> list[dict]:
    """What the teacher said about one image: accepted images need one round (even index) or two
    (odd index: round 1 was all wrong), with 2 candidates per request; the others use up every round."""
    rounds = (2 if odd else 1) if accepted else MAX_ROUNDS
    out = []
    for round_ in range(1, rounds + 1):
        last = accepted and round_ == rounds
        out.append(_candidate(id_, round_, 0, "wrong_class", chain.replace(">", ">?", 0), wrong))
        out.append(
            _candidate(id_, round_, 1, "accepted", chain, None)
            if last
            else _candidate(id_, round_, 1, "missing_stage", "<SUMMARY>cut short", None)
        )
    return out


def write_chain_run(chains_root: Path, data_dir: Path, dataset: str, images_per_class: int, classes: int) -> Path:
    """Images under `data_dir` plus manifest/candidates/chains/stats as `dbr build-chains` writes them.

    In class 0 the image with index CHAIN_DROPPED_INDEX has no chain: in the first domain it is
    pending (never sent, plus one transport failure), elsewhere exhausted after every round.
    """
    spec = get_spec(dataset)
    root = artefacts.dataset_root(data_dir, spec)
    if spec.name == "SynthDG":
        synth.generate(data_dir, images_per_class, seed=0, size=synth.MIN_SIZE)
    manifest, chains, candidates, exhausted = [], [], [], {}
    for d, domain in enumerate(spec.domains):
        for c, class_name in enumerate(spec.classes[:classes]):
            for index in range(images_per_class):
                filename = f"{domain}_{class_name}_{index:05d}.png"
                path = root / domain / class_name / filename
                if spec.name != "SynthDG":
                    _write_png(path, (40 * d, 40 * c, 20 * index))
                record = {
                    "id": artefacts.image_id(spec, domain, class_name, filename),
                    "dataset": spec.name,
                    "domain": domain,
                    "class_name": class_name,
                    "label": spec.label_of(class_name),
                    "path": str(path.resolve()),
                }
                manifest.append(record | {"width": 8, "height": 6, "bytes": path.stat().st_size})
                stages = {
                    "summary": f"I will decide which class the {domain} image shows.",
                    "caption": f"A {domain} rendering of a single object.",
                    "reasoning": f"Its outline matches a {class_name}.",
                    "reflection": "No other class fits the outline as well.",
                    "conclusion": class_name,
                }
                chain = format_chain(stages)
                wrong = spec.classes[(c + 1) % len(spec.classes)]
                if c == 0 and index == CHAIN_DROPPED_INDEX:
                    if d == 0:
                        candidates.append(_candidate(record["id"], 1, 0, "request_error", "", None))
                    else:
                        candidates += _answers(record["id"], chain, wrong, accepted=False, odd=False)
                        exhausted[record["id"]] = {"missing_stage": MAX_ROUNDS, "wrong_class": MAX_ROUNDS}
                    continue
                answers = _answers(record["id"], chain, wrong, accepted=True, odd=index % 2 == 1)
                candidates += answers
                chains.append(
                    record
                    | {"chain": chain, **stages, "teacher": "tiny-teacher", "prompt_version": TEACHER_PROMPT.version}
                    | {"attempts": len(answers), "round": answers[-1]["round"]}
                )
    folder = artefacts.chains_dir(chains_root, spec)
    artefacts.candidates_dir(folder).mkdir(parents=True, exist_ok=True)
    pl.DataFrame(manifest).write_parquet(artefacts.manifest_path(folder))
    pl.DataFrame(candidates).write_parquet(artefacts.candidates_dir(folder) / "part-fixture.parquet")
    pl.DataFrame(chains).write_parquet(artefacts.chains_path(folder))
    stats = {
        "run": {"candidates": 2, "max_rounds": MAX_ROUNDS, "shard": "0/1"},
        "candidates": len(candidates),
        "exhausted": exhausted,
    }
    artefacts.stats_path(folder).write_text(json.dumps(stats))
    return folder


@pytest.fixture
def chain_runs(tmp_path: Path) -> tuple[Path, Path]:
    """(chains_root, data_dir) holding SynthDG (2 images per class) and OfficeHome (3 classes, 2 each)."""
    chains_root, data_dir = tmp_path / "runs" / "chains", tmp_path / "data"
    write_chain_run(chains_root, data_dir, "SynthDG", images_per_class=2, classes=5)
    write_chain_run(chains_root, data_dir, "OfficeHome", images_per_class=2, classes=3)
    return chains_root, data_dir


@pytest.fixture
def make_chain_run():
    """`write_chain_run` for tests that need a differently shaped run than `chain_runs`."""
    return write_chain_run


# --- a real DomainBed-Reasoning export and fast training settings, for the train/ tests.

FAST_TRAIN = {
    "max_train_images": 4,
    "max_steps": 2,
    "per_device_batch_size": 4,
    "global_batch_size": 4,
    "gradient_checkpointing": False,
    "save_steps": 1,
    "logging_steps": 1,
    "learning_rate": 1e-2,
    "dataloader_num_workers": 0,
}


PENDING_DOMAIN = "photo"  # its image without a chain is "pending" (never resolved), the others "exhausted"


def keep_unchained_images(export: Path, chains_folder: Path) -> None:
    """Every manifest image a row, as the export contract says (docs/dataset.md).

    An export that already keeps them (a `chain_status` column) is left alone; one that
    holds only accepted chains gets the other images added with null chain fields and
    their `chain_status`, the bytes embedded as the export embeds them (the card's
    feature list is dropped: `load_dataset` reads the features from the Parquet files).
    """
    from domainbed_reasoning.hub.export import CHAIN_FIELDS

    manifest = pl.read_parquet(artefacts.manifest_path(chains_folder))
    shards = sorted(export.glob("*.parquet"))
    if "chain_status" in datasets.Dataset.from_parquet(str(shards[0])).column_names:
        return
    card = export.parent / "README.md"
    _, front, body = card.read_text(encoding="utf-8").split("---\n", 2)
    meta = yaml.safe_load(front)
    meta.pop("dataset_info", None)
    card.write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body}", encoding="utf-8")
    for shard in shards:
        rows = datasets.Dataset.from_parquet(str(shard))
        rows = rows.add_column("chain_status", ["accepted"] * len(rows))
        domain = rows[0]["domain"]
        missing = manifest.filter(
            (pl.col("domain") == domain) & ~pl.col("id").is_in(rows["id"])
        ).to_dicts()
        status = "pending" if domain == PENDING_DOMAIN else "exhausted"
        added = {
            "id": [row["id"] for row in missing],
            "dataset": [row["dataset"] for row in missing],
            "domain": [domain] * len(missing),
            "label": [row["label"] for row in missing],
            "class_name": [row["class_name"] for row in missing],
            "image": [{"bytes": Path(row["path"]).read_bytes(), "path": Path(row["path"]).name} for row in missing],
            **{field: [None] * len(missing) for field in CHAIN_FIELDS},
            "teacher": [None] * len(missing),
            "prompt_version": [None] * len(missing),
            "attempts": [0 if status == "pending" else 12] * len(missing),
            "chain_status": [status] * len(missing),
        }
        every = datasets.concatenate_datasets(
            [rows, datasets.Dataset.from_dict(added, features=rows.features)]
        ).sort("id")
        every.to_parquet(str(shard))


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DomainBed-Reasoning SynthDG (4 domains x 5 classes x 2 images), exported for real.

    Every image is a row; one per domain has no accepted chain (`chain: null`), "pending"
    in photo and "exhausted" elsewhere.
    """
    from domainbed_reasoning.hub.export import export

    root = tmp_path_factory.mktemp("export")
    chains = write_chain_run(root / "chains", root / "data", "SynthDG", images_per_class=2, classes=5)
    export(root / "chains", root / "data", root / "domainbed-reasoning", ["SynthDG"], progress=False)
    keep_unchained_images(root / "domainbed-reasoning" / "SynthDG", chains)
    return root / "domainbed-reasoning"


@pytest.fixture(scope="session")
def train_request():
    """`train_request(export_dir, model, out, resume=False, target="sketch", **overrides)`: a fast LODO request."""
    from domainbed_reasoning.train.config import build_config
    from domainbed_reasoning.train.stages.stage import TrainRequest

    def make(
        export: Path, model: Path, out: Path, resume: bool = False, target: str = "sketch", **overrides
    ) -> TrainRequest:
        settings = build_config(FAST_TRAIN | overrides)
        return TrainRequest("SynthDG", str(export), target, str(model), out, settings, resume)

    return make


@pytest.fixture(scope="session")
def fast_train() -> dict:
    """The settings `train_request` uses, for tests that pass them another way (the CLI)."""
    return dict(FAST_TRAIN)

"""`dbr`: one command per stage of the data flow (docs/architecture.md).

Each command only turns its options into the stage's inputs and calls one function
of that stage, which does the work and prints its own summary. Every `UserError`
becomes one red line and exit code 2. Stages are imported inside their command, so
`dbr datasets` does not pay for loading torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.errors import UserError
from domainbed_reasoning.terminal import err_console

app = typer.Typer(
    name="dbr",
    help="Build DomainBed-Reasoning and train MLLMs on it with RD-MLDG.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Options several commands share, declared once so their flags and help read the same everywhere.
DatasetName = Annotated[str, typer.Argument(help="Dataset name, e.g. PACS (see `dbr datasets`).")]
DataDir = Annotated[Path, typer.Option(help="Folder holding <dirname>/<domain>/<class>/<image>.")]
ShowProgress = Annotated[bool, typer.Option(help="Show the progress bar.")]
TrainingData = Annotated[str, typer.Option(help="DomainBed-Reasoning export folder or Hub repo id.")]


def _csv(value: str | None) -> tuple[str, ...] | None:
    return tuple(part.strip() for part in value.split(",") if part.strip()) if value else None


@app.command()
def datasets(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """List the DomainBed datasets this toolkit knows: folders, domains, classes."""
    from domainbed_reasoning.data.registry import print_datasets

    print_datasets(as_json)


@app.command()
def prompt(
    name: str = typer.Argument("teacher", help="Prompt template: teacher, classify or reason."),
    dataset: str = typer.Option("PACS", help="Dataset whose class names fill {classes}."),
) -> None:
    """Print a prompt exactly as the model receives it, with its version (the content hash)."""
    from domainbed_reasoning.chains.prompt_templates import print_prompt

    print_prompt(name, get_spec(dataset).classes)


@app.command("judge")
def judge_command(
    text: str = typer.Argument(..., help="A conclusion, or a whole five-stage answer; '-' reads stdin."),
    dataset: str = typer.Option(..., help="Dataset whose classes the text is read against, e.g. OfficeHome."),
    label: str | None = typer.Option(None, help="The true class: also say whether the answer would be kept."),
) -> None:
    """Probe the label filter: the class a text names, the verdict, and the rule that decided it."""
    from domainbed_reasoning.chains.probe import print_judgement

    print_judgement(get_spec(dataset).classes, text, label)


@app.command()
def scan(
    dataset: DatasetName,
    data_dir: DataDir = Path("data"),
    out: Path = typer.Option(Path("manifest.parquet"), help="Where to write the Parquet manifest."),
) -> None:
    """Walk a DomainBed folder and write its manifest: one row per image."""
    from domainbed_reasoning.data.scan import scan_to_manifest

    scan_to_manifest(get_spec(dataset), data_dir, out)


@app.command()
def synth(
    data_dir: Path = typer.Option(Path("data"), help="Folder to write SynthDG/<domain>/<class>/<image> into."),
    images_per_class: int = typer.Option(50, help="Images per (domain, class) pair."),
    seed: int = typer.Option(0, help="Same seed, same bytes."),
    size: int = typer.Option(64, help="Image side in pixels."),
) -> None:
    """Draw the SynthDG dataset (4 styles x 5 shapes) and its attributes sidecar, offline."""
    from domainbed_reasoning.offline.synth import draw

    draw(data_dir, images_per_class, seed, size)


@app.command("sim-teacher")
def sim_teacher(
    data_dir: Path = typer.Option(Path("data"), help="Folder holding SynthDG/ and its attributes sidecar."),
    port: int = typer.Option(8000, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    model: str = typer.Option("sim-teacher", help="Model id served at /v1/models."),
    latency_ms: float = typer.Option(0.0, help="Added latency per request, in ms."),
    jitter_ms: float = typer.Option(0.0, help="Extra uniform random latency up to this many ms."),
    p_wrong: float = typer.Option(0.0, help="Per answer: conclusion names another class."),
    p_malformed: float = typer.Option(0.0, help="Per answer: a stage missing, swapped or unclosed."),
    p_empty: float = typer.Option(0.0, help="Per answer: empty content."),
    p_429: float = typer.Option(0.0, help="Per request: 429 with a Retry-After header."),
    retry_after: float = typer.Option(1.0, help="Retry-After seconds sent with a 429."),
    p_500: float = typer.Option(0.0, help="Per request: HTTP 500."),
    p_drop: float = typer.Option(0.0, help="Per request: connection closed without a response."),
    p_stall: float = typer.Option(0.0, help="Per request: answer only after --stall-s seconds."),
    stall_s: float = typer.Option(30.0, help="How long a stalled request sleeps."),
    outage_after: int | None = typer.Option(None, help="Chat requests answered before an outage begins."),
    outage_s: float = typer.Option(0.0, help="How long the outage lasts: every endpoint answers 503."),
    engine_dead_after: int | None = typer.Option(
        None, help="Chat requests answered before the engine dies: then every one answers vLLM's HTTP 500."
    ),
    seed: int = typer.Option(0, help="Seed of the fault and wording draws."),
) -> None:
    """Serve an OpenAI-compatible simulated teacher for SynthDG, with optional fault injection."""
    from domainbed_reasoning.offline.sim_teacher import SimTeacherConfig, serve

    config = SimTeacherConfig(
        model=model, latency_ms=latency_ms, jitter_ms=jitter_ms, p_wrong=p_wrong, p_malformed=p_malformed,
        p_empty=p_empty, p_429=p_429, retry_after=retry_after, p_500=p_500, p_drop=p_drop, p_stall=p_stall,
        stall_s=stall_s, outage_after=outage_after, outage_s=outage_s, engine_dead_after=engine_dead_after,
        seed=seed,
    )  # fmt: skip
    serve(config, data_dir, host, port)


@app.command()
def download(
    dataset: DatasetName,
    data_dir: Path = typer.Option(Path("data"), help="Folder to write <dirname>/<domain>/<class>/<image> into."),
    from_archive: list[Path] = typer.Option(
        [], "--from-archive", help="An archive you already hold (or a folder of them); repeatable. Skips HTTP."
    ),
    from_hub: str | None = typer.Option(
        None, "--from-hub", help="Hub dataset (or local folder) with image/domain/label columns, e.g. flwrlabs/pacs."
    ),
) -> None:
    """Fetch a DomainBed dataset into DomainBed's layout: resumable, verified, safe to re-run."""
    from domainbed_reasoning.data.download import download as download_into

    download_into(get_spec(dataset), data_dir, from_archive, from_hub)


@app.command(
    "serve-teacher", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def serve_teacher(
    ctx: typer.Context,
    model: str = typer.Option(..., help="Hub id or local folder of the teacher MLLM."),
    served_model_name: str = typer.Option("teacher", help="Model name clients ask for (--teacher-model)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size (GPUs per server)."),
    max_model_len: int = typer.Option(8192, help="Context length: prompt + image tokens + chain."),
    dtype: str = typer.Option("auto", help="Weights dtype; float32 for tiny test models on CPU."),
    images_per_prompt: int = typer.Option(1, help="vLLM --limit-mm-per-prompt for images."),
    kv_cache_gib: int = typer.Option(1, help="KV cache GiB on the CPU build (VLLM_CPU_KVCACHE_SPACE)."),
    lora: list[str] = typer.Option([], help="name=path of a LoRA adapter to serve (repeatable)."),
    max_lora_rank: int = typer.Option(8, help="Largest LoRA rank served."),
    vllm_python: Path | None = typer.Option(
        None, help="Python of the vLLM env (else $DBR_VLLM_PYTHON, else .venv-vllm/bin/python)."
    ),
    log: Path = typer.Option(Path("runs/vllm/teacher.log"), help="vLLM's log file."),
) -> None:
    """Serve a teacher MLLM with vLLM's OpenAI API until Ctrl-C; extra args go to vLLM unchanged."""
    from domainbed_reasoning.serving.vllm_server import ServerConfig, parse_lora_modules, serve

    serve(
        ServerConfig(
            model=model,
            served_model_name=served_model_name,
            host=host,
            port=port,
            tensor_parallel_size=tp,
            max_model_len=max_model_len,
            dtype=dtype,
            limit_mm_per_prompt={"image": images_per_prompt},
            cpu_kvcache_gib=kv_cache_gib,
            lora_modules=parse_lora_modules(lora),
            max_lora_rank=max_lora_rank,
            extra_args=tuple(ctx.args),
            vllm_python=vllm_python,
            log_path=log,
        )
    )


@app.command(
    "build-chains",
    epilog="Exit codes: 0 every selected image accepted or exhausted; 2 bad input (one line); "
    "3 some selected images are unresolved because their requests failed (transport errors, "
    "an outage past --outage-wait): run the same command again to retry exactly those.",
)
def build_chains_command(
    ctx: typer.Context,
    dataset: DatasetName,
    data_dir: DataDir = Path("data"),
    out: Path = typer.Option(Path("runs/chains"), help="Writes <out>/<DATASET>/{manifest,chains}.parquet etc."),
    teacher_url: list[str] = typer.Option(
        ["http://127.0.0.1:8000/v1"], help="OpenAI-compatible base URL; repeat for several replicas."
    ),
    teacher_model: str = typer.Option("teacher", help="Model name the teacher serves."),
    candidates: int = typer.Option(4, help="Samples per request (the `n` parameter): one prefill, K answers."),
    max_rounds: int = typer.Option(3, help="Answered requests per image at most before it counts as exhausted."),
    temperatures: str = typer.Option("0.7,0.9,1.0", help="Temperature per round; the last one repeats."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling top_p, sent with every request."),
    seed: int = typer.Option(0, help="Base of the per-request seed (derived from it, the image and the round)."),
    concurrency: int = typer.Option(256, help="Requests in flight at once, over all replicas."),
    timeout: float = typer.Option(120.0, help="Seconds per request attempt."),
    max_retries: int = typer.Option(
        3, help="Retries on 429/5xx/timeouts/connection errors, each on a healthy replica."
    ),
    outage_wait: float = typer.Option(
        1800.0, help="Seconds to wait for a replica when every one is down, then stop (exit 3)."
    ),
    shard: str = typer.Option("0/1", help="i/n: this machine takes the ids whose hash mod n is i."),
    limit: int | None = typer.Option(None, help="Only the first N images of this shard (a trial run)."),
    max_side: int = typer.Option(1024, help="Images with a longer side are downscaled to it before sending."),
    max_tokens: int = typer.Option(1024, help="Completion token limit per answer."),
    api_key_env: str | None = typer.Option(
        None,
        help="Environment variable holding the API key (default OPENAI_API_KEY, else 'EMPTY'). "
        "OPENAI_API_KEY goes over plain http only to this machine; naming it here sends it anywhere.",
    ),
    allow_mixed: bool = typer.Option(
        False, help="Add to an --out folder that holds another teacher's or prompt version's answers."
    ),
    progress: ShowProgress = True,
    workers: int = typer.Option(
        0, help="Client processes sharing --concurrency; 0 chooses from the free cores."
    ),
    rejudge: bool = typer.Option(
        False, help="Judge the stored candidates again with this dbr's judge; no teacher requests."
    ),
    mode: str = typer.Option(
        "online", help="online (requests as they go), or batch (OpenAI's Batch API, half price; with "
        "--teacher-checkpoint, vLLM's offline runner)."
    ),
    dry_run: bool = typer.Option(False, help="Print the requests, tokens and cost this would take; send nothing."),
    budget_usd: float | None = typer.Option(
        None, help="Stop (resumably) once the folder's measured teacher cost reaches this many dollars."
    ),
    max_requests_per_minute: float | None = typer.Option(None, help="Stay under this many requests a minute."),
    max_tokens_per_minute: float | None = typer.Option(None, help="Stay under this many tokens a minute."),
    detail: str = typer.Option("auto", help="OpenAI's image detail, low, high or auto (sent to OpenAI's API only)."),
    price_in: float | None = typer.Option(None, help="Dollars per million prompt tokens (default: list price)."),
    price_out: float | None = typer.Option(None, help="Dollars per million completion tokens (default: list price)."),
    teacher_checkpoint: str | None = typer.Option(
        None, help="The local teacher's checkpoint: --dry-run counts with its processor; --mode batch runs it."
    ),
    vllm_arg: list[str] = typer.Option(
        [], help="An argument for vLLM's offline runner in --mode batch, e.g. --vllm-arg=--dtype=float32."
    ),
    batch_poll_s: float = typer.Option(30.0, help="--mode batch: seconds between polls of the Batch API."),
) -> None:
    """Sample teacher chains for every image, keep label-consistent ones; resumable, re-run to continue."""
    from domainbed_reasoning.builders.build import build_and_summarise
    from domainbed_reasoning.builders.build_config import BuildOptions

    options = BuildOptions(**ctx.params)
    raise typer.Exit(build_and_summarise(options.config(), rejudge=options.rejudge))


@app.command("train")
def train_command(
    dataset: DatasetName,
    data: TrainingData = "domainbed-reasoning",
    target: str = typer.Option(..., help="Held-out (test) domain; training uses every other domain."),
    model: str = typer.Option(..., help="Base MLLM: a local checkpoint folder or a Hub id."),
    method: str | None = typer.Option(
        None,
        help="mtct (both paths), cls (class name only), reasoning (chain only) or rd-mldg (MTCT + SARR); "
        "default: the config's (mtct).",
    ),
    out: Path = typer.Option(Path("runs/train"), help="Writes <out>/<DATASET>/<target>/<method>/."),
    config: Path | None = typer.Option(
        None, help="YAML settings; default: the paper's, train/configs/mtct.yaml shipped with the package."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, KEY=VALUE; repeatable."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint of this run folder (or start it); a finished run and evaluation are kept as they are."),
    sarr_rounds: int | None = typer.Option(None, help="rd-mldg: self-labelling rounds after MTCT (config: 3)."),
    sarr_init: str | None = typer.Option(
        None, help="rd-mldg: each round trains from the `base` model or `continue`s the last adapter."
    ),
    engine: str | None = typer.Option(
        None, help="Generation engine for SARR self-labelling and evaluation: transformers or vllm."
    ),
    evaluate: bool = typer.Option(True, help="Evaluate the final adapter on the held-out domain and validation."),
    selection: str | None = typer.Option(
        None, help="Weights tested: last (the paper's, config default) or training-domain (best kept checkpoint on validation)."
    ),
) -> None:
    """RD-MLDG training with LoRA via TRL, leave-one-domain-out: MTCT (or one path), or MTCT + SARR rounds."""
    from domainbed_reasoning.train.config import load_config, parse_overrides
    from domainbed_reasoning.train.stages.run import train_and_evaluate
    from domainbed_reasoning.train.stages.stage import TrainRequest

    flags = {
        "method": method, "sarr_rounds": sarr_rounds, "sarr_init": sarr_init, "engine": engine,
        "model_selection": selection,
    }  # fmt: skip
    chosen = {key: value for key, value in flags.items() if value is not None}
    settings = load_config(config, {**parse_overrides(set_), **chosen})
    train_and_evaluate(TrainRequest(dataset, data, target, model, out, settings, resume), evaluate)


@app.command()
def export(
    datasets: list[str] = typer.Argument(..., help="Dataset names to (re-)export, e.g. PACS VLCS."),
    chains_dir: Path = typer.Option(Path("runs/chains"), help="Holds <DATASET>/{manifest,chains}.parquet."),
    data_dir: DataDir = Path("data"),
    out: Path = typer.Option(Path("domainbed-reasoning"), help="The Hub-layout folder (README.md + <DATASET>/)."),
    max_shard_mb: int = typer.Option(256, help="Largest Parquet shard, in MiB of image bytes."),
    progress: ShowProgress = True,
) -> None:
    """Write DomainBed-Reasoning as Parquet with embedded images and regenerate its dataset card."""
    from domainbed_reasoning.hub.export import export_and_report

    export_and_report(chains_dir, data_dir, out, datasets, max_shard_mb * 1024**2, progress)


@app.command()
def publish(
    folder: Path = typer.Option(Path("domainbed-reasoning"), help="The folder `dbr export` wrote."),
    repo_id: str = typer.Option(..., help="Hub dataset repo, USER/domainbed-reasoning."),
    private: bool = typer.Option(False, help="Create the repo private (an existing repo keeps its visibility)."),
    revision: str | None = typer.Option(None, help="Branch to commit to (created if missing); default main."),
    dry_run: bool = typer.Option(False, help="List the files and total size; upload nothing."),
) -> None:
    """Upload the export folder to a Hub dataset repo; token from HF_TOKEN or `hf auth login`."""
    from domainbed_reasoning.hub.publish import publish_or_plan

    publish_or_plan(folder, repo_id, private=private, revision=revision, dry_run=dry_run)


@app.command()
def browse(
    folder: Path = typer.Argument(..., help="A build folder `dbr build-chains` wrote, e.g. runs/chains/PACS."),
    out: Path | None = typer.Option(None, help="HTML file to write; default <folder>/browse.html."),
    per_class: int = typer.Option(6, help="Answered images shown per domain and class."),
    seed: int = typer.Option(0, help="Which images are sampled: same seed, same images."),
    thumb_size: int = typer.Option(192, help="Longest side of the inline thumbnails, in pixels."),
) -> None:
    """Write one self-contained HTML page to look at the chains: acceptance, accepted and rejected answers."""
    from domainbed_reasoning.hub.browse import BrowseOptions, write_browser_page

    write_browser_page(folder, out, BrowseOptions(per_class, seed, thumb_size))


@app.command("eval")
def eval_command(
    run: Path | None = typer.Option(None, help="A finished `dbr train` run folder: evaluates its adapter."),
    dataset: str | None = typer.Option(None, help="With --model: dataset name, e.g. PACS."),
    data: str = typer.Option("domainbed-reasoning", help="With --model: DomainBed-Reasoning folder or Hub repo id."),
    target: str | None = typer.Option(None, help="With --model: the held-out domain to test on."),
    model: str | None = typer.Option(None, help="Evaluate this model as is: checkpoint folder, Hub id, remote name."),
    adapter: Path | None = typer.Option(None, help="With --model: a LoRA adapter folder to apply."),
    name: str | None = typer.Option(None, help="With --model: the row's name, e.g. gpt-4o (default: model name)."),
    out: Path = typer.Option(Path("runs/train"), help="With --model: writes <out>/<DATASET>/<target>/zeroshot-<name>/."),
    engine: str = typer.Option("transformers", help="transformers (in-process), vllm (.venv-vllm server) or remote."),
    base_url: str | None = typer.Option(None, help="remote engine: OpenAI-compatible base URL."),
    api_key_env: str | None = typer.Option(None, help="remote engine: environment variable holding the API key."),
    batch_size: int | None = typer.Option(None, help="transformers engine: images per batch."),
    vllm_python: Path | None = typer.Option(None, help="vllm engine: Python of the vLLM env."),
    max_model_len: int | None = typer.Option(None, help="vllm engine: context length (default: the run's vllm_max_model_len, 8192)."),
    tensor_parallel_size: int | None = typer.Option(None, help="vllm engine: GPUs per server (default: the run's, 1)."),
    modes: str | None = typer.Option(None, help="direct,reasoning (default: the mode(s) the method trained)."),
    splits: str | None = typer.Option(None, help="test,validation (default: both; test only with --model)."),
    direct_tokens: int = typer.Option(32, help="Token limit of a direct (class name) answer."),
    max_new_tokens: int = typer.Option(1024, help="Token limit of a reasoning answer."),
    force: bool = typer.Option(False, help="Evaluate again over a finished evaluation."),
    progress: ShowProgress = True,
    selection: str | None = typer.Option(
        None, help="With --run: last or training-domain (default: the run's model_selection)."
    ),
) -> None:
    """Leave-one-domain-out accuracy (direct and reasoning modes) of a trained run or of any model."""
    from domainbed_reasoning.train.engines.settings import EngineSettings
    from domainbed_reasoning.train.evaluation import evaluate

    if model is not None and run is None and (dataset is None or target is None):
        raise UserError("--model needs --dataset and --target (the LODO test split to evaluate on)")
    zero_shot = (
        evaluate.ZeroShotRequest(dataset, data, target, model, out, name, adapter) if model is not None else None
    )
    settings = evaluate.EvalSettings(
        engine=EngineSettings(
            engine,
            batch_size=batch_size,
            vllm_python=vllm_python,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            base_url=base_url,
            api_key_env=api_key_env,
        ),
        modes=_csv(modes),
        splits=_csv(splits),
        direct_tokens=direct_tokens,
        reasoning_tokens=max_new_tokens,
        force=force,
        progress=progress,
        selection=selection,
    )
    evaluate.evaluate_command(run, zero_shot, settings)


@app.command()
def report(
    runs: Path = typer.Argument(Path("runs/train"), help="Folder holding run folders with eval/metrics.json."),
    out: Path = typer.Option(Path("runs/report"), help="Writes results.md, results.png and results.json here."),
) -> None:
    """The results table in the paper's format (beside the paper's numbers), a bar plot and a JSON."""
    from domainbed_reasoning.train.evaluation.report import report_command

    report_command(runs, out)


@app.command()
def sweep(
    datasets: list[str] = typer.Argument(
        None, help="Datasets, e.g. PACS VLCS OfficeHome TerraIncognita (none with --status: the sweep in --out)."
    ),
    model: str = typer.Option("", help="Base MLLM of every trial: a checkpoint folder or a Hub id."),
    methods: str = typer.Option("cls,reasoning,mtct,rd-mldg", help="Methods to train, comma-separated."),
    seeds: str = typer.Option("0,1,2", help="Trials: one run per seed, e.g. 0,1,2."),
    targets: str | None = typer.Option(None, help="Held-out domains (default: every domain of each dataset)."),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="Also evaluate the base model as is."),
    zero_shot_remote: tuple[str, str] | None = typer.Option(
        None, "--zero-shot-remote", metavar="URL MODEL", help="Also evaluate MODEL behind an OpenAI-compatible URL."
    ),
    api_key_env: str | None = typer.Option(None, help="--zero-shot-remote: environment variable with the API key."),
    data: TrainingData = "domainbed-reasoning",
    out: Path = typer.Option(Path("runs/sweep"), help="The sweep folder: every run, log, record and job id."),
    config: Path | None = typer.Option(None, help="YAML training settings (default: the paper's)."),
    set_: list[str] = typer.Option([], "--set", help="Override a training setting, KEY=VALUE; repeatable."),
    engine: str | None = typer.Option(None, help="Generation engine for SARR and evaluation: transformers or vllm."),
    direct_tokens: int = typer.Option(32, help="Evaluation: token limit of a direct answer."),
    max_new_tokens: int = typer.Option(1024, help="Evaluation: token limit of a reasoning answer."),
    launcher: str = typer.Option("local", help="local (one after another), local-gpus (one per GPU) or slurm."),
    partition: str | None = typer.Option(None, help="slurm: partition."),
    gpus_per_job: int = typer.Option(1, help="slurm: GPUs per trial (training runs one process per GPU)."),
    time: str = typer.Option("24:00:00", help="slurm: time limit per trial, minutes or [D-]HH:MM:SS."),
    account: str | None = typer.Option(None, help="slurm: account to charge."),
    slurm: list[str] = typer.Option([], "--slurm", help="slurm: any other submitit Slurm parameter, KEY=VALUE."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (runs, folders, state, GPU-hours); start nothing."),
    status: bool = typer.Option(False, "--status", help="Print each trial's state and Slurm job; start nothing."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run or --status: print the plan as JSON."),
) -> None:
    """Every (dataset, held-out domain, method, seed) run and zero-shot row of the paper's tables; resumable."""
    from domainbed_reasoning.train.sweep.launchers import SlurmOptions
    from domainbed_reasoning.train.sweep.plan import RemoteModel, SweepSpec, parse_seeds
    from domainbed_reasoning.train.sweep.sweep import LaunchOptions, sweep_command

    remote = RemoteModel(*zero_shot_remote, api_key_env) if zero_shot_remote else None
    spec = None
    if datasets:
        spec = SweepSpec(
            datasets=tuple(datasets), model=model, out=out, methods=_csv(methods) or (),
            seeds=parse_seeds(seeds), data=data, targets=_csv(targets), config=config,
            overrides=tuple(set_), zero_shot=zero_shot, remote=remote, engine=engine,
            direct_tokens=direct_tokens, reasoning_tokens=max_new_tokens,
        )  # fmt: skip
    slurm_options = SlurmOptions(partition, gpus_per_job, time, account, tuple(slurm))
    action = "status" if status else "dry-run" if dry_run else "run"
    sweep_command(spec, out, LaunchOptions(launcher, slurm_options), action, as_json)


@app.command()
def demo(
    data_dir: Path = typer.Option(Path("data"), help="Where SynthDG is drawn."),
    runs: Path = typer.Option(Path("runs"), help="Every artefact goes below this folder."),
    small: bool = typer.Option(False, help="A few images and one short epoch: checks the pipeline, learns nothing."),
    target: str = typer.Option("cartoon", help="SynthDG domain held out for testing."),
) -> None:
    """The whole RD-MLDG pipeline on SynthDG, offline on a CPU: chains, export, 4 trainings, eval, report."""
    from domainbed_reasoning.offline.demo import FULL, SMALL, DemoConfig, run_demo

    run_demo(DemoConfig(data_dir, runs, SMALL if small else FULL, target))


def main() -> None:
    try:
        app()
    except UserError as err:
        err_console.print(f"[bold red]error:[/] {err}", soft_wrap=True, highlight=False)
        sys.exit(2)

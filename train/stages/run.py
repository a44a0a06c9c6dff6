"""`dbr train`: validate, train the method's stages, then evaluate the final weights.

cls, reasoning and mtct are one stage (stage.py); rd-mldg is MTCT followed by SARR
rounds (sarr.py), each round a stage of its own. Under `accelerate launch` every
process runs this same code: training is data-parallel, self-labelling and
evaluation are split between the processes (sharding.py).
"""

from __future__ import annotations

from domainbed_reasoning.train.engines.factory import engine_context
from domainbed_reasoning.train.engines.settings import EngineSettings
from domainbed_reasoning.train.evaluation.evaluate import (
    EvalSettings,
    budget_asks,
    default_modes,
    evaluate_run,
    print_metrics,
)
from domainbed_reasoning.train.mtct.mtct_data import task_prompt
from domainbed_reasoning.train.mtct.token_budget import check_budget
from domainbed_reasoning.train.sarr.sarr import train_sarr
from domainbed_reasoning.train.sarr.sharding import process_state
from domainbed_reasoning.train.stages.memory_estimate import check_training_memory
from domainbed_reasoning.train.stages.stage import (
    StageResult,
    TrainRequest,
    model_card,
    prepare,
    stage_result,
    train_stage,
    write_inputs,
)
from transformers import ProcessorMixin

from domainbed_reasoning import artefacts
from domainbed_reasoning.data.registry import get_spec
from domainbed_reasoning.terminal import console


def train(request: TrainRequest, evaluate: bool = False) -> StageResult:
    """Validate, then train one stage; a finished run with --resume is returned as is.

    `evaluate` says an evaluation follows, so its requests are checked against the engine's
    context now, with SARR's, rather than after training.
    """
    state = process_state(request.config.distributed_timeout_s)
    prepared = prepare(request)
    run_dir = prepared.run_dir
    if request.resume and artefacts.metrics_path(run_dir).is_file():
        return stage_result(run_dir, request.model)
    check_generation_budget(request, prepared.processor, evaluate)
    check_training_memory(request, prepared)
    if request.config.method == "rd-mldg":
        return train_sarr(request, prepared)
    if state.is_main_process:
        write_inputs(request, prepared)
    train_stage(
        request.model,
        prepared.processor,
        prepared.train_examples,
        prepared.eval_examples,
        request.config,
        run_dir,
        card=model_card(request, prepared),
    )
    return stage_result(run_dir, request.model)


def check_generation_budget(
    request: TrainRequest, processor: ProcessorMixin, evaluate: bool
) -> None:
    """SARR's and the final evaluation's longest requests fit the engine, checked before training."""
    config = request.config
    context = engine_context(EngineSettings(config.engine).filled_from(config), request.model)
    if context is None:
        return
    classes = get_spec(request.dataset).classes
    asks = []
    if config.method == "rd-mldg":
        prompt = task_prompt("reasoning", classes)
        asks.append(("SARR self-labelling", prompt, config.self_label_max_new_tokens))
    if evaluate:
        asks += budget_asks(default_modes(config.method), classes, EvalSettings())
    longer = (
        f"--set vllm_max_model_len={2 * context} (now {context})"
        if config.engine == "vllm"
        else "a model with a longer context"
    )
    fix = f"use {longer}, or lower self_label_max_new_tokens or image_max_tiles / image_max_pixels"
    for what, prompt, new_tokens in asks:
        check_budget(processor, prompt, new_tokens, context, f"{what} with the {config.engine} engine", fix)


def train_and_evaluate(request: TrainRequest, evaluate: bool = True) -> StageResult:
    """`dbr train`: train, then evaluate the final weights on the held-out domain and validation.

    With --resume, a run whose training and evaluation both finished is left as it is, so
    re-running a series of runs skips those done and continues the others.
    """
    result = train(request, evaluate)
    state = process_state()
    if state.is_main_process:
        console.print(
            f"[green]trained weights[/]: {result.weights.folder}  (logs: {artefacts.logs_dir(result.run_dir)})",
            highlight=False,
        )
    if not evaluate:
        return result
    finished = artefacts.metrics_path(artefacts.eval_dir(result.run_dir))
    if request.resume and finished.is_file():
        if state.is_main_process:
            console.print(f"[green]evaluation[/]: {finished} (finished before)", highlight=False)
        return result
    config = request.config
    settings = EvalSettings(engine=EngineSettings.for_run(config), progress=True)
    metrics = evaluate_run(result.run_dir, settings)
    if state.is_main_process:
        print_metrics(metrics)
        console.print(
            f"[green]evaluation[/]: {artefacts.metrics_path(artefacts.eval_dir(result.run_dir))}", highlight=False
        )
    return result

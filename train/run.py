"""`dbr train`: validate, train the method's stages, then evaluate the final weights.

cls, reasoning and mtct are one stage (stage.py); rd-mldg is MTCT followed by SARR
rounds (sarr.py), each round a stage of its own.
"""

from __future__ import annotations

from accelerate import PartialState

from domainbed_reasoning.terminal import console
from train.evaluation.evaluate import EvalSettings, evaluate_run, print_metrics
from train.sarr import train_sarr
from train.stage import (
    StageResult,
    TrainRequest,
    model_card,
    prepare,
    stage_result,
    train_stage,
    write_inputs,
)


def train(request: TrainRequest) -> StageResult:
    """Validate, then train one stage; a finished run with --resume is returned as is."""
    prepared = prepare(request)
    run_dir = prepared.run_dir
    if request.resume and (run_dir / "metrics.json").is_file():
        return stage_result(run_dir, request.model)
    if request.config.method == "rd-mldg":
        return train_sarr(request, prepared)
    state = PartialState()
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


def train_and_evaluate(request: TrainRequest, evaluate: bool = True) -> StageResult:
    """`dbr train`: train, then evaluate the final weights on the held-out domain and validation."""
    result = train(request)
    console.print(
        f"[green]trained weights[/]: {result.weights.folder}  (logs: {result.run_dir / 'logs'})",
        highlight=False,
    )
    if not evaluate:
        return result
    state = PartialState()
    if state.num_processes > 1:
        if state.is_main_process:
            console.print(f"evaluate with one process: `dbr eval --run {result.run_dir}`", highlight=False)
        return result
    metrics = evaluate_run(result.run_dir, EvalSettings(engine=request.config.engine, progress=True))
    print_metrics(metrics)
    console.print(f"[green]evaluation[/]: {result.run_dir / 'eval' / 'metrics.json'}", highlight=False)
    return result

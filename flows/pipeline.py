"""The pipeline flow: dvc.yaml's stages as Prefect tasks, each `dvc repro <stage>`, in the order `dvc dag` gives.

    python -m flows.pipeline                               # in this checkout (a temporary Prefect server)
    python -m flows.pipeline -S lora.rank=4 --name rank4   # one `dvc exp run --temp` task: a DVC experiment
    python -m flows.pipeline --training gpu-pool           # the run on the gpu work pool (flows/gpu.py)

A run with overrides runs in DVC's own temporary workspace (`--temp`), so neither this checkout nor a run beside it
is touched; `dvc exp show` lists it and `dvc exp apply` brings it here. Values are checked before anything runs.
"""
# ruff: noqa: E402  (Prefect's home is set before Prefect loads)
from flows.dvc import use_project_prefect_home

if __name__ == "__main__":
    use_project_prefect_home()

import json
import uuid
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.dvc import (CommandFailed, CommandLine, check_names, dvc, experiment_metrics, how_ran, require_prefect_api,
                       set_params, stage_order)
from flows.gpu import TRAINING_MODES, gpu_pool_unavailable, run_on_gpu_pool
from lora_mnist.cli import one_line_errors
from lora_mnist.params import load_raw, parse_overrides, with_overrides
from lora_mnist.paths import EVALUATE_METRICS, FINETUNE_METRICS


@task(task_run_name="{stage}", retries=1, retry_delay_seconds=5)  # a network source can hiccup in download
def repro(stage: str, options: tuple[str, ...] = ()) -> dict[str, str]:
    """`dvc repro [OPTIONS] STAGE` (a stage of dvc.yaml, or file:stage), and how it ran."""
    return {"stage": stage, "ran": how_ran(dvc("repro", *options, stage), stage)}


@task(task_run_name="dvc exp run --temp -n {name}")
def exp_run(name: str, overrides: dict[str, Any], stages: list[str]) -> list[dict[str, str]]:
    output = dvc("exp", "run", "--temp", "dvc.yaml", "-n", name, *set_params(overrides))
    return [{"stage": stage, "ran": how_ran(output, stage)} for stage in stages]


def check_run(overrides: dict[str, Any] | None, training: Any, experiment_name: Any) -> str | None:
    """Refuse, before anything runs, a bad training mode, override or name; returns the experiment's name."""
    if training not in TRAINING_MODES:
        raise ValueError(f"training={training!r} is invalid: one of {', '.join(map(repr, TRAINING_MODES))} is allowed")
    if not overrides:
        if experiment_name is not None:
            raise ValueError(f"experiment_name={experiment_name!r} is given without overrides: only a run with "
                             "overrides is saved as an experiment (add -S key=value)")
        return None
    with_overrides(load_raw(), overrides)  # a ParamsError names the bad value
    return check_names([experiment_name or f"prefect-{uuid.uuid4().hex[:8]}"])[0]


def why_training_stays_here(training: str) -> str | None:
    """Why training runs in this process, or None when it goes to the gpu pool; refuses 'gpu-pool' that cannot."""
    unavailable = gpu_pool_unavailable() if training != "local" else "training='local'"
    if training == "gpu-pool" and unavailable:
        raise ValueError(f"training='gpu-pool' is not possible: {unavailable}")
    return unavailable


@flow(name="lora-mnist-pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, training: str = "auto",
             experiment_name: str | None = None) -> dict[str, Any]:
    """dvc.yaml's stages, or with ``overrides`` ({"lora.rank": 4}, as `dvc exp run -S`) one DVC experiment; training
    is "auto" (the gpu pool when it is deployed and a DVC remote is set), "local" or "gpu-pool"."""
    name = check_run(overrides, training, experiment_name)
    unavailable = why_training_stays_here(training)
    stages = stage_order()
    if not unavailable:
        name = name or f"prefect-{uuid.uuid4().hex[:8]}"
        metrics, changed = run_on_gpu_pool(overrides or {}, name, apply=not overrides)
        runs = [{"stage": stage, "ran": "gpu pool" if stage in changed else "skipped"} for stage in stages]
    elif name:
        print(f"training runs in this process: {unavailable}")
        runs = exp_run(name, overrides, stages)
        metrics = experiment_metrics([name])[name]
    else:
        print(f"training runs in this process: {unavailable}")
        runs = [repro(stage) for stage in stages]
        metrics = {str(path): json.loads(path.read_text()) for path in (EVALUATE_METRICS, FINETUNE_METRICS)}
    publish(metrics, runs, name)
    return {"stages": runs, "experiment": name if overrides else None, "metrics": metrics[str(EVALUATE_METRICS)]}


def publish(metrics: dict[str, Any], runs: list[dict[str, str]], experiment: str | None) -> None:
    """The per-digit errors as a table artifact and the integrity verdict with the run's stages as Markdown."""
    evaluation, finetune = metrics[str(EVALUATE_METRICS)], metrics[str(FINETUNE_METRICS)]
    create_table_artifact(key="per-digit-errors", description="Test errors per digit, base and LoRA on", table=[
        {"digit": f"{d} (fine-tuned)" if d == evaluation["digit"] else str(d),
         "base": evaluation["base"]["errors_per_digit"][str(d)], "lora_on": evaluation["lora_on"]["errors_per_digit"][str(d)]}
        for d in range(10)])
    integrity = evaluation["integrity"]
    passed = integrity["base_weights_unchanged"] and integrity["lora_off_bit_identical"]
    where = f"DVC experiment `{experiment}` (`dvc exp apply {experiment}`)" if experiment else "this checkout (dvc.lock)"
    create_markdown_artifact(key="lora-run-summary", description="Integrity verdict, accuracy and the stages", markdown="\n".join([
        f"## Integrity check: {'passed' if passed else 'FAILED'}",
        f"- accuracy {evaluation['base']['accuracy']:.4f} → {evaluation['lora_on']['accuracy']:.4f} with LoRA on; "
        f"McNemar p = {evaluation['mcnemar_on_vs_off']['p_value']:.3g}",
        f"- trainable parameters: {finetune['trainable_parameters']:,} ({finetune['trainable_percent']}%)",
        f"- outputs in {where}", "## Stages", *(f"- {run['stage']}: {run['ran']}" for run in runs)]))


def main() -> None:
    parser = CommandLine(prog="python -m flows.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--training", choices=TRAINING_MODES, default="auto")
    parser.add_argument("--name", help="the experiment's name when params are overridden")
    args = parser.parse_args()
    with one_line_errors(CommandFailed, ValueError):
        overrides = parse_overrides(args.overrides)
        name = check_run(overrides, args.training, args.name)  # refused before a temporary Prefect server starts
        require_prefect_api()
        if args.training == "gpu-pool":
            why_training_stays_here(args.training)  # refused before a temporary Prefect server starts
        result = pipeline(overrides=overrides, training=args.training, experiment_name=name)
    for run in result["stages"]:
        print(f"{run['stage']}: {run['ran']}")
    if result["experiment"]:
        print(f"saved as DVC experiment {result['experiment']}")


if __name__ == "__main__":
    main()

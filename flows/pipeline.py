"""The pipeline flow: download → pretrain → analyze → finetune → evaluate, each a Prefect task that runs
its DVC stage, so outputs are versioned exactly as by `dvc repro`.

    python -m flows.pipeline                       # temporary local Prefect server, all stages in-process
    python -m flows.pipeline -S lora.rank=4        # in a workspace of its own, saved as a DVC experiment

With a Prefect server configured, the `lora-mnist-train/gpu` deployment and a DVC remote, the training
stages run on the `gpu` work pool's workers instead (`training="auto"`), handed over as flows/handoff.py says.
"""
from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed, State

from flows.dvc_stage import (
    SAVE_LOCK_FILE,
    STAGES,
    TRAINING_STAGES,
    StageFailed,
    apply_overrides,
    checkout_lock,
    dvc,
    experiment_exists,
    experiment_workspace,
    git,
    has_default_remote,
    is_up_to_date,
    one_line_errors,
    reproduce,
    save_experiment,
    validate_experiment_name,
    validate_overrides,
)
from flows.handoff import accept_lock_entry, read_lock_entry, uncommitted_code, upstream_entries
from tasks.params import PARAMS_FILE, load_params, parse_overrides, to_mapping
from tasks.paths import ADAPTER_DIR, BASE_WEIGHTS, EVALUATE_METRICS, FINETUNE_METRICS

TRAIN_DEPLOYMENT = "lora-mnist-train/gpu"
TRAINING_MODES = ("auto", "local", "gpu-pool")


def check_training(training: Any) -> None:
    if training not in TRAINING_MODES:
        raise ValueError(f"training={training!r} is invalid: 'auto', 'local' or 'gpu-pool' is allowed")


def skipped_if_up_to_date(stage: str, root: Path) -> State | None:
    """A `Skipped` state (of type Completed) when DVC finds ``stage`` up to date, else None."""
    if not is_up_to_date(stage, root):
        return None
    get_run_logger().info(f"{stage}: up to date in dvc.lock, skipped")
    return Completed(name="Skipped", message=f"dvc: {stage} is up to date", data={"stage": stage, "ran": "skipped"})


@task(task_run_name="{stage}")
def dvc_stage(stage: str, root: Path) -> Any:
    """Run one DVC stage in ``root``; a stage DVC finds up to date is reported as Skipped and not re-run."""
    if skipped := skipped_if_up_to_date(stage, root):
        return skipped
    reproduce(stage, get_run_logger().info, root)
    return {"stage": stage, "ran": "here"}


@task(task_run_name="{stage} on the gpu pool")
def gpu_pool_stage(stage: str, root: Path) -> Any:
    """Hand one training stage to the `gpu` work pool: this commit, these params and the inputs' dvc.lock entries
    go as flow parameters, the inputs through `dvc push`; the stage's dvc.lock entry comes back as a JSON
    artifact of the flow run, and its outputs through `dvc fetch` and `dvc checkout`."""
    from prefect.deployments import run_deployment

    if skipped := skipped_if_up_to_date(stage, root):
        return skipped
    upstream = upstream_entries(stage, root)
    dvc("push", *(name for name in upstream if name != "check_params"), cwd=root)
    request = {"stage": stage, "commit": git("rev-parse", "HEAD", cwd=root).stdout.strip(),
               "params": to_mapping(load_params(root / PARAMS_FILE)), "upstream": upstream}
    run = run_deployment(TRAIN_DEPLOYMENT, parameters=request)
    if not run.state.is_completed():
        raise StageFailed(f"{stage} on the gpu pool ended {run.state.name}: {run.state.message}")
    accept_lock_entry(stage, read_lock_entry(run.id), root)
    if not is_up_to_date(stage, root):
        raise StageFailed(f"{stage} came back from the gpu pool but DVC does not find it up to date here")
    return {"stage": stage, "ran": f"gpu pool (flow run {run.name})"}


def gpu_pool_unavailable(root: Path) -> str | None:
    """Why the training stages cannot go to the gpu pool from ``root``, or None when they can: a real server
    knows the training deployment and has a worker online in its pool, DVC has a default remote to carry the
    files, and the training stages' code is HEAD's (the worker trains HEAD)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        return "no Prefect server is configured (PREFECT_API_URL)"
    if not has_default_remote(root):
        return "DVC has no default remote to carry the files (dvc remote add -d)"
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_deployment_by_name(TRAIN_DEPLOYMENT).work_pool_name
        except ObjectNotFound:
            return f"the server has no {TRAIN_DEPLOYMENT} deployment (prefect deploy --all)"
        if not pool:
            return f"the {TRAIN_DEPLOYMENT} deployment has no work pool"
        if not any(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool)):
            return f"no worker of the {pool} work pool is online"
    if changed := uncommitted_code(TRAINING_STAGES, root):
        return f"the training code differs from HEAD, which the gpu worker trains: {', '.join(changed)} (commit it)"
    return None


def publish_artifacts(stage_runs: list[dict[str, str]], root: Path, experiment: str | None) -> None:
    evaluation = json.loads((root / EVALUATE_METRICS).read_text())
    finetune = json.loads((root / FINETUNE_METRICS).read_text())
    digit = evaluation["digit"]
    create_table_artifact(
        key="per-digit-errors",
        table=[
            {
                "digit": f"{d} (fine-tuned)" if d == digit else str(d),
                "base": evaluation["base"]["errors_per_digit"][str(d)],
                "lora_on": evaluation["lora_on"]["errors_per_digit"][str(d)],
                "lora_off": evaluation["lora_off"]["errors_per_digit"][str(d)],
            }
            for d in range(10)
        ],
        description=f"Test errors per digit; accuracy base {evaluation['base']['accuracy']:.4f}, "
        f"LoRA on {evaluation['lora_on']['accuracy']:.4f}, LoRA off {evaluation['lora_off']['accuracy']:.4f}",
    )
    integrity = evaluation["integrity"]
    verdict = "passed" if integrity["base_weights_unchanged"] and integrity["lora_off_bit_identical"] else "FAILED"
    create_markdown_artifact(
        key="lora-run-summary",
        markdown="\n".join([
            f"## Integrity check: {verdict}",
            f"- base weights unchanged by fine-tuning: {integrity['base_weights_unchanged']} "
            f"(sha256 `{integrity['base_weights_sha256']}`)",
            f"- LoRA-off logits bit-identical to the base model's: {integrity['lora_off_bit_identical']}",
            "## Adapter",
            f"- digit {digit}: errors {evaluation['digit_errors']['base']} → {evaluation['digit_errors']['lora_on']}",
            f"- trainable parameters: {finetune['trainable_parameters']:,} "
            f"({finetune['trainable_percent']}% of {finetune['base_parameters']:,})",
            "## Outputs (versioned by DVC, see dvc.lock)",
            *([f"- in DVC experiment `{experiment}`: `dvc exp apply {experiment}` brings them into the checkout"]
              if experiment else [f"- base weights: `{root / BASE_WEIGHTS}`", f"- adapter: `{root / ADAPTER_DIR}`"]),
            "## Stages",
            *[f"- {run['stage']}: {run['ran']}" for run in stage_runs],
        ]),
        description="Integrity verdict, adapter size and where the outputs are",
    )


@flow(name="lora-mnist-pipeline", log_prints=True)
def pipeline(
    overrides: dict[str, Any] | None = None,
    training: str = "auto",
    experiment_name: str | None = None,
) -> dict[str, Any]:
    """Run check_params and the five stages in DAG order.

    overrides: dotted params.yaml keys, as `dvc exp run -S` takes them ({"lora.rank": 4}). A run with overrides
        has a workspace of its own (this checkout's params.yaml stays as it is) and is saved as a DVC experiment
        (`dvc exp show` lists it, `dvc exp apply` brings it here).
    training: "auto" (gpu pool when available), "local" or "gpu-pool".
    """
    name = check_run(overrides, training, experiment_name)
    if name is None:
        with checkout_lock():
            return run_stages(Path.cwd().resolve(), training, experiment=None)
    with experiment_workspace(name) as root:
        apply_overrides(overrides, root / PARAMS_FILE)
        result = run_stages(root, training, experiment=name)
        with checkout_lock(SAVE_LOCK_FILE):
            save_experiment(name, root)
        return result


def check_run(overrides: dict[str, Any] | None, training: Any, experiment_name: Any) -> str | None:
    """Refuse, before anything runs, a bad training mode, override or experiment name; returns the name the run
    with overrides is saved as (None for a run in the checkout)."""
    check_training(training)
    if not overrides:
        if experiment_name is not None:
            raise ValueError(f"experiment_name={experiment_name!r} is given without overrides: only a run with "
                             "overrides is saved as an experiment (add -S key=value)")
        return None
    validate_overrides(overrides)
    name = validate_experiment_name(experiment_name or f"prefect-{uuid.uuid4().hex[:8]}")
    if experiment_exists(name):
        raise ValueError(f"experiment name {name!r} is taken by an experiment of HEAD: choose another, or "
                         f"`dvc exp remove {name}` first")
    return name


def run_stages(root: Path, training: str, experiment: str | None) -> dict[str, Any]:
    """The stages in ``root``, in DAG order, then the artifacts; returns what ran, the experiment the run is
    saved as (saved by the caller) and the evaluation."""
    unavailable = gpu_pool_unavailable(root) if training != "local" else "training='local'"
    if training == "gpu-pool" and unavailable:
        raise StageFailed(f"training='gpu-pool' is not possible: {unavailable}")
    on_gpu_pool = not unavailable
    get_run_logger().info("training stages run on the gpu work pool" if on_gpu_pool
                          else f"training stages run in this process: {unavailable}")
    stage_runs = []
    for stage in STAGES:
        if stage in TRAINING_STAGES and on_gpu_pool:
            runner = gpu_pool_stage
        elif stage == "download":
            runner = dvc_stage.with_options(retries=2, retry_delay_seconds=5)  # network sources can hiccup
        else:
            runner = dvc_stage
        # return_state: a "Skipped" state carries its result as data; .result() raises a stage's failure.
        stage_runs.append(runner(stage, root, return_state=True).result())
    publish_artifacts(stage_runs, root, experiment)
    return {"stages": stage_runs, "experiment": experiment, "metrics": json.loads((root / EVALUATE_METRICS).read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description="Run the LoRA-MNIST pipeline as a Prefect flow.")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--training", choices=TRAINING_MODES, default="auto")
    parser.add_argument("--name", help="experiment name when params are overridden")
    args = parser.parse_args()
    with one_line_errors():
        overrides = parse_overrides(args.overrides)
        name = check_run(overrides, args.training, args.name)  # refused before a temporary Prefect server starts
        result = pipeline(overrides=overrides, training=args.training, experiment_name=name)
    for run in result["stages"]:
        print(f"{run['stage']}: {run['ran']}")
    if result["experiment"]:
        print(f"saved as DVC experiment {result['experiment']}")


if __name__ == "__main__":
    main()

"""The sweep flow: a grid of params overrides fanned out as concurrent DVC experiments.

Each grid point is a Prefect task running `dvc exp run --temp -S …` in its own temporary workspace, so
points run side by side; pretrain is restored from DVC's run cache instead of re-run when only LoRA or
fine-tuning params change. `dvc exp show` lists the results; a table artifact summarises them.

    python -m flows.sweep -S lora.rank=1,2,4,8 -S lora.alpha=1,4 --parallel 2
"""
from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dvc_stage import dvc, one_line_errors, set_param_args, validate_overrides

SUMMARY_COLUMNS = {
    "digit": "digit",
    "digit_errors.base": "digit errors (base)",
    "digit_errors.lora_on": "digit errors (LoRA on)",
    "base.accuracy": "accuracy (base)",
    "lora_on.accuracy": "accuracy (LoRA on)",
    "trainable_parameters": "trainable parameters",
}


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def experiment_name(prefix: str, overrides: dict[str, Any]) -> str:
    parts = [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in overrides.items()]
    return "-".join([prefix, *parts]).replace(".", "_")


@task(task_run_name="{name}")
def run_experiment(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    started = time.time()
    dvc("exp", "run", "--temp", "--name", name, *set_param_args(overrides))
    return {"name": name, "overrides": overrides, "started": started, "finished": time.time()}


@flow(name="lora-mnist-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def sweep(grid: dict[str, list[Any]], prefix: str = "sweep") -> list[dict[str, Any]]:
    """Run every combination of ``grid`` ({"lora.rank": [1, 2, 4]}) as a DVC experiment, concurrently."""
    points = grid_points(grid)
    for overrides in points:
        validate_overrides(overrides)  # every point is checked before any runs
    futures = [run_experiment.submit(experiment_name(prefix, o), o) for o in points]
    runs = [future.result() for future in futures]
    publish_summary(runs, list(grid))
    return runs


def publish_summary(runs: list[dict[str, Any]], keys: list[str]) -> None:
    import dvc.api

    by_name = {row["Experiment"]: row for row in dvc.api.exp_show() if row.get("Experiment")}
    table = []
    for run in runs:
        row = by_name.get(run["name"], {})
        table.append({"experiment": run["name"], **{k: row.get(k) for k in keys},
                      **{label: row.get(column) for column, label in SUMMARY_COLUMNS.items()}})
    create_table_artifact(key="sweep-results", table=table, description="One row per DVC experiment of the sweep")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a grid of LoRA-MNIST experiments concurrently.")
    parser.add_argument("-S", "--set-param", dest="grid", action="append", required=True, metavar="KEY=V1,V2,…")
    parser.add_argument("--parallel", type=int, default=2, help="experiments at a time (default 2)")
    parser.add_argument("--prefix", default="sweep")
    args = parser.parse_args()
    grid = {}
    for item in args.grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"error: -S {item!r} is invalid: key=value1,value2 is allowed")
        grid[key] = [yaml.safe_load(v) for v in values.split(",")]
    with one_line_errors():
        runs = sweep.with_options(task_runner=ThreadPoolTaskRunner(max_workers=args.parallel))(grid=grid, prefix=args.prefix)
    print("\n".join(run["name"] for run in runs))
    print("compare them with: dvc exp show")


if __name__ == "__main__":
    main()

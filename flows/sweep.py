"""The sweep flow: a thin Prefect wrapper around DVC's own experiment queue.

Every point of the grid is queued with `dvc exp run --queue --name … -S key=value` (each point checked
first), then `dvc exp run --run-all --jobs N` runs the queue, each point in its own temporary workspace;
pretrain comes from DVC's run cache when only LoRA or fine-tuning params change. The flow ends with a
table of the points' results, printed and published as an artifact. Without Prefect, the same is:

    dvc exp run --queue -S lora.rank=1,2,4 && dvc exp run --run-all --jobs 2 && dvc exp show

    python -m flows.sweep -S lora.rank=1,2,4,8 -S lora.alpha=1,4 --jobs 2
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows.dvc_stage import (
    SNAPSHOT_LOCK_FILE,
    StageFailed,
    checkout_lock,
    dvc,
    one_line_errors,
    set_param_args,
    validate_experiment_name,
    validate_overrides,
)
from tasks.params import ParamsError, read_yaml

RESULT_COLUMNS = {
    "metrics/evaluate.json:digit": "digit",
    "metrics/evaluate.json:digit_errors.base": "digit errors, base",
    "metrics/evaluate.json:digit_errors.lora_on": "digit errors, LoRA on",
    "metrics/evaluate.json:lora_on.accuracy": "accuracy, LoRA on",
}


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def experiment_name(prefix: str, overrides: dict[str, Any]) -> str:
    """``prefix-rank4-alpha1``: a name git takes as a ref ('.' and ':' in values become '_')."""
    parts = [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9_-]", "_", "-".join([prefix, *parts]))


def check_grid(grid: Any, jobs: Any) -> None:
    """Refuse, before anything is queued, a grid with no points or a repeated value, and a jobs count below 1."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is invalid: an integer >= 1 is allowed")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid={grid!r} is invalid: a mapping of params.yaml keys to lists of values is allowed")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid[{key!r}]={values!r} is invalid: a non-empty list of values is allowed")
        if len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
            raise ValueError(f"grid[{key!r}]={values!r} repeats a value: each point runs once")


@task
def queue_points(points: list[dict[str, Any]], prefix: str) -> list[str]:
    """Queue every point, or none: a point DVC refuses (a name taken, say) takes the ones queued before it out again."""
    names = [validate_experiment_name(experiment_name(prefix, overrides)) for overrides in points]
    if len(set(names)) < len(names):
        raise ValueError(f"the grid's points share experiment names {sorted({n for n in names if names.count(n) > 1})}")
    queued = []
    try:
        for name, overrides in zip(names, points):
            dvc("exp", "run", "--queue", "--name", name, *set_param_args(overrides))
            queued.append(name)
    except StageFailed:
        if queued:
            dvc("queue", "remove", *queued, check=False)
        raise
    return names


@task
def run_queue(jobs: int) -> None:
    dvc("exp", "run", "--run-all", "--jobs", str(jobs))  # exits 0 even when a point fails: results_table tells


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # exp_show gives every number as float


def results_table(names: list[str], keys: list[str]) -> list[dict[str, Any]]:
    """One row per experiment that ran to the end: its params and headline metrics, from `dvc exp show`."""
    import dvc.api

    # A failed run leaves a row (State "Failed") and no experiment; a finished one has no State or "Success".
    shown = {row.get("Experiment"): row for row in dvc.api.exp_show() if row.get("State") in (None, "Success")}
    rows = []
    for name in (name for name in names if name in shown):
        row = shown[name]
        rows.append({"experiment": name, **{key: _plain(row.get(key)) for key in keys},
                     **{label: _plain(row.get(column, row.get(column.split(":", 1)[1])))
                        for column, label in RESULT_COLUMNS.items()}})
    return rows


@flow(name="lora-mnist-sweep", log_prints=True)
def sweep(grid: dict[str, list[Any]], prefix: str = "sweep", jobs: int = 2) -> list[dict[str, Any]]:
    """Every combination of ``grid`` ({"lora.rank": [1, 2, 4]}) as a DVC experiment; returns their results.
    Fails, naming them, when any point did not finish (`dvc queue logs <name>` says why)."""
    check_grid(grid, jobs)
    points = grid_points(grid)
    for overrides in points:
        validate_overrides(overrides)  # every point is checked before any is queued
    with checkout_lock():  # `--run-all` holds DVC's repo lock: a run without overrides waits for the sweep
        with checkout_lock(SNAPSHOT_LOCK_FILE):  # queueing rewrites params.yaml for a moment: workspaces wait
            names = queue_points(points, prefix)
        run_queue(jobs)
    table = results_table(names, list(grid))
    create_table_artifact(key="sweep-results", table=table, description="One row per DVC experiment of the sweep")
    finished = {row["experiment"] for row in table}
    if failed := [name for name in names if name not in finished]:
        raise StageFailed(f"sweep points {failed} did not finish; `dvc queue logs <name>` shows why")
    return table


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else []
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ParamsError(f"-S {item!r} is invalid: key=value1,value2 is allowed")
        if key in grid:
            raise ParamsError(f"-S {key} is given twice: one -S per key is allowed")
        grid[key] = [read_yaml(v, f"-S {item!r}") for v in values.split(",")]
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a grid of LoRA-MNIST experiments through DVC's queue.")
    parser.add_argument("-S", "--set-param", dest="grid", action="append", required=True, metavar="KEY=V1,V2,…")
    parser.add_argument("--jobs", type=int, default=2, help="experiments at a time (default 2)")
    parser.add_argument("--prefix", default="sweep")
    args = parser.parse_args()
    with one_line_errors():
        table = sweep(grid=parse_grid(args.grid), prefix=args.prefix, jobs=args.jobs)
    print(format_table(table))


if __name__ == "__main__":
    main()

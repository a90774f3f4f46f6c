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
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact

from flows.dvc_stage import dvc, one_line_errors, set_param_args, validate_overrides
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
    parts = [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in overrides.items()]
    return "-".join([prefix, *parts]).replace(".", "_")


@task
def queue_points(points: list[dict[str, Any]], prefix: str) -> list[str]:
    names = []
    for overrides in points:
        names.append(experiment_name(prefix, overrides))
        dvc("exp", "run", "--queue", "--name", names[-1], *set_param_args(overrides))
    return names


@task
def run_queue(jobs: int) -> None:
    dvc("exp", "run", "--run-all", "--jobs", str(jobs))


def _plain(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value  # exp_show gives every number as float


def results_table(names: list[str], keys: list[str]) -> list[dict[str, Any]]:
    """One row per experiment: its params and headline metrics, from `dvc exp show`."""
    import dvc.api

    shown = {row.get("Experiment"): row for row in dvc.api.exp_show()}
    rows = []
    for name in names:
        row = shown.get(name) or {}
        rows.append({"experiment": name, **{key: _plain(row.get(key)) for key in keys},
                     **{label: _plain(row.get(column, row.get(column.split(":", 1)[1])))
                        for column, label in RESULT_COLUMNS.items()}})
    return rows


@flow(name="lora-mnist-sweep", log_prints=True)
def sweep(grid: dict[str, list[Any]], prefix: str = "sweep", jobs: int = 2) -> list[dict[str, Any]]:
    """Every combination of ``grid`` ({"lora.rank": [1, 2, 4]}) as a DVC experiment; returns their results."""
    points = grid_points(grid)
    for overrides in points:
        validate_overrides(overrides)  # every point is checked before any is queued
    names = queue_points(points, prefix)
    run_queue(jobs)
    table = results_table(names, list(grid))
    create_table_artifact(key="sweep-results", table=table, description="One row per DVC experiment of the sweep")
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

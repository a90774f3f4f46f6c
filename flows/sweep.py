"""The sweep flow: every point of a grid is a pipeline run with overrides (flows/pipeline.py), in a workspace
of its own and saved as a DVC experiment. The points are tasks of the flow, ``jobs`` at a time, so its Prefect
task runner decides where they run: a thread pool by default, or Dask through prefect-dask (the ``dask``
extra, `pip install -e '.[dask]'`):

    python -m flows.sweep -S lora.rank=1,2,4,8 -S lora.alpha=1,4 --jobs 2
    python -m flows.sweep -S lora.rank=1,2 --dask                        # a LocalCluster of --jobs workers
    python -m flows.sweep -S lora.rank=1,2 --dask tcp://127.0.0.1:8786   # a running cluster on this machine

    sweep.with_options(task_runner=DaskTaskRunner(address=...))(grid={"lora.rank": [1, 2]})

Dask workers must run on this machine, from this checkout's root (a point refuses to run elsewhere). The flow
ends with a table of the points' results, printed and published as an artifact; it fails, naming them, when a
point did not finish. Without Prefect, DVC's own queue does the same:

    dvc exp run --queue -S lora.rank=1,2,4 && dvc exp run --run-all --jobs 2 && dvc exp show
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect import Task, flow, task
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.futures import PrefectFuture, as_completed
from prefect.settings import get_current_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.dvc_stage import StageFailed, experiment_exists, one_line_errors, validate_experiment_name, validate_overrides
from flows.pipeline import TRAINING_MODES, check_training, pipeline
from tasks.params import ParamsError, parse_override

LOCAL_DASK = "local"
SCHEDULER_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d+")  # host or [IPv6], then port
PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,49}")
RESULT_COLUMNS = {  # label: the key path in metrics/evaluate.json
    "digit": ("digit",),
    "digit errors, base": ("digit_errors", "base"),
    "digit errors, LoRA on": ("digit_errors", "lora_on"),
    "accuracy, LoRA on": ("lora_on", "accuracy"),
}


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def experiment_name(prefix: str, overrides: dict[str, Any]) -> str:
    """``prefix-rank4-alpha1``: a name git takes as a ref ('.' and ':' in values become '_'; a list's items are
    joined by '_': ``targetslinear1_linear2``)."""
    parts = [re.sub(r"[^A-Za-z0-9_-]", "_", key.rsplit(".", 1)[-1] + _value_text(value)) for key, value in overrides.items()]
    return "-".join([prefix, *parts])


def _value_text(value: Any) -> str:
    return "_".join(map(str, value)) if isinstance(value, list) else str(value)


def check_grid(grid: Any, jobs: Any) -> None:
    """Refuse a grid with no points or a repeated value, and a jobs count below 1."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs={jobs!r} is invalid: an integer >= 1 is allowed")
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid={grid!r} is invalid: a mapping of params.yaml keys to lists of values is allowed")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid[{key!r}]={values!r} is invalid: a non-empty list of values is allowed")
        if len({json.dumps(v, sort_keys=True, default=repr) for v in values}) < len(values):
            raise ValueError(f"grid[{key!r}]={values!r} repeats a value: each point runs once")


def plan(grid: Any, prefix: Any, jobs: Any, training: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The grid's points and their experiment names, once everything is checked: nothing has run yet."""
    check_grid(grid, jobs)
    check_training(training)
    if not isinstance(prefix, str) or not PREFIX.fullmatch(prefix):
        raise ValueError(f"prefix={prefix!r} is invalid: up to 50 letters, digits, '_' and '-', starting with a "
                         "letter or digit, are allowed")
    points = grid_points(grid)
    for overrides in points:
        validate_overrides(overrides)
    return points, point_names(points, prefix)


def point_names(points: list[dict[str, Any]], prefix: str) -> list[str]:
    """Every point's experiment name, refused before any point runs when two share one or HEAD has one already."""
    names = [validate_experiment_name(experiment_name(prefix, overrides)) for overrides in points]
    if len(set(names)) < len(names):
        raise ValueError(f"the grid's points share experiment names {sorted({n for n in names if names.count(n) > 1})}")
    if taken := [name for name in names if experiment_exists(name)]:
        raise ValueError(f"experiment names {taken} are taken by experiments of HEAD: choose another prefix, or "
                         "`dvc exp remove` them first")
    return names


def dask_task_runner(dask: Any, jobs: int) -> TaskRunner:
    """prefect-dask's runner for ``dask``: "local" (a LocalCluster on 127.0.0.1 of ``jobs`` worker processes) or
    a running cluster's scheduler address; refused in one line when it could not work."""
    if not isinstance(dask, str) or not (dask == LOCAL_DASK or SCHEDULER_ADDRESS.fullmatch(dask)):
        raise ValueError(f"dask={dask!r} is invalid: 'local' or a scheduler address tcp://host:port is allowed")
    if importlib.util.find_spec("prefect_dask") is None:
        raise ValueError(f"dask={dask!r} needs prefect-dask, which is not installed: pip install -e '.[dask]'")
    from prefect_dask import DaskTaskRunner

    if dask == LOCAL_DASK:
        with get_client(sync_client=True) as client:  # starts the temporary server when none is configured
            api_url = str(client.api_url)  # the workers report to it; otherwise each would start its own
        return DaskTaskRunner(cluster_kwargs={"n_workers": jobs, "threads_per_worker": 1, "host": "127.0.0.1",
                                              "dashboard_address": None, "env": {"PREFECT_API_URL": api_url}})
    if not get_current_settings().api.url:
        raise ValueError(f"dask={dask!r} needs a Prefect server its workers reach (PREFECT_API_URL): a temporary "
                         "one lives in this process only")
    scheduler = urlsplit(dask)
    try:
        socket.create_connection((scheduler.hostname, scheduler.port), timeout=10).close()
    except (OSError, ValueError) as exc:
        raise ValueError(f"dask={dask!r}: no Dask scheduler answers there ({exc})") from None
    return DaskTaskRunner(address=dask)


def quiet_dask_logs() -> None:
    """Dask's own INFO lines (every worker's start-up banner) are not shown, unless DASK_LOGGING__DISTRIBUTED asks."""
    level = os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # read by each worker process as it starts
    logging.getLogger("distributed").setLevel(level.upper())


@task(task_run_name="{name}")
def run_point(overrides: dict[str, Any], name: str, checkout: str, host: str, training: str) -> dict[str, Any]:
    """One point: the pipeline flow with ``overrides``, saved as DVC experiment ``name`` in the sweep's checkout."""
    here = f"{socket.gethostname()}:{Path.cwd().resolve()}"
    if here != f"{host}:{checkout}":
        raise StageFailed(f"this worker runs in {here}, not in the sweep's checkout {host}:{checkout}: start the "
                          "Dask workers on that machine, from the checkout's root")
    return pipeline(overrides=overrides, training=training, experiment_name=name)


def result_row(name: str, overrides: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    row = {"experiment": name, **overrides}
    for label, path in RESULT_COLUMNS.items():
        value = metrics
        for key in path:
            value = value[key]
        row[label] = value
    return row


@flow(name="lora-mnist-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(),
      validate_parameters=False)  # plan() checks the parameters, coercing nothing
def sweep(grid: dict[str, list[Any]], prefix: str = "sweep", jobs: int = 2, training: str = "auto") -> list[dict[str, Any]]:
    """Every combination of ``grid`` ({"lora.rank": [1, 2, 4]}) as a DVC experiment; returns their results.

    jobs: points running at a time, on whatever task runner the flow has.
    training: as the pipeline flow takes it, for every point.
    """
    points, names = plan(grid, prefix, jobs, training)
    where = {"checkout": str(Path.cwd().resolve()), "host": socket.gethostname(), "training": training}
    futures = submit_at_most(jobs, run_point, [{"overrides": overrides, "name": name, **where}
                                               for name, overrides in zip(names, points)])
    outcomes = [outcome(future) for future in futures]  # every one waited for before the runner closes
    table = [result_row(name, overrides, outcome["metrics"]) for name, overrides, outcome in zip(names, points, outcomes)
             if not isinstance(outcome, BaseException)]
    create_table_artifact(key="sweep-results", table=table, description="One row per DVC experiment of the sweep")
    if failed := {name: outcome for name, outcome in zip(names, outcomes) if isinstance(outcome, BaseException)}:
        reasons = "; ".join(f"{name}: {error}" for name, error in failed.items())
        raise StageFailed(f"sweep points {list(failed)} did not finish: {reasons}")
    return table


def submit_at_most(jobs: int, task_: Task, calls: list[dict[str, Any]]) -> list[PrefectFuture]:
    """``task_`` submitted to the flow's task runner once per call's parameters, never ``jobs`` unfinished at once."""
    futures: list[PrefectFuture] = []
    running: list[PrefectFuture] = []
    for parameters in calls:
        if len(running) >= jobs:
            running.remove(next(as_completed(running)))  # the first to finish makes room
        futures.append(task_.submit(**parameters))
        running.append(futures[-1])
    return futures


def outcome(future: PrefectFuture) -> Any:
    """A point's result, or the exception it failed with, the task runner's own included (a Dask worker lost)."""
    try:
        return future.result(raise_on_failure=False)
    except Exception as exc:
        return exc


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else []
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``-S`` sweeps as `dvc exp run -S` reads them: ``lora.rank=1,2``, ``range(1,4)``, ``[a],[a,b]`` (two lists)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ParamsError(f"-S {item!r} is invalid: key=value1,value2 is allowed")
        key, values, _ = parse_override(item)
        if key in grid:
            raise ParamsError(f"-S {key} is given twice: one -S per key is allowed")
        grid[key] = values
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep",
                                     description="Run a grid of LoRA-MNIST experiments, each a DVC experiment.")
    parser.add_argument("-S", "--set-param", dest="grid", action="append", required=True, metavar="KEY=V1,V2,…")
    parser.add_argument("--jobs", type=int, default=2, help="points at a time (default 2)")
    parser.add_argument("--dask", nargs="?", const=LOCAL_DASK, metavar="ADDRESS",
                        help="run the points on Dask: a LocalCluster of --jobs workers, or the scheduler at ADDRESS")
    parser.add_argument("--training", choices=TRAINING_MODES, default="auto",
                        help="where training stages run, as for flows.pipeline (default auto)")
    parser.add_argument("--prefix", default="sweep", help="experiment names are PREFIX-<key><value>… (default sweep)")
    args = parser.parse_args()
    with one_line_errors():
        grid = parse_grid(args.grid)
        points, _ = plan(grid, args.prefix, args.jobs, args.training)  # refused before a temporary server starts
        workers = min(args.jobs, len(points))
        if args.dask is not None:
            quiet_dask_logs()
        run = sweep if args.dask is None else sweep.with_options(task_runner=dask_task_runner(args.dask, workers))
        table = run(grid=grid, prefix=args.prefix, jobs=args.jobs, training=args.training)
    print(format_table(table))


if __name__ == "__main__":
    main()

"""The sweep flow: each point of a grid is one `dvc exp run --temp` and one Prefect task, so the task runner decides
where points run (``jobs`` threads, or Dask through prefect-dask: `pip install -e '.[dask]'`):

    python -m flows.sweep -S lora.rank=1,2,4,8 -S lora.alpha=1,4 --jobs 2
    python -m flows.sweep -S lora.rank=1,2,4,8 --batched                 # one experiment, every point in one process
    python -m flows.sweep -S lora.rank=1,2 --dask [tcp://127.0.0.1:8786]  # a LocalCluster of --jobs workers, or yours

Dask workers run on this machine, from this checkout. Results come from `dvc exp show --json`, printed and published
as a table artifact. Without Prefect: `dvc exp run --queue -S lora.rank=1,2,4`, `dvc queue start -j 2`.
"""
# ruff: noqa: E402  (Prefect's home is set before Prefect loads)
from flows.dvc import use_project_prefect_home

if __name__ == "__main__":
    use_project_prefect_home()

import json
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dvc import (CommandFailed, CommandLine, check_names, dvc, experiment_metrics, require_prefect_api,
                       set_params)
from lora.config import is_integer
from lora_mnist.cli import one_line_errors
from lora_mnist.params import check_batched_grid, grid_points, load_raw, parse_grid, with_overrides
from lora_mnist.paths import EVALUATE_METRICS, SWEEP_GRID, SWEEP_RESULT

SCHEDULER = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d+")  # host or [IPv6], then port
BATCH_TARGET, BATCH_KEY = "experiments/dvc.yaml:sweep", f"{SWEEP_GRID}:grid"  # stages/sweep.py: a grid in one process
PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,49}")


def point_name(prefix: str, point: dict[str, Any]) -> str:
    """``prefix-rank4-alpha1``: a name git takes as a ref (other characters become '_', a list's items join by '_')."""
    text = {k: "_".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in point.items()}
    return "-".join([prefix, *(re.sub(r"[^A-Za-z0-9_-]", "_", k.rsplit(".", 1)[-1] + v) for k, v in text.items())])


def plan(grid: Any, prefix: Any, jobs: Any, batched: Any = False) -> dict[str, dict[str, Any]]:
    """Each DVC experiment of the sweep by name, as its `-S` overrides: one point's, or with ``batched`` the whole grid
    in experiments/sweep.yaml. Every point is checked as check_params would: refused before anything runs."""
    if not (is_integer(jobs) and jobs >= 1):
        raise ValueError(f"jobs={jobs!r} is invalid: an integer >= 1 is allowed")
    if not isinstance(prefix, str) or not PREFIX.fullmatch(prefix):
        raise ValueError(f"prefix={prefix!r} is invalid: up to 50 letters, digits, '_' and '-', starting with a letter or digit")
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"grid={grid!r} is invalid: a mapping of params.yaml keys to non-empty lists is allowed")
    if not isinstance(batched, bool):
        raise ValueError(f"batched={batched!r} is invalid: true or false is allowed")
    points, raw = grid_points(grid), load_raw()
    for point in points:
        with_overrides(raw, point)
    if batched:
        check_batched_grid(grid)
        sweeps = [f"{key}={','.join(json.dumps(value) for value in values)}" for key, values in grid.items()]
        experiments = {point_name(prefix, grid): {BATCH_KEY: sweeps}}
    else:
        names = [point_name(prefix, point) for point in points]
        if len(set(names)) < len(names):
            raise ValueError(f"the grid's points share experiment names {sorted({n for n in names if names.count(n) > 1})}: "
                             "a value is repeated, or two values write alike")
        experiments = dict(zip(names, points))
    check_names(list(experiments))
    return experiments


@task(task_run_name="{name}")
def run_experiment(name: str, overrides: dict[str, Any], checkout: str, host: str) -> str:
    if (here := f"{socket.gethostname()}:{Path.cwd().resolve()}") != f"{host}:{checkout}":
        raise CommandFailed(f"this worker runs in {here}, not in the sweep's checkout {host}:{checkout}: start the "
                            "Dask workers on that machine, from the checkout's root")
    target = BATCH_TARGET if BATCH_KEY in overrides else "dvc.yaml"
    dvc("exp", "run", "--temp", target, "-n", name, *set_params(overrides))
    return name


def rows(name: str, overrides: dict[str, Any], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The table's rows of one experiment: its point, or with a batch every point of experiments/results/sweep.json."""
    found = metrics[str(SWEEP_RESULT)]["points"] if BATCH_KEY in overrides else \
        [{"overrides": overrides, **metrics[str(EVALUATE_METRICS)]}]
    return [{"experiment": name, **p["overrides"], "digit": p["digit"], "digit errors, base": p["digit_errors"]["base"],
             "digit errors, LoRA on": p["digit_errors"]["lora_on"], "accuracy, LoRA on": p["lora_on"]["accuracy"]}
            for p in found]


@flow(name="lora-mnist-sweep", log_prints=True, task_runner=ThreadPoolTaskRunner(), validate_parameters=False)
def sweep(grid: dict[str, list[Any]], prefix: str = "sweep", jobs: int = 2, batched: bool = False) -> list[dict[str, Any]]:
    """Every combination of ``grid`` ({"lora.rank": [1, 2, 4]}) as a DVC experiment, or with ``batched`` all of them
    as one; returns their results, a row a point."""
    experiments = plan(grid, prefix, jobs, batched)
    where = {"checkout": str(Path.cwd().resolve()), "host": socket.gethostname()}
    futures, running = [], []
    for name, overrides in experiments.items():  # never more than ``jobs`` unfinished, whatever the runner's size
        if len(running) >= jobs:
            running.remove(next(as_completed(running)))
        futures.append(run_experiment.submit(name, overrides, **where))
        running.append(futures[-1])
    outcomes = {name: future.result(raise_on_failure=False) for name, future in zip(experiments, futures)}
    metrics = experiment_metrics([name for name, outcome in outcomes.items() if outcome == name],
                                 files=(SWEEP_RESULT,) if batched else ())
    table = [row for name, overrides in experiments.items() if name in metrics  # in the grid's order, not `dvc exp show`'s
             for row in rows(name, overrides, metrics[name])]
    create_table_artifact(key="sweep-results", table=table, description="One row per point of the sweep")
    if failed := {name: outcome for name, outcome in outcomes.items() if name not in metrics}:
        raise CommandFailed(f"sweep points {list(failed)} did not finish: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    return table


def dask_runner(address: Any, jobs: int) -> Any:
    """prefect-dask's runner: "local" (a LocalCluster of ``jobs`` processes on 127.0.0.1) or a scheduler's address."""
    if not isinstance(address, str) or not (address == "local" or SCHEDULER.fullmatch(address)):
        raise ValueError(f"dask={address!r} is invalid: 'local' or a scheduler address tcp://host:port is allowed")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ValueError(f"dask={address!r} needs prefect-dask, which is not installed: pip install -e '.[dask]'") from None
    from prefect.settings import get_current_settings

    if address == "local":
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:  # starts the temporary server when none is configured
            env = {"PREFECT_API_URL": str(client.api_url)}  # the workers report to it, not to servers of their own
        return DaskTaskRunner(cluster_kwargs={"n_workers": jobs, "threads_per_worker": 1, "host": "127.0.0.1",
                                              "dashboard_address": None, "env": env})
    if not get_current_settings().api.url:
        raise ValueError(f"dask={address!r} needs a Prefect server its workers reach (PREFECT_API_URL): a temporary "
                         "one lives in this process only")
    scheduler = urlsplit(address)
    try:
        socket.create_connection((scheduler.hostname, scheduler.port), timeout=10).close()
    except (OSError, ValueError) as exc:
        raise ValueError(f"dask={address!r}: no Dask scheduler answers there ({exc})") from None
    return DaskTaskRunner(address=address)


def format_table(table: list[dict[str, Any]]) -> str:
    cells = [list(map(str, table[0]))] + [[str(v) for v in row.values()] for row in table] if table else [[]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells)


def main() -> None:
    parser = CommandLine(prog="python -m flows.sweep", description="Run a grid of DVC experiments as a Prefect flow.")
    parser.add_argument("-S", "--set-param", dest="grid", action="append", required=True, metavar="KEY=V1,V2,…")
    parser.add_argument("--jobs", type=int, default=2, help="points at a time (default 2)")
    parser.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS",
                        help="run the points on Dask: a LocalCluster of --jobs workers, or the scheduler at ADDRESS")
    parser.add_argument("--prefix", default="sweep", help="experiment names are PREFIX-<key><value>… (default sweep)")
    parser.add_argument("--batched", action="store_true", help="one experiment: every point in one process (finetune.* "
                        "and lora.* keys)")
    args = parser.parse_args()
    with one_line_errors(CommandFailed, ValueError):
        grid = parse_grid(args.grid)
        experiments = plan(grid, args.prefix, args.jobs, args.batched)  # refused before a temporary Prefect server starts
        require_prefect_api()
        jobs = min(args.jobs, len(experiments))
        runner = ThreadPoolTaskRunner(max_workers=jobs) if args.dask is None else dask_runner(args.dask, jobs)
        run = sweep.with_options(task_runner=runner)
        table = run(grid=grid, prefix=args.prefix, jobs=args.jobs, batched=args.batched)
    print(format_table(table))


if __name__ == "__main__":
    main()

"""The experiments flow: the groups of experiments/dvc.yaml as Prefect tasks, then the report as an artifact.

    python -m flows.experiments                                   # every group, then the report
    python -m flows.experiments --group rank_sweep --group seeds  # some groups; the report covers what exists

Each group is one task, `dvc repro experiments/dvc.yaml:<group>` (its matrix points, and what they need of the main
pipeline); DVC skips what is up to date.
"""
# ruff: noqa: E402  (Prefect's home is set before Prefect loads)
from flows.dvc import use_project_prefect_home

if __name__ == "__main__":
    use_project_prefect_home()

import json
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.dvc import CommandLine, dvc, how_ran, one_line_errors, require_prefect_api
from lora_mnist.paths import EXPERIMENT_REPORT, EXPERIMENT_SUMMARY
from lora_mnist.report import SECTIONS

GROUPS = tuple(SECTIONS)  # each group is a stage of experiments/dvc.yaml with a section of the report


@task(task_run_name="{target}")
def repro(target: str) -> dict[str, str]:
    return {"stage": target, "ran": how_ran(dvc("repro", target), target)}


@flow(name="lora-mnist-experiments", log_prints=True)
def experiments(groups: list[str] = list(GROUPS)) -> dict[str, Any]:
    """Run the chosen experiment groups (all by default) on the pipeline's base model, then the report."""
    if unknown := [group for group in groups if group not in GROUPS]:
        raise ValueError(f"groups={unknown} are invalid: {list(GROUPS)} are allowed")
    runs = [repro(f"experiments/dvc.yaml:{group}") for group in [*groups, "report"]]
    create_markdown_artifact(key="lora-experiments-report", markdown=EXPERIMENT_REPORT.read_text(),
                             description=f"{EXPERIMENT_REPORT}, built from experiments/results/")
    return {"stages": runs, "summary": json.loads(EXPERIMENT_SUMMARY.read_text())}


def main() -> None:
    parser = CommandLine(prog="python -m flows.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--group", dest="groups", action="append", choices=GROUPS, help="repeatable; all by default")
    args = parser.parse_args()
    with one_line_errors():
        require_prefect_api()
        result = experiments(groups=args.groups or list(GROUPS))
    for run in result["stages"]:
        print(f"{run['stage']}: {run['ran']}")
    print(f"report: {EXPERIMENT_REPORT}")


if __name__ == "__main__":
    main()

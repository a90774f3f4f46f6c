"""The experiments flow: the groups of experiments/dvc.yaml as Prefect tasks, then the report as an artifact.

    python -m flows.experiments                                   # every group, then the report
    python -m flows.experiments --group rank_sweep --group seeds  # some groups; the report covers what exists

Each group is one task, `dvc repro experiments/dvc.yaml:<group>` (its matrix points, and what they need of the main
pipeline); DVC skips what is up to date. The report is `dvc repro --allow-missing`: in a clone without the other
groups' models (a fresh one, no DVC cache) it builds from their committed results instead of re-running them.
"""
# ruff: noqa: E402  (Prefect's home is set before Prefect loads)
from flows.dvc import use_project_prefect_home

if __name__ == "__main__":
    use_project_prefect_home()

import json
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.dvc import CommandFailed, CommandLine, dvc, require_prefect_api
from flows.pipeline import repro
from lora_mnist.cli import one_line_errors
from lora_mnist.paths import EXPERIMENT_REPORT, EXPERIMENT_SUMMARY

PIPELINE = "experiments/dvc.yaml"
REPORT = (f"{PIPELINE}:report", ("--allow-missing",))  # groups whose models are missing but nothing else changed: skipped


def check_groups(groups: list[str] | None) -> list[str]:
    """``groups`` (all by default) if each is a stage of experiments/dvc.yaml other than the report (`dvc stage list`)."""
    found = [name.partition(":")[2] for name in dvc("stage", "list", "--name-only", PIPELINE).split()]
    allowed = [name for name in found if name != "report"]
    if unknown := [group for group in groups or [] if group not in allowed]:
        raise ValueError(f"groups={unknown} are invalid: {allowed} (the stages of {PIPELINE}) are allowed")
    return list(dict.fromkeys(groups)) if groups else allowed  # a group named twice runs once


@flow(name="lora-mnist-experiments", log_prints=True)
def experiments(groups: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen experiment groups (all by default) on the pipeline's base model, then the report."""
    runs = [*(repro(f"{PIPELINE}:{group}") for group in check_groups(groups)), repro(*REPORT)]
    create_markdown_artifact(key="lora-experiments-report", markdown=EXPERIMENT_REPORT.read_text(),
                             description=f"{EXPERIMENT_REPORT}, built from experiments/results/")
    return {"stages": runs, "summary": json.loads(EXPERIMENT_SUMMARY.read_text())}


def main() -> None:
    parser = CommandLine(prog="python -m flows.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("--group", dest="groups", action="append", help="a stage of experiments/dvc.yaml, repeatable; "
                        "all by default")
    args = parser.parse_args()
    with one_line_errors(CommandFailed, ValueError):
        groups = check_groups(args.groups)  # refused before a temporary Prefect server starts
        require_prefect_api()
        result = experiments(groups=groups)
    for run in result["stages"]:
        print(f"{run['stage']}: {run['ran']}")
    print(f"report: {EXPERIMENT_REPORT}")


if __name__ == "__main__":
    main()

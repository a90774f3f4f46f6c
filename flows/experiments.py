"""The experiments flow: the groups of experiments/dvc.yaml as Prefect tasks, then the report as an artifact.

    python -m flows.experiments                                   # every group, then the report
    python -m flows.experiments --group rank_sweep --group seeds  # some groups; the report covers what exists

Each group is one task running `dvc repro --single-item experiments/dvc.yaml:<group>` (all its matrix
points), after the main pipeline's check_params, download and pretrain stages; up-to-date groups are Skipped.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.dvc_stage import checkout_lock, one_line_errors
from flows.pipeline import dvc_stage
from tasks.paths import EXPERIMENT_REPORT as REPORT
from tasks.paths import EXPERIMENT_SUMMARY as SUMMARY
from tasks.report import SECTIONS

EXPERIMENTS_FILE = "experiments/dvc.yaml"
GROUPS = tuple(SECTIONS)  # each group is a stage of experiments/dvc.yaml with a section of the report


@flow(name="lora-mnist-experiments", log_prints=True)
def experiments(groups: list[str] = list(GROUPS)) -> dict[str, Any]:
    """Run the chosen experiment groups (all by default) on the pipeline's base model, then the report."""
    unknown = [group for group in groups if group not in GROUPS]
    if unknown:
        raise ValueError(f"groups={unknown} are invalid: {list(GROUPS)} are allowed")
    root = Path.cwd().resolve()
    with checkout_lock():
        stages = ["check_params", "download", "pretrain", *(f"{EXPERIMENTS_FILE}:{group}" for group in groups),
                  f"{EXPERIMENTS_FILE}:report"]
        runs = [dvc_stage(stage, root, return_state=True).result() for stage in stages]
        create_markdown_artifact(
            key="lora-experiments-report", markdown=(root / REPORT).read_text(), description=f"{REPORT}, built from experiments/results/"
        )
    return {"stages": runs, "summary": json.loads((root / SUMMARY).read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the experiments of experiments/dvc.yaml as a Prefect flow.")
    parser.add_argument("--group", dest="groups", action="append", choices=GROUPS, help="repeatable; all by default")
    args = parser.parse_args()
    with one_line_errors():
        result = experiments(groups=args.groups or list(GROUPS))
    for run in result["stages"]:
        print(f"{run['stage']}: {run['ran']}")
    print(f"report: {REPORT}")


if __name__ == "__main__":
    main()

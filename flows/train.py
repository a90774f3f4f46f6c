"""The training flow that the `gpu` work pool runs: one stage of the pipeline's commit, in the worker's clone.

The deployment's pull steps clone the shared git remote (prefect.yaml); the flow checks out the pipeline's
commit, writes the params, takes the dvc.lock entries of the stages before this one, gets its inputs with
`dvc fetch` and `dvc checkout` (no directory among them may list a file outside itself), runs the stage,
pushes its outputs with `dvc push` and publishes the stage's dvc.lock entry as a JSON artifact of its flow
run. The request is checked with the commit's own dvc.yaml and check_params.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.dvc_stage import TRAINING_STAGES, checkout_lock, dvc, git, reproduce
from flows.handoff import check_commit, check_upstream, fetch_checked, publish_lock_entry, write_lock_entries
from tasks.params import PARAMS_FILE


@flow(name="lora-mnist-train", log_prints=True)
def train_stage(stage: str, commit: str, params: dict[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    """Run ``stage`` at ``commit`` with ``params`` (the whole params.yaml), its inputs pulled as ``upstream``
    (dvc.lock entries) names them; returns and publishes the stage's dvc.lock entry."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"stage={stage!r} is invalid: one of {list(TRAINING_STAGES)} is allowed")
    check_commit(commit)
    if not isinstance(params, dict):
        raise ValueError(f"params={params!r} is invalid: the mapping of a whole params.yaml is allowed")
    root = Path.cwd()
    logger = get_run_logger()
    with checkout_lock():
        fetch_commit(commit)
        git("checkout", "-q", "--force", "--detach", commit)
        check_upstream(stage, upstream, root)  # against the dvc.yaml of the commit it will run
        write_params(params, root / PARAMS_FILE)  # check_params, below, checks them with the commit's code
        write_lock_entries(upstream, root)
        inputs = [name for name in upstream if name != "check_params"]  # check_params' outputs are rebuilt here
        if inputs:
            fetch_checked({name: upstream[name] for name in inputs}, root)
        reproduce("check_params", logger.info)
        reproduce(stage, logger.info)
        dvc("push", stage)
        return publish_lock_entry(stage, root)


def fetch_commit(commit: str) -> None:
    """Make ``commit`` present in this clone: Prefect's git_clone step clones one branch at depth 1."""
    if git("cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode == 0:
        return
    shallow = git("rev-parse", "--is-shallow-repository").stdout.strip() == "true"
    git("fetch", "-q", *(["--unshallow"] if shallow else []), "origin", "+refs/heads/*:refs/remotes/origin/*")
    if git("cat-file", "-e", f"{commit}^{{commit}}", check=False).returncode != 0:
        raise ValueError(f"commit {commit} is not on the shared git remote's branches: push it there first")


def write_params(params: dict[str, Any], path: Path) -> None:
    """params.yaml with every top-level value replaced by the request's (comments of the file kept)."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(path) as data:
        for key in list(data):
            if key not in params:
                del data[key]
        data.update(params)

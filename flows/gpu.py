"""The hand-off to the `gpu` work pool, through git and a DVC remote alone, as DVC shares experiments:

- here, run_on_gpu_pool starts the `lora-mnist-train/gpu` deployment with this commit (already on the shared git
  remote, `origin`), the overrides and an experiment name;
- there, train_on_gpu, in a fresh clone (prefect.yaml's pull steps): `dvc exp run --pull` runs the pipeline, taking
  what the DVC remote already holds, then `dvc exp push origin NAME` sends the commit to git, the outputs to DVC;
- here again: `dvc exp pull origin NAME`, every path and output of the experiment checked before the workspace is
  touched, and, for a run without overrides, `dvc exp apply NAME`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prefect import flow

from flows.dvc import CommandFailed, check_names, dag, dvc, experiment_metrics, git, prefect_api_url, set_params
from lora_mnist.params import load_raw, with_overrides

TRAIN_DEPLOYMENT = "lora-mnist-train/gpu"
TRAINING_MODES = ("auto", "local", "gpu-pool")
RETURNED = ("dvc.lock", "params.yaml", "params_checked.json", "metrics/", "reports/")  # what the GPU run may change


class HandoffRefused(ValueError):
    """What came back from the gpu pool is not what this commit's pipeline writes; nothing was changed here."""


def gpu_pool_unavailable() -> str | None:
    """Why a run cannot go to the gpu pool (no DVC remote, no shared git remote, no deployment), or None."""
    from prefect.client.orchestration import get_client

    for command, why in ((lambda: dvc("remote", "default"), "no default DVC remote"),
                         (lambda: git("remote", "get-url", "origin"), "no shared git remote 'origin'")):
        try:
            command()
        except CommandFailed:
            return why
    if not prefect_api_url():  # a temporary server holds no deployment
        return f"no Prefect server (PREFECT_API_URL) to hold the deployment {TRAIN_DEPLOYMENT}"
    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(TRAIN_DEPLOYMENT)
    except Exception as exc:  # no server, or no such deployment: both mean "not here"
        return f"no deployment {TRAIN_DEPLOYMENT} ({type(exc).__name__})"
    return None


def run_on_gpu_pool(overrides: dict[str, Any], name: str, apply: bool) -> tuple[dict[str, Any], set[str]]:
    """Run the pipeline on the gpu pool as experiment ``name`` and take it back; returns its metrics and the stages
    that ran there (or came from its run cache): those whose dvc.lock entry the experiment changed."""
    from prefect.deployments import run_deployment

    if dirty := [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
                 if not line[3:].startswith(RETURNED)]:
        raise ValueError(f"uncommitted code the gpu worker would not have: {dirty}; commit and push it first")
    commit = git("rev-parse", "HEAD").strip()
    run = run_deployment(TRAIN_DEPLOYMENT, parameters={"commit": commit, "overrides": overrides, "experiment_name": name},
                         timeout=None)
    if not run.state.is_completed():
        raise CommandFailed(f"{TRAIN_DEPLOYMENT} run {run.name}: {run.state.name}: {run.state.message}")
    dvc("exp", "pull", "origin", name)
    ref = check_experiment(name, commit)
    if apply:
        dvc("exp", "apply", name)
    before, after = lock_stages(commit), lock_stages(ref)
    return experiment_metrics([name])[name], {stage for stage, entry in after.items() if before.get(stage) != entry}


def check_experiment(name: str, commit: str) -> str:
    """Refuse an experiment that changes a file the pipeline does not write, adds or retypes an output, or holds a
    directory listing a path outside itself (absolute, '..', empty, a NUL byte): all before anything is checked out.
    Returns the experiment's git ref."""
    refs = [ref for ref in git("for-each-ref", "--format=%(refname)", "refs/exps/").split() if ref.endswith(f"/{name}")]
    if len(refs) != 1:
        raise HandoffRefused(f"experiment {name!r}: {len(refs)} experiment refs of that name, one is expected")
    changed = git("diff", "--name-only", "-z", commit, refs[0]).split("\0")
    if outside := [path for path in changed if path and not path.startswith(RETURNED)]:
        raise HandoffRefused(f"experiment {name!r} changes {outside}: only {list(RETURNED)} come back")
    declared = set(dag("--outs", "dvc.yaml")[0])  # dvc.yaml's outputs
    before = lock_outputs(commit)
    for path, md5 in lock_outputs(refs[0]).items():
        is_dir = md5.endswith(".dir")
        if path not in declared or (path in before and is_dir != before[path].endswith(".dir")):
            raise HandoffRefused(f"experiment {name!r} returns {path!r} as a {'directory' if is_dir else 'file'}, which "
                                 "this commit's pipeline does not write")
        if is_dir and md5 != before.get(path):  # an unchanged directory is this commit's own
            try:
                listing = json.loads(dvc("ls", "--rev", refs[0], "--json", "-R", ".", path))
            except CommandFailed as exc:  # DVC itself fails on some listings that leave the directory ('../..')
                raise HandoffRefused(f"experiment {name!r}: {path} cannot be listed: {exc}") from None
            if bad := [e["path"] for e in listing if not e["path"] or "\0" in e["path"] or e["path"].startswith("/") or ".." in re.split(r"[/\\]", e["path"])]:
                raise HandoffRefused(f"experiment {name!r}: {path} lists {bad[0]!r}, a path outside itself")
    return refs[0]


def lock_stages(rev: str, cwd: Path | None = None) -> dict[str, Any]:
    """dvc.lock's entry of each stage at ``rev`` (none where that commit has no dvc.lock yet)."""
    try:
        return yaml.safe_load(git("show", f"{rev}:dvc.lock", cwd=cwd))["stages"]
    except CommandFailed:
        return {}


def lock_outputs(rev: str, cwd: Path | None = None) -> dict[str, str]:
    """Each output's hash in dvc.lock at ``rev``."""
    return {out["path"]: str(out.get("md5", "")) for entry in lock_stages(rev, cwd).values() for out in entry.get("outs", [])}


@flow(name="lora-mnist-train", log_prints=True)
def train_on_gpu(commit: str, overrides: dict[str, Any], experiment_name: str) -> dict[str, str]:
    """In the gpu worker's fresh clone: the pipeline at ``commit`` with ``overrides`` as a DVC experiment, pushed."""
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ValueError(f"commit={commit!r} is invalid: a full 40-character git commit hash is allowed")
    check_names([experiment_name])
    if git("rev-parse", "--is-shallow-repository").strip() == "true":  # Prefect's git_clone clones at depth 1
        git("fetch", "-q", "--unshallow", "origin", "+refs/heads/*:refs/remotes/origin/*")
    try:
        git("checkout", "-q", "--detach", commit)
    except CommandFailed:
        raise ValueError(f"commit {commit} is not on the shared git remote: push it there first") from None
    with_overrides(load_raw(), overrides)  # checked by the commit's own schema
    print(dvc("exp", "run", "--pull", "dvc.yaml", "-n", experiment_name, *set_params(overrides)))
    dvc("exp", "push", "origin", experiment_name)
    return {"experiment": experiment_name, "commit": commit}

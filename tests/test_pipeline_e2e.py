"""`dvc repro` end to end on real MNIST in a temporary git repo, then a LoRA experiment with `dvc exp run -S`.
This is the suite's one run on the full schedule (a whole epoch of pretraining, params.yaml as shipped)."""
from __future__ import annotations

import csv
import json
import shlex
import subprocess
from pathlib import Path

import pytest

from flows.gpu import lock_outputs
from lora_mnist.download import MNIST_SHA256
from tests.helpers import ROOT, init_repo, run_env, sh

pytestmark = pytest.mark.slow


def readme_command(start: str) -> list[str]:
    """The README's shell command that begins with ``start``, as arguments (its comment dropped)."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(start))
    return shlex.split(line, comments=True)


def worktree_status(repo: Path) -> str:
    """`git status --short` from the files' content: DVC's stash and pop rewrite the index's stat data, which
    git status otherwise trusts."""
    sh(repo, "git", "update-index", "-q", "--really-refresh")
    return sh(repo, "git", "status", "--short")


def test_dvc_repro_on_real_mnist_remakes_the_committed_outputs_then_a_rank_experiment_reruns_only_finetune_and_evaluate(
        repo_copy):
    repo = init_repo(repo_copy, "as shipped")
    sh(repo, "dvc", "repro")
    assert worktree_status(repo).split() in ([], ["M", "dvc.lock"])  # only code-dep hashes may move in dvc.lock
    raw = repo / "data" / "mnist" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_SHA256)
    result = json.loads((repo / "metrics" / "evaluate.json").read_text())
    analysis = json.loads((repo / "metrics" / "analyze.json").read_text())
    assert result["base"]["accuracy"] > 0.9
    assert result["digit"] == analysis["worst_digit"]
    assert result["lora_off"] == result["base"]
    assert result["digit_errors"]["lora_on"] < result["digit_errors"]["base"]
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status", "dvc.yaml")

    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "--allow-empty", "-qm", "baseline run")  # empty when the run reproduced the committed outputs
    # the same bits on this CPU as where they were committed: weights, adapter, metrics, reports
    assert lock_outputs("HEAD", cwd=repo) == lock_outputs("HEAD~1", cwd=repo)
    output = sh(repo, "dvc", "exp", "run", "-S", "lora.rank=2", "--name", "rank2")
    assert "Running stage 'finetune'" in output and "Running stage 'evaluate'" in output
    assert "Running stage 'pretrain'" not in output and "Running stage 'analyze'" not in output
    assert "Stage 'pretrain' didn't change, skipping" in output

    params_diff = json.loads(sh(repo, "dvc", "params", "diff", "HEAD", "rank2", "--json"))
    assert params_diff["params.yaml"]["lora.rank"]["old"] == 1 and params_diff["params.yaml"]["lora.rank"]["new"] == 2
    metrics_diff = json.loads(sh(repo, "dvc", "metrics", "diff", "HEAD", "rank2", "--json"))
    trainable = metrics_diff["metrics/finetune.json"]["trainable_parameters"]
    assert trainable["old"] == 6794 and trainable["new"] == 2 * 6794
    assert "rank2" in sh(repo, "dvc", "exp", "show", "--csv")
    headline = readme_command("dvc exp show --drop")  # the README's narrow view
    rows = list(csv.DictReader(sh(repo, *headline, "--csv").splitlines()))
    assert set(rows[0]) == {"Experiment", "lora.rank", "lora.alpha", "finetune.digit",
                            "digit_errors.base", "digit_errors.lora_on", "lora_on.accuracy"}, rows[0]
    assert [row["lora.rank"] for row in rows if row["Experiment"] == "rank2"] == ["2"]
    narrow = list(csv.DictReader(sh(repo, *readme_command("dvc exp show --only-changed"), "--csv").splitlines()))
    wide = list(csv.DictReader(sh(repo, "dvc", "exp", "show", "--csv").splitlines()))
    assert "lora.rank" in narrow[0] and "lora.alpha" not in narrow[0] and len(narrow[0]) < len(wide[0])  # only what differs

    # A bad value through `dvc exp run -S` stops at the stage with the same one-line error;
    # --temp runs it outside the workspace, which stays as it was.
    before = worktree_status(repo)
    failed = subprocess.run(["dvc", "exp", "run", "--temp", "-S", "lora.rank=0"], cwd=repo, env=run_env(),
                            capture_output=True, text=True)
    assert failed.returncode != 0
    assert "error: params.yaml: lora.rank=0 is invalid: an integer >= 1 is allowed" in failed.stdout + failed.stderr
    assert worktree_status(repo) == before
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status", "dvc.yaml")

    # Two `dvc repro` at once in one checkout: each ends with correct outputs or DVC's clear "busy" error.
    runs = [subprocess.Popen(["dvc", "repro", "--force", "--single-item", "evaluate"], cwd=repo, env=run_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    expected = json.loads((repo / "metrics" / "evaluate.json").read_text())
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert any(run.returncode == 0 for run in runs), outputs
    for run, output in zip(runs, outputs):
        assert run.returncode == 0 or "is busy" in output or "Unable to acquire lock" in output, output
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status", "dvc.yaml")
    assert json.loads((repo / "metrics" / "evaluate.json").read_text()) == expected

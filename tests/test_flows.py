"""The Prefect pipeline flow on Prefect's test server: stages run through DVC, artifacts, overrides, locking."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness

from flows.dvc_stage import STAGES, WORKSPACES, StageFailed
from flows.pipeline import pipeline
from tasks.params import ParamsError
from tests.helpers import ROOT, changed_params, dask_cluster, run_env, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=90):
        yield


def _flow_checkout(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key, value in run_env().items():
        if key.startswith("GIT_") or key == "MNIST_SOURCE_DIR":
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(repo)
    return repo


@pytest.fixture
def flow_repo(pipeline_repo: Path, prefect_server, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A short-schedule git repo of the main pipeline as the working directory of in-process flow runs."""
    return _flow_checkout(pipeline_repo, monkeypatch)


@pytest.fixture
def experiments_repo(git_repo: Path, prefect_server, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The same with the experiments pipeline too."""
    return _flow_checkout(git_repo, monkeypatch)


def ran(result: dict) -> dict[str, str]:
    return {run["stage"]: run["ran"] for run in result["stages"]}


def test_pipeline_flow_runs_stages_through_dvc_publishes_artifacts_and_records_overrides_as_experiments(flow_repo):
    first = pipeline(training="local")
    assert ran(first) == {stage: "here" for stage in STAGES}
    assert "Data and pipelines are up to date" in sh(flow_repo, "dvc", "status", "dvc.yaml")

    metrics = json.loads((flow_repo / "metrics" / "evaluate.json").read_text())
    table = json.loads(Artifact.get("per-digit-errors").data)
    assert [row["base"] for row in table] == [metrics["base"]["errors_per_digit"][str(d)] for d in range(10)]
    assert [row["lora_on"] for row in table] == [metrics["lora_on"]["errors_per_digit"][str(d)] for d in range(10)]
    assert table[metrics["digit"]]["digit"] == f"{metrics['digit']} (fine-tuned)"
    summary = Artifact.get("lora-run-summary").data
    assert "## Integrity check: passed" in summary and "trainable parameters: 6,794" in summary
    assert str((flow_repo / "models" / "adapter").resolve()) in summary

    assert ran(pipeline(training="local")) == {stage: "skipped" for stage in STAGES}

    sh(flow_repo, "git", "add", "-A")
    sh(flow_repo, "git", "commit", "-qm", "baseline")

    # The committed models, from DVC's registry, in a directory outside any checkout, through the remote.
    remote, elsewhere = flow_repo.parent / "dvc-remote", flow_repo.parent / "elsewhere"
    sh(flow_repo, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))
    sh(flow_repo, "dvc", "push", "dvc.yaml")
    config = flow_repo.parent / "remote.conf"
    config.write_text(f"[core]\n    remote = shared\n['remote \"shared\"']\n    url = {remote}\n")
    elsewhere.mkdir()
    for name in ("base-model", "lora-adapter"):
        sh(flow_repo, "gto", "register", name, "--version", "v1.0.0")  # a git tag: the registered version
        sh(elsewhere, "dvc", "artifacts", "get", str(flow_repo), name, "--config", str(config))
    assert (elsewhere / "base.safetensors").read_bytes() == (flow_repo / "models/base.safetensors").read_bytes()
    for file in (flow_repo / "models" / "adapter").iterdir():
        assert (elsewhere / "adapter" / file.name).read_bytes() == file.read_bytes(), file.name
    sh(flow_repo, "dvc", "remote", "remove", "--local", "shared")  # the rest of this test trains in process

    params_before = (flow_repo / "params.yaml").read_bytes()
    third = pipeline(overrides={"lora.rank": 2}, training="local", experiment_name="flow-rank2")
    assert ran(third) == {"check_params": "here", "download": "skipped", "pretrain": "skipped", "analyze": "skipped",
                          "finetune": "here", "evaluate": "here"}
    assert (flow_repo / "params.yaml").read_bytes() == params_before  # the run had a workspace of its own
    assert not list((flow_repo / ".dvc" / "tmp" / "flow-workspaces").iterdir())
    assert third["experiment"] == "flow-rank2" and third["metrics"]["digit_errors"]
    assert changed_params(flow_repo, "flow-rank2") == {"lora.rank": (1, 2)}
    diff = json.loads(sh(flow_repo, "dvc", "metrics", "diff", "HEAD", "flow-rank2", "--json"))
    assert diff["metrics/finetune.json"]["trainable_parameters"]["new"] == 2 * 6794
    assert "Data and pipelines are up to date" in sh(flow_repo, "dvc", "status", "dvc.yaml")


def test_a_bad_override_fails_before_any_stage_and_leaves_params_untouched(flow_repo):
    before = (flow_repo / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="lora.rank=0 is invalid"):
        pipeline(overrides={"lora.rank": 0}, training="local")
    with pytest.raises(ValueError, match="params.yaml has no key 'lora.rnak'"):
        pipeline(overrides={"lora.rnak": 2}, training="local")
    assert (flow_repo / "params.yaml").read_text() == before
    assert not (flow_repo / "models").exists()


def test_the_flow_command_reports_a_bad_override_in_one_line_and_exits_non_zero(flow_repo):
    from prefect.settings import get_current_settings

    env = dict(run_env(), PREFECT_API_URL=get_current_settings().api.url)
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "--training", "local", "-S", "lora.rank=0"],
                            cwd=flow_repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    # Prefect's own shutdown logs may follow; our message is one whole line of its own.
    assert ("error: params.yaml with overrides {'lora.rank': 0}: lora.rank=0 is invalid: an integer >= 1 is allowed"
            in result.stderr.splitlines())
    assert not (flow_repo / "models").exists()


def test_two_flows_started_together_with_different_overrides_each_record_only_their_own_params(flow_repo):
    from prefect.settings import get_current_settings

    pipeline(training="local")
    sh(flow_repo, "git", "add", "-A")
    sh(flow_repo, "git", "commit", "-qm", "baseline")
    params_before = (flow_repo / "params.yaml").read_bytes()
    env = dict(run_env(), PREFECT_API_URL=get_current_settings().api.url)
    runs = {"eA": ["-S", "finetune.steps=30"], "eB": ["-S", "lora.alpha=2"]}
    processes = [
        subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--training", "local", *args, "--name", name],
                         cwd=flow_repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, args in runs.items()
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert (flow_repo / "params.yaml").read_bytes() == params_before
    assert "Data and pipelines are up to date" in sh(flow_repo, "dvc", "status", "dvc.yaml")
    assert changed_params(flow_repo, "eA") == {"finetune.steps": (40, 30)}
    assert changed_params(flow_repo, "eB") == {"lora.alpha": (1, 2)}
    after = pipeline(training="local")  # no overrides: this checkout's params, nothing left to run
    assert set(ran(after).values()) == {"skipped"}
    with pytest.raises(ValueError, match="experiment name 'eA' is taken by an experiment of HEAD"):
        pipeline(overrides={"lora.alpha": 4}, training="local", experiment_name="eA")  # DVC's exp run -n refuses too
    assert changed_params(flow_repo, "eA") == {"finetune.steps": (40, 30)}
    with pytest.raises(ValueError, match="experiment_name='eC' is given without overrides"):
        pipeline(training="local", experiment_name="eC")


def no_workspaces_left(repo: Path) -> bool:
    workspaces = repo / WORKSPACES
    worktrees = sh(repo, "git", "worktree", "list").splitlines()
    return len(worktrees) == 1 and (not workspaces.exists() or not any(workspaces.iterdir()))


def test_a_sweep_saves_each_point_as_an_experiment_and_the_dask_command_gets_the_same_results(flow_repo, tmp_path):
    from flows.sweep import sweep

    pipeline(training="local")
    sh(flow_repo, "git", "add", "-A")
    sh(flow_repo, "git", "commit", "-qm", "baseline")
    with (flow_repo / "README.md").open("a") as readme:  # uncommitted: every point's workspace snapshots it at once
        readme.write("\nA local note.\n")
    checkout_before = {name: (flow_repo / name).read_bytes() for name in ("params.yaml", "README.md", "dvc.lock")}
    on_threads = sweep(grid={"lora.rank": [2, 3]}, prefix="t", jobs=2)
    assert [row["experiment"] for row in on_threads] == ["t-rank2", "t-rank3"]
    assert [row["lora.rank"] for row in on_threads] == [2, 3]
    assert all(isinstance(row["digit errors, LoRA on"], int) for row in on_threads), on_threads
    assert json.loads(Artifact.get("sweep-results").data) == json.loads(json.dumps(on_threads))
    assert changed_params(flow_repo, "t-rank3") == {"lora.rank": (1, 3)}
    diff = json.loads(sh(flow_repo, "dvc", "metrics", "diff", "HEAD", "t-rank3", "--json"))
    assert diff["metrics/finetune.json"]["trainable_parameters"]["new"] == 3 * 6794

    # The command on a LocalCluster, with no server configured: its workers report to its one temporary server.
    env = {key: value for key, value in run_env().items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    on_dask = subprocess.run([sys.executable, "-m", "flows.sweep", "-S", "lora.rank=2,3", "--dask", "--jobs", "2",
                              "--prefix", "d", "--training", "local"], cwd=flow_repo, env=env, capture_output=True,
                             text=True, timeout=600)
    output = on_dask.stdout + on_dask.stderr
    assert on_dask.returncode == 0, output
    assert output.count("Starting temporary server") == 1, output
    assert "distributed.worker" not in output, output  # Dask's own INFO lines are hidden
    table = on_dask.stdout.strip().splitlines()[-3:]
    assert table[0].split()[:2] == ["experiment", "lora.rank"] and [line.split()[0] for line in table[1:]] == [
        "d-rank2", "d-rank3"]
    for rank, row in zip((2, 3), on_threads):
        assert json.loads(sh(flow_repo, "dvc", "metrics", "diff", f"t-rank{rank}", f"d-rank{rank}", "--json")) == {}
        assert changed_params(flow_repo, f"d-rank{rank}") == {"lora.rank": (1, rank)}
        assert table[rank - 1].split()[1:] == [str(row[key]) for key in list(row)[1:]]
    assert {name: (flow_repo / name).read_bytes() for name in checkout_before} == checkout_before
    assert no_workspaces_left(flow_repo)

    with pytest.raises(ParamsError, match="lora.rank=1001 is invalid: 1..1000 is allowed"):
        sweep(grid={"lora.rank": [2, 1001]}, prefix="bad")
    with pytest.raises(ValueError, match=r"experiment names \['t-rank3'\] are taken"):
        sweep(grid={"lora.rank": [4, 3]}, prefix="t")  # all or none: t-rank4 does not run either
    assert changed_params(flow_repo, "t-rank3") == {"lora.rank": (1, 3)}
    assert "t-rank4" not in sh(flow_repo, "dvc", "exp", "list", "--name-only")


def test_a_sweep_keeps_at_most_jobs_points_running_at_once(prefect_server):
    import threading
    import time

    from prefect import flow, task

    from flows.sweep import submit_at_most

    lock, running, most = threading.Lock(), [0], [0]

    @task
    def point(index: int) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return index

    @flow
    def grid(jobs: int) -> list[int]:
        return [future.result() for future in submit_at_most(jobs, point, [{"index": i} for i in range(5)])]

    for jobs in (1, 2):
        most[0] = 0
        assert grid(jobs) == [0, 1, 2, 3, 4]
        assert most[0] == jobs


def test_a_sweep_whose_point_fails_in_its_run_fails_naming_it_and_tables_only_the_finished_points(flow_repo):
    from flows.sweep import sweep

    pipeline(training="local")
    sh(flow_repo, "git", "add", "-A")
    sh(flow_repo, "git", "commit", "-qm", "baseline")
    with pytest.raises(StageFailed, match=r"sweep points \['f-devicecuda_99'\] did not finish: f-devicecuda_99: .*cuda"):
        sweep(grid={"device": ["cpu", "cuda:99"]}, prefix="f")  # cuda:99 passes the params check, fails in the run
    assert [row["experiment"] for row in json.loads(Artifact.get("sweep-results").data)] == ["f-devicecpu"]
    assert sh(flow_repo, "dvc", "exp", "list", "--name-only").split() == ["f-devicecpu"]
    assert no_workspaces_left(flow_repo)


def test_a_sweep_on_a_running_dask_cluster_runs_in_workers_started_in_the_checkout_and_refuses_others(flow_repo,
                                                                                                   tmp_path):
    from prefect.settings import get_current_settings
    from prefect_dask import DaskTaskRunner

    from flows.sweep import sweep

    pipeline(training="local")
    sh(flow_repo, "git", "add", "-A")
    sh(flow_repo, "git", "commit", "-qm", "baseline")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(run_env(), PREFECT_API_URL=get_current_settings().api.url, PYTHONPATH=str(ROOT))
    with dask_cluster(elsewhere, env, tmp_path / "logs") as address:
        with pytest.raises(StageFailed, match=r"w-rank2: this worker runs in .*elsewhere, not in the sweep's checkout"):
            sweep.with_options(task_runner=DaskTaskRunner(address=address))(grid={"lora.rank": [2]}, prefix="w")
    assert "w-rank2" not in sh(flow_repo, "dvc", "exp", "list", "--name-only")
    with dask_cluster(flow_repo, env, tmp_path / "logs") as address:
        table = sweep.with_options(task_runner=DaskTaskRunner(address=address))(grid={"lora.rank": [2]}, prefix="w")
    assert [row["experiment"] for row in table] == ["w-rank2"]
    assert changed_params(flow_repo, "w-rank2") == {"lora.rank": (1, 2)}


def test_without_a_dvc_remote_a_deployment_or_committed_code_training_stays_in_process_or_is_refused(flow_repo):
    from flows.dvc_stage import has_default_remote
    from flows.pipeline import gpu_pool_unavailable

    assert not has_default_remote()  # `dvc remote default` prints "No default remote set" and exits 1
    assert gpu_pool_unavailable(flow_repo) == "DVC has no default remote to carry the files (dvc remote add -d)"
    with pytest.raises(StageFailed, match="training='gpu-pool' is not possible: DVC has no default remote"):
        pipeline(training="gpu-pool")
    assert not (flow_repo / "models").exists()  # refused before any stage ran
    sh(flow_repo, "dvc", "remote", "add", "-d", "--local", "shared", str(flow_repo.parent / "remote"))
    assert has_default_remote()
    assert gpu_pool_unavailable(flow_repo) == "the server has no lora-mnist-train/gpu deployment (prefect deploy --all)"


def test_code_a_gpu_worker_would_not_have_is_named_and_outputs_or_params_are_not(flow_repo):
    from flows.handoff import uncommitted_code

    assert uncommitted_code(("pretrain", "finetune"), flow_repo) == []
    (flow_repo / "params.yaml").write_text((flow_repo / "params.yaml").read_text() + "\n")
    with open(flow_repo / "lora" / "layer.py", "a") as handle:
        handle.write("\n# a change not committed\n")
    assert uncommitted_code(("pretrain", "finetune"), flow_repo) == ["lora/layer.py"]
    sh(flow_repo, "git", "rm", "-q", "--cached", "lora/model.py")  # a file of the stage's that git does not track
    assert uncommitted_code(("finetune",), flow_repo) == ["lora/layer.py", "lora/model.py"]
    assert uncommitted_code(("download",), flow_repo) == []


def test_a_failing_stage_fails_the_flow_with_the_stages_own_error(flow_repo):
    from tests.helpers import set_params

    set_params(flow_repo / "params.yaml", **{"pretrain.lr": 0})
    with pytest.raises(StageFailed, match="error: params.yaml: pretrain.lr=0 is invalid: a finite number > 0 is allowed"):
        pipeline(training="local")


def test_experiments_flow_runs_the_chosen_groups_then_publishes_the_report(experiments_repo):
    from flows.experiments import experiments

    shutil.rmtree(experiments_repo / "experiments" / "results")  # the committed real results; only this run's will be there
    first = experiments(groups=["full_finetune"])
    assert ran(first) == {"check_params": "here", "download": "here", "pretrain": "here",
                          "experiments/dvc.yaml:full_finetune": "here", "experiments/dvc.yaml:report": "here"}
    report = Artifact.get("lora-experiments-report").data
    assert "## LoRA against full fine-tuning" in report and "No results yet for: rank_sweep, seeds" in report
    lora, full = first["summary"]["full_finetune"]["lora"], first["summary"]["full_finetune"]["full"]
    assert lora["accuracy"] > full["accuracy"]  # the forgetting of full fine-tuning on one digit
    assert set(ran(experiments(groups=["full_finetune"])).values()) == {"skipped"}
    with pytest.raises(ValueError, match=r"groups=\['sweeps'\] are invalid"):
        experiments(groups=["sweeps"])

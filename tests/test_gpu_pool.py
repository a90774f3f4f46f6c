"""A real Prefect server on 127.0.0.1, prefect.yaml's deployments, and a `gpu` worker that clones a shared git remote
per run: the pipeline flow sends its run there, and only git and a DVC remote over SSH (a real sshd on 127.0.0.1)
carry it, as `dvc exp run --pull`, `dvc exp push` and `dvc exp pull`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dvc.api
import pytest

from tests.helpers import changed_params, free_port, run_env, sh, use_dvc_cache

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def start(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    # A new session lets teardown end the process and every flow-run process it started.
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def prefect_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`prefect server start` on a free loopback port, SQLite in a temp dir; stopped after the test."""
    port = free_port()
    env = dict(run_env(), PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_UI_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1")
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   tmp_path, env, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "prefect server did not start in 120 s"
                time.sleep(1)
        yield env
    finally:
        stop(server)


DEPLOYMENTS = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    found = {}
    for name in ("lora-mnist-pipeline/scheduled", "lora-mnist-train/gpu"):
        d = client.read_deployment_by_name(name)
        found[name] = {"pool": d.work_pool_name, "cron": [s.schedule.cron for s in d.schedules],
                       "limit": d.global_concurrency_limit.limit if d.global_concurrency_limit else None,
                       "steps": [next(iter(step)).rsplit(".", 1)[-1] for step in d.pull_steps or []]}
print(json.dumps(found))
"""


def test_the_pipeline_flow_runs_on_the_gpu_pool_through_git_and_an_ssh_dvc_remote_and_takes_the_experiment_back(
        pipeline_repo, prefect_env, ssh_server, tmp_path, dvc_cache):
    shared_git = tmp_path / "shared.git"
    remote = f"ssh://{ssh_server['SSH_USER']}@127.0.0.1:{ssh_server['SSH_PORT']}{tmp_path / 'dvc-remote'}"
    sh(tmp_path, "git", "clone", "-q", "--bare", str(pipeline_repo), str(shared_git))
    env = dict(prefect_env, HOME=ssh_server["HOME"], LORA_KERNEL_CACHE=ssh_server["LORA_KERNEL_CACHE"],
               LORA_MNIST_GIT_REMOTE=f"file://{shared_git}")  # file://: git_clone's depth-1 clone is shallow
    checkout, gpu_machine = tmp_path / "checkout", tmp_path / "gpu-machine"
    sh(tmp_path, "git", "clone", "-q", str(shared_git), str(checkout), env=env)
    use_dvc_cache(checkout, dvc_cache)
    gpu_machine.mkdir()
    prefect = str(BIN / "prefect")

    # Without a deployment (and without a DVC remote) training stays in this process, or is refused.
    refused = subprocess.run([sys.executable, "-m", "flows.pipeline", "--training", "gpu-pool"], cwd=checkout, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.splitlines() == ["error: training='gpu-pool' is not possible: no "
                                                                       "default DVC remote"], refused.stderr
    sh(checkout, "dvc", "repro", env=env)  # this checkout's run, in the shared cache the gpu worker uses too
    sh(checkout, "dvc", "remote", "add", "--local", "-d", "shared", remote, env=env)
    sh(checkout, "dvc", "push", env=env)

    for pool in ("cpu", "gpu"):
        sh(checkout, prefect, "work-pool", "create", pool, "--type", "process", env=env)
    sh(checkout, prefect, "--no-prompt", "deploy", "--all", env=env)
    assert json.loads(sh(checkout, sys.executable, "-c", DEPLOYMENTS, env=env).splitlines()[-1]) == {
        "lora-mnist-pipeline/scheduled": {"pool": "cpu", "cron": ["0 3 * * 1"], "limit": None, "steps": ["set_working_directory"]},
        "lora-mnist-train/gpu": {"pool": "gpu", "cron": [], "limit": 1,
                                 "steps": ["git_clone", "set_working_directory", "run_shell_script"]}}

    gpu_env = dict(env, LORA_MNIST_DVC_REMOTE=remote, LORA_MNIST_DVC_CACHE=str(dvc_cache))
    worker = start([prefect, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"], gpu_machine,
                   gpu_env, tmp_path / "worker-gpu.log")
    before = sh(checkout, "git", "status", "--porcelain", env=env), (checkout / "params.yaml").read_bytes()
    try:
        run = subprocess.run([sys.executable, "-m", "flows.pipeline", "--training", "gpu-pool", "-S", "finetune.steps=30",
                              "--name", "g30"], cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    finally:
        stop(worker)
    log = (tmp_path / "worker-gpu.log").read_text()
    assert run.returncode == 0, run.stdout + run.stderr + log[-4000:]
    assert "saved as DVC experiment g30" in run.stdout
    # what ran there is what the experiment changed in dvc.lock: MNIST is the same, fine-tuning is not
    assert {"download: skipped", "finetune: gpu pool", "evaluate: gpu pool"} <= set(run.stdout.splitlines()), run.stdout
    assert "Running stage 'finetune'" in log  # trained in the worker's clone, not here
    assert any((tmp_path / "dvc-remote" / "files" / "md5").iterdir())  # the outputs went through sshd

    # The experiment came back through git and the remote; this checkout is as it was, and the run is the same
    # computation as one made here.
    assert (sh(checkout, "git", "status", "--porcelain", env=env), (checkout / "params.yaml").read_bytes()) == before
    assert changed_params(checkout, "g30", env) == {"finetune.steps": (40, 30)}
    sh(checkout, "dvc", "exp", "run", "--temp", "-S", "finetune.steps=30", "-n", "here30", env=env)
    for name in ("metrics/finetune.json", "metrics/evaluate.json"):
        from_pool, here = (dvc.api.read(name, repo=str(checkout), rev=rev) for rev in ("g30", "here30"))
        assert json.loads(from_pool) == json.loads(here), name

"""A real Prefect server on 127.0.0.1 with a `cpu` worker in a checkout and a `gpu` worker that clones a shared
git remote per run: without a DVC remote the deployed pipeline trains in process; with one (SSH, a real sshd on
127.0.0.1), it sends its training stages to the gpu pool, and only git, the DVC remote and a dvc.lock entry
carry them."""
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
import yaml

from flows.handoff import HandoffRefused, accept_lock_entry
from tests.helpers import changed_params, free_port, run_env, sh, use_dvc_cache

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _start(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    # A new session lets teardown end the process and every flow-run process it started.
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
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
    env = dict(
        run_env(),
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
    )
    server = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
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
        _stop(server)


def test_deployed_pipeline_trains_in_process_without_a_remote_then_on_the_gpu_pool_through_git_and_an_ssh_remote(
        pipeline_repo, prefect_env, ssh_server, tmp_path, dvc_cache):
    shared_git = tmp_path / "shared.git"
    remote = f"ssh://{ssh_server['SSH_USER']}@127.0.0.1:{ssh_server['SSH_PORT']}{tmp_path / 'dvc-remote'}"
    sh(tmp_path, "git", "clone", "-q", "--bare", str(pipeline_repo), str(shared_git))
    env = dict(prefect_env, HOME=ssh_server["HOME"], LORA_KERNEL_CACHE=ssh_server["LORA_KERNEL_CACHE"],
               LORA_MNIST_GIT_REMOTE=f"file://{shared_git}")  # file://: git_clone's depth-1 clone is shallow
    cpu_checkout, gpu_machine = tmp_path / "cpu-machine", tmp_path / "gpu-machine"
    sh(tmp_path, "git", "clone", "-q", str(shared_git), str(cpu_checkout), env=env)
    use_dvc_cache(cpu_checkout, dvc_cache)  # stages that other tests ran with these params come from the run cache
    gpu_machine.mkdir()
    prefect = str(BIN / "prefect")
    for pool in ("cpu", "gpu"):
        sh(cpu_checkout, prefect, "work-pool", "create", pool, "--type", "process", env=env)
    sh(cpu_checkout, prefect, "--no-prompt", "deploy", "--all", env=env)
    assert json.loads(sh(cpu_checkout, sys.executable, "-c", _DEPLOYMENT_SCRIPT, env=env)) == {
        "concurrency_limit": 1, "steps": ["git_clone", "set_working_directory", "use_worker_dvc_config"]}

    gpu_env = dict(env, LORA_MNIST_DVC_REMOTE=remote, LORA_MNIST_DVC_CACHE=str(tmp_path / "gpu-cache"))
    workers = [
        _start([prefect, "worker", "start", "--pool", "cpu", "--type", "process"], cpu_checkout,
               dict(env, LORA_MNIST_CHECKOUT=str(cpu_checkout)), tmp_path / "worker-cpu.log"),
        _start([prefect, "worker", "start", "--pool", "gpu", "--type", "process", "--limit", "1"], gpu_machine,
               gpu_env, tmp_path / "worker-gpu.log"),
    ]
    try:
        # No DVC remote: the training stages stay in the cpu worker's process.
        output = sh(cpu_checkout, prefect, "deployment", "run", "lora-mnist-pipeline/scheduled", "--params",
                    json.dumps({"overrides": {"pretrain.max_steps": 300}, "experiment_name": "cpu-300"}),
                    "--watch", "--watch-timeout", "900", env=env, timeout=1000)
        logs = {pool: (tmp_path / f"worker-{pool}.log").read_text() for pool in ("cpu", "gpu")}
        assert "Flow run finished successfully in 'Completed'" in output, output + logs["cpu"][-4000:]
        assert "training stages run in this process" in logs["cpu"] and "Running stage" not in logs["gpu"]

        # With a remote, the same run trains on the gpu pool, in a clone of the shared git remote.
        sh(cpu_checkout, "dvc", "remote", "add", "--local", "-d", "shared", remote, env=env)
        workspace = sh(cpu_checkout, "git", "status", "--porcelain", env=env), (cpu_checkout / "params.yaml").read_bytes()
        output = sh(cpu_checkout, prefect, "deployment", "run", "lora-mnist-pipeline/scheduled", "--params",
                    json.dumps({"overrides": {"pretrain.max_steps": 300}, "experiment_name": "gpu-300"}),
                    "--watch", "--watch-timeout", "900", env=env, timeout=1000)
        logs = {pool: (tmp_path / f"worker-{pool}.log").read_text() for pool in ("cpu", "gpu")}
        assert "Flow run finished successfully in 'Completed'" in output, output + logs["cpu"][-4000:] + logs["gpu"][-4000:]
    finally:
        for worker in workers:
            _stop(worker)

    # The training stages ran in the gpu machine's clone; the cpu machine ran the others.
    assert "Running stage 'pretrain'" in logs["gpu"] and "Running stage 'finetune'" in logs["gpu"]
    assert "Running stage 'evaluate'" in logs["cpu"] and "Running stage 'evaluate'" not in logs["gpu"]
    assert "pretrain on the gpu pool" in logs["cpu"]
    assert any((tmp_path / "dvc-remote" / "files" / "md5").iterdir())  # the outputs went through sshd
    training_runs = json.loads(sh(cpu_checkout, sys.executable, "-c", _FLOW_RUNS_SCRIPT, env=env))
    head = sh(cpu_checkout, "git", "rev-parse", "HEAD", env=env).strip()
    assert sorted(run["stage"] for run in training_runs) == ["finetune", "pretrain"]
    assert all(run["state"] == "COMPLETED" and run["work_pool"] == "gpu" and run["commit"] == head for run in training_runs)

    # The experiment holds the gpu pool's outputs; the cpu checkout itself is as it was.
    assert (sh(cpu_checkout, "git", "status", "--porcelain", env=env), (cpu_checkout / "params.yaml").read_bytes()) == workspace
    for name in ("cpu-300", "gpu-300"):
        assert changed_params(cpu_checkout, name, env) == {"pretrain.max_steps": (400, 300)}

    # That experiment's finetune entry does not describe this checkout's inputs: taking it back is refused.
    entry = yaml.safe_load(dvc.api.read("dvc.lock", repo=str(cpu_checkout), rev="gpu-300"))["stages"]["finetune"]
    lock_before = (cpu_checkout / "dvc.lock").read_bytes()
    with pytest.raises(HandoffRefused, match="the dvc.lock entry for finetune does not match this checkout"):
        accept_lock_entry("finetune", entry, cpu_checkout)
    assert (cpu_checkout / "dvc.lock").read_bytes() == lock_before

    # Same params, same seed, one machine: the gpu pool's weights and metrics are the in-process run's, bit for bit.
    for name in ("metrics/analyze.json", "metrics/finetune.json", "metrics/evaluate.json", "models/base.safetensors"):
        from_gpu_pool, in_process = (dvc.api.read(name, repo=str(cpu_checkout), rev=rev, mode="rb") for rev in ("gpu-300", "cpu-300"))
        assert from_gpu_pool == in_process, name


_DEPLOYMENT_SCRIPT = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    deployment = client.read_deployment_by_name("lora-mnist-train/gpu")
limit = deployment.global_concurrency_limit.limit if deployment.global_concurrency_limit else None
steps = [next(iter(step)).rsplit(".", 1)[-1] for step in deployment.pull_steps]
print(json.dumps({"concurrency_limit": limit, "steps": steps}))
"""

_FLOW_RUNS_SCRIPT = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lora-mnist-train"])))
print(json.dumps([{"stage": r.parameters["stage"], "commit": r.parameters["commit"], "state": r.state_type.value,
                   "work_pool": r.work_pool_name} for r in runs]))
"""

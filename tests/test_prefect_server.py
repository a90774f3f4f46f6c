"""A real Prefect server on 127.0.0.1 with a `cpu` and a `gpu` process worker in separate checkouts that
share only a DVC remote: the deployed pipeline sends its training stages to the gpu pool's worker."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_env, sh, use_dvc_cache

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
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


def _checkout(origin: Path, dest: Path, remote: Path, env: dict[str, str]) -> Path:
    sh(origin.parent, "git", "clone", "-q", str(origin), str(dest), env=env)
    sh(dest, "dvc", "remote", "add", "--local", "-d", "shared", str(remote), env=env)
    return dest


def test_deployed_pipeline_trains_on_the_gpu_pool_worker_and_matches_a_local_run(git_repo, prefect_env, tmp_path, dvc_cache):
    env = prefect_env
    remote = tmp_path / "dvc-remote"
    cpu_checkout = _checkout(git_repo, tmp_path / "cpu-machine", remote, env)
    gpu_checkout = _checkout(git_repo, tmp_path / "gpu-machine", remote, env)
    prefect = str(BIN / "prefect")
    for pool in ("cpu", "gpu"):
        sh(cpu_checkout, prefect, "work-pool", "create", pool, "--type", "process", env=env)
    sh(cpu_checkout, prefect, "--no-prompt", "deploy", "--all", env=env)

    workers = [
        _start([prefect, "worker", "start", "--pool", pool, "--type", "process"], checkout,
               dict(env, LORA_MNIST_CHECKOUT=str(checkout)), tmp_path / f"worker-{pool}.log")
        for pool, checkout in (("cpu", cpu_checkout), ("gpu", gpu_checkout))
    ]
    try:
        output = sh(cpu_checkout, prefect, "deployment", "run", "lora-mnist-pipeline/scheduled",
                    "--watch", "--watch-timeout", "900", env=env, timeout=1000)
        logs = {pool: (tmp_path / f"worker-{pool}.log").read_text() for pool in ("cpu", "gpu")}
        assert "Flow run finished successfully in 'Completed'" in output, output + logs["cpu"][-4000:]
    finally:
        for worker in workers:
            _stop(worker)

    # The training stages ran in the gpu machine's checkout; the cpu machine ran the others.
    assert "Running stage 'pretrain'" in logs["gpu"] and "Running stage 'finetune'" in logs["gpu"]
    assert "Running stage 'pretrain'" not in logs["cpu"] and "Running stage 'finetune'" not in logs["cpu"]
    assert "Running stage 'evaluate'" in logs["cpu"] and "Running stage 'evaluate'" not in logs["gpu"]
    assert "pretrain on the gpu pool" in logs["cpu"]
    training_runs = json.loads(sh(cpu_checkout, sys.executable, "-c", _FLOW_RUNS_SCRIPT, env=env))
    assert sorted(run["stage"] for run in training_runs) == ["finetune", "pretrain"]
    assert all(run["state"] == "COMPLETED" and run["work_pool"] == "gpu" for run in training_runs)

    # The cpu checkout holds every output and DVC finds it consistent.
    assert "Data and pipelines are up to date" in sh(cpu_checkout, "dvc", "status", "dvc.yaml", env=env)

    # Same params, same seed, one machine: a local `dvc repro` gives identical weights and metrics.
    local = tmp_path / "local-run"
    sh(git_repo.parent, "git", "clone", "-q", str(git_repo), str(local), env=env)
    use_dvc_cache(local, dvc_cache)  # stages that other tests ran with these params come from the run cache
    sh(local, "dvc", "repro", env=env)
    for name in ("metrics/analyze.json", "metrics/finetune.json", "metrics/evaluate.json"):
        assert (cpu_checkout / name).read_text() == (local / name).read_text(), name
    assert (cpu_checkout / "models/base.safetensors").read_bytes() == (local / "models/base.safetensors").read_bytes()


_FLOW_RUNS_SCRIPT = """
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lora-mnist-train"])))
print(json.dumps([{"stage": r.parameters["stage"], "state": r.state_type.value, "work_pool": r.work_pool_name} for r in runs]))
"""

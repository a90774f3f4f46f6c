"""Fixtures; the helpers they use live in tests/helpers.py."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import SHORT_SCHEDULE, copy_working_tree, init_repo, set_params, small_params, start_sshd, write_synthetic_mnist

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first: on two workers, a minutes-long test that starts last leaves the other worker idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding params.yaml and synthetic IDX files in data/mnist/raw/."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params()))
    write_synthetic_mnist(tmp_path / "data" / "mnist" / "raw")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The working tree copied into a fresh directory (not yet a git repo)."""
    return copy_working_tree(tmp_path / "repo")


@pytest.fixture(scope="session")
def dvc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One DVC cache for the session's test repos: a stage that another test already ran with the same code,
    params and inputs comes from DVC's run cache."""
    return tmp_path_factory.mktemp("dvc-cache")


@pytest.fixture
def git_repo(repo_copy: Path, dvc_cache: Path) -> Path:
    """The working tree in a fresh git repo with one commit, set to a short training schedule, on the shared
    DVC cache."""
    set_params(repo_copy / "params.yaml", **SHORT_SCHEDULE)
    return init_repo(repo_copy, dvc_cache=dvc_cache)


@pytest.fixture
def pipeline_repo(repo_copy: Path, dvc_cache: Path) -> Path:
    """As git_repo, with the main pipeline alone: experiments/, a second pipeline every `dvc` command would also
    collect, is left out of the copy."""
    shutil.rmtree(repo_copy / "experiments")
    set_params(repo_copy / "params.yaml", **SHORT_SCHEDULE)
    return init_repo(repo_copy, dvc_cache=dvc_cache)


@pytest.fixture
def ssh_server(tmp_path: Path):
    """A real sshd on 127.0.0.1 for this test: yields the environment that logs in to it; stopped afterwards."""
    import signal

    server, env = start_sshd(tmp_path / "sshd")
    try:
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)

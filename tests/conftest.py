"""Shared fixtures: a small synthetic MNIST in IDX format, and a project directory to run stages in."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from lora.data import SPLIT_FILES
from lora.files import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (magic 0x000008<ndim>, big-endian int32 dims)."""
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.contiguous().numpy().tobytes())


# In the synthetic test split, half of the 7s are drawn as 1s: 7 is the digit any model gets most wrong.
HARD_DIGIT, DRAWN_AS = 7, 1


def synthetic_digits(count: int, seed: int, hard: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: each class lights its own block of pixels, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count, dtype=torch.uint8) % 10
    images = torch.randint(0, 60, (count, 28, 28), generator=generator, dtype=torch.uint8)
    for index, label in enumerate(labels.tolist()):
        if hard and label == HARD_DIGIT and index % 20 < 10:
            label = DRAWN_AS
        row = (label // 5) * 14
        col = (label % 5) * 5
        images[index, row : row + 10, col : col + 5] = 255
    return images, labels


def write_synthetic_mnist(raw_dir: Path, train: int = 300, test: int = 200) -> dict[str, str]:
    """The four IDX files with synthetic content; returns their sha256 like lora.data.MNIST_SHA256."""
    for split, count, seed in (("train", train, 1), ("test", test, 2)):
        images, labels = synthetic_digits(count, seed, hard=split == "test")
        image_name, label_name = SPLIT_FILES[split]
        write_idx(raw_dir / image_name, images)
        write_idx(raw_dir / label_name, labels)
    return {name: file_sha256(raw_dir / name) for names in SPLIT_FILES.values() for name in names}


def small_params() -> dict:
    """The project's params.yaml with a schedule and model small enough for unit tests."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"hidden_1": 64, "hidden_2": 32}
    params["pretrain"].update({"epochs": 2, "batch_size": 10, "max_steps": None})
    params["finetune"].update({"steps": 20})
    params["download"].update({"sources": ["local"], "source_dir": None})
    params["device"] = "cpu"
    return params


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding params.yaml and synthetic IDX files in data/mnist/raw/."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params()))
    write_synthetic_mnist(tmp_path / "data" / "mnist" / "raw")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(path: Path, **changes: object) -> None:
    """Change dotted keys of params.yaml in place, comments kept: set_params(p, **{"lora.rank": 2})."""
    from dvc.utils.serialize import modify_yaml

    with modify_yaml(path) as params:
        for dotted, value in changes.items():
            section = params
            *parents, key = dotted.split(".")
            for parent in parents:
                section = section[parent]
            section[key] = value


def run_env() -> dict[str, str]:
    """Environment for commands in test repos: this venv first on PATH, a git identity, local MNIST if any."""
    import os
    import sys

    from lora.data import MNIST_SHA256

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for role in ("AUTHOR", "COMMITTER"):
        env[f"GIT_{role}_NAME"] = "lora-mnist tests"
        env[f"GIT_{role}_EMAIL"] = "tests@lora-mnist.invalid"
    local = ROOT / "data" / "mnist" / "raw"
    if all((local / name).is_file() for name in MNIST_SHA256):
        env["MNIST_SOURCE_DIR"] = str(local)  # reuse this checkout's download; a fresh clone uses npm
    return env


def sh(cwd: Path, *command: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    """Run a command, fail the test with its output if it fails, return stdout + stderr."""
    import subprocess

    result = subprocess.run(command, cwd=cwd, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


SHORT_SCHEDULE = {"pretrain.max_steps": 400, "finetune.steps": 40}


@pytest.fixture
def git_repo(repo_copy: Path) -> Path:
    """The working tree in a fresh git repo with one commit, set to a short training schedule."""
    set_params(repo_copy / "params.yaml", **SHORT_SCHEDULE)
    sh(repo_copy, "git", "init", "-q")
    sh(repo_copy, "git", "add", "-A")
    sh(repo_copy, "git", "commit", "-qm", "short schedule")
    return repo_copy


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The working tree (tracked and untracked, not ignored) copied into a fresh git repo with one commit."""
    import subprocess

    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    dest = tmp_path / "repo"
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest

"""What the tests share: a small synthetic MNIST in IDX format, a user's own small model for the library's
tests, params for quick stage runs, and commands run in temporary repositories."""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from torch import nn

from lora.files import file_sha256
from lora_mnist.download import MNIST_SHA256, SPLIT_FILES
from tools.code_deps import imported_modules, project_modules, source_closure  # noqa: F401 (tests import them from here)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("linear1", "linear2", "linear3")


class TinyMLP(nn.Module):
    """Someone's own model, as the library sees it: three nn.Linear layers with ReLU between."""

    def __init__(self, hidden_1: int = 1000, hidden_2: int = 2000) -> None:
        super().__init__()
        self.linear1, self.linear2, self.linear3 = nn.Linear(784, hidden_1), nn.Linear(hidden_1, hidden_2), nn.Linear(hidden_2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear3(torch.relu(self.linear2(torch.relu(self.linear1(x.reshape(x.shape[0], -1))))))


def small_base(seed: int = 0) -> TinyMLP:
    """The PEFT-oracle tests' base model: a seeded TinyMLP(40, 30) in eval mode, the same on every call."""
    torch.manual_seed(seed)
    return TinyMLP(40, 30).eval()


def one_line_error(main, capsys) -> str:
    """Run a stage's command-line entry point (``stages.<stage>.main``) in this process, as `python -m` would;
    it must exit with status 2 and one line on stderr, which is returned."""
    import pytest

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (magic 0x000008<ndim>, big-endian int32 dims)."""
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.contiguous().numpy().tobytes())


# In the synthetic test split, half of the 7s are drawn as 1s: 7 is the digit any model gets most wrong.
HARD_DIGIT, DRAWN_AS = 7, 1


def synthetic_digits(count: int, seed: int, hard: torch.Tensor | bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable fake digits: each class lights its own block of pixels, plus noise; where ``hard`` (all images, or a
    mask) half of HARD_DIGIT's images are drawn as DRAWN_AS."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count, dtype=torch.uint8) % 10
    images = torch.randint(0, 60, (count, 28, 28), generator=generator, dtype=torch.uint8)
    hard_mask = torch.full((count,), bool(hard)) if isinstance(hard, bool) else hard
    for index, label in enumerate(labels.tolist()):
        if hard_mask[index] and label == HARD_DIGIT and index % 20 < 10:
            label = DRAWN_AS
        row = (label // 5) * 14
        col = (label % 5) * 5
        images[index, row : row + 10, col : col + 5] = 255
    return images, labels


SYNTHETIC_VALIDATION = 100  # of the 300 synthetic training images, held out as small_params says


def write_synthetic_mnist(raw_dir: Path, train: int = 300, test: int = 200) -> dict[str, str]:
    """The four IDX files with synthetic content; returns their sha256 like lora_mnist.download.MNIST_SHA256. The
    hard digit is hard in the test set and in the validation images, never in the images models train on."""
    from lora_mnist.data import validation_split

    held_out = torch.zeros(train, dtype=torch.bool)
    held_out[validation_split(train, min(SYNTHETIC_VALIDATION, train - 1), seed=0)[1]] = True
    for split, count, seed, hard in (("train", train, 1, held_out), ("test", test, 2, True)):
        images, labels = synthetic_digits(count, seed, hard=hard)
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
    params["data"].update({"validation": SYNTHETIC_VALIDATION, "split_seed": 0})
    params["device"] = "cpu"
    return params


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
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
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
    result = subprocess.run(command, cwd=cwd, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def copy_working_tree(dest: Path) -> Path:
    """The working tree (tracked and untracked, not ignored) copied into ``dest``."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


# Pipelines in temporary repos train this long (the one full-length run is tests/test_pipeline_e2e.py's).
SHORT_SCHEDULE = {"pretrain.max_steps": 400, "finetune.steps": 40}


def init_repo(repo: Path, message: str = "short schedule", dvc_cache: Path | None = None) -> Path:
    """``repo`` as a git repo with one commit; with ``dvc_cache``, DVC's cache (and so its run cache) is that
    shared directory, as on a machine where several checkouts share one: a stage run once with the same code,
    params and inputs is restored instead of run again."""
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)
    if dvc_cache is not None:
        use_dvc_cache(repo, dvc_cache)
    return repo


def use_dvc_cache(repo: Path, dvc_cache: Path) -> None:
    """Point ``repo``'s DVC cache at ``dvc_cache`` in its git-ignored local config (`dvc cache dir --local`)."""
    (repo / ".dvc" / "config.local").write_text(f"[cache]\n    dir = {dvc_cache}\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sshd(directory: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """Debian's sshd on a free 127.0.0.1 port, with keys generated in ``directory``; returns the process and the
    environment under which ssh clients (git, DVC's asyncssh) log in to it: a HOME whose ~/.ssh holds the key and
    the server's host key, as on a user's machine."""
    home = directory / "home"
    (home / ".ssh").mkdir(parents=True)
    for key in (directory / "host_ed25519", home / ".ssh" / "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    shutil.copy(home / ".ssh" / "id_ed25519.pub", directory / "authorized_keys")
    port = free_port()
    host_key = (directory / "host_ed25519.pub").read_text().split()
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (directory / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {directory / 'host_ed25519'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}", f"PidFile {directory / 'sshd.pid'}",
        "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "Subsystem sftp internal-sftp", "",
    ]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory, absent until it first runs
    server = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(directory / "sshd_config")],
                              stdout=open(directory / "sshd.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None, (directory / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd did not listen within 20 s"
            time.sleep(0.2)
    env = {"HOME": str(home), "SSH_USER": getpass.getuser(), "SSH_PORT": str(port),
           "LORA_KERNEL_CACHE": os.environ.get("LORA_KERNEL_CACHE") or str(Path.home() / ".cache" / "lora-mnist")}
    return server, env


def changed_params(repo: Path, experiment: str, env: dict[str, str] | None = None) -> dict[str, tuple]:
    """{key: (value at HEAD, value in ``experiment``)} for each param `dvc params diff` finds changed."""
    diff = json.loads(sh(repo, "dvc", "params", "diff", "HEAD", experiment, "--json", env=env))
    return {key: (change["old"], change["new"]) for key, change in diff.get("params.yaml", {}).items()}


@contextmanager
def dask_cluster(worker_dir: Path, env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """A Dask scheduler and one single-threaded worker on 127.0.0.1, as `dask scheduler` and `dask worker` start
    them, the worker in ``worker_dir`` under ``env``; yields the scheduler's address and stops both afterwards."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    commands = {
        "scheduler": ([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                       address.rsplit(":", 1)[1], "--no-dashboard"], log_dir),
        "worker": ([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1",
                    "--host", "127.0.0.1", "--no-dashboard", "--no-nanny"], worker_dir),
    }
    processes = []
    try:
        for name, (command, cwd) in commands.items():
            with open(log_dir / f"dask-{name}.log", "w") as log:
                processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
        with Client(address, timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for process in reversed(processes):  # the worker first: without its scheduler it waits to reconnect
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

"""DVC as the flows see it: run one stage, ask whether it is up to date, apply `-S`-style overrides, save
an experiment, and move a workspace between machines through a DVC remote."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lora_mnist.errors import EXPECTED_ERRORS
from lora_mnist.io import write_text
from tasks.check_params import check
from tasks.params import PARAMS_FILE, ParamsError, load_raw, set_dotted, with_overrides

# Order of dvc.yaml's DAG; the flows run the stages in this order.
STAGES = ("check_params", "download", "pretrain", "analyze", "finetune", "evaluate")
TRAINING_STAGES = ("pretrain", "finetune")
LOCK_FILE = Path(".dvc/tmp/lora-mnist-flow.lock")


class StageFailed(RuntimeError):
    """A DVC command failed; the message carries its first error line, the stage's own when it has one."""


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the dvc CLI of this environment in the current checkout."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or line.startswith("ERROR:")]
        raise StageFailed(f"dvc {' '.join(args)} failed: {(errors or lines or ['no output'])[0].strip()}")
    return result


@contextmanager
def one_line_errors() -> Iterator[None]:
    """For the flow commands: a known failure becomes one line on stderr and exit status 2."""
    try:
        yield
    except (*EXPECTED_ERRORS, ParamsError, StageFailed, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # Prefect has logged the traceback already
        sys.exit(2)


def is_up_to_date(stage: str) -> bool:
    return json.loads(dvc("status", "--json", stage).stdout or "{}") == {}


def reproduce(stage: str, log: Callable[[str], Any]) -> None:
    """`dvc repro --single-item <stage>`: runs the stage, records it in dvc.lock, logs its output line by line."""
    for line in dvc("repro", "--single-item", stage).stdout.splitlines():
        log(line)


def validate_overrides(overrides: dict[str, Any]) -> None:
    """Refuse, before anything runs, an override of an unknown key or to a value params.yaml forbids."""
    params = with_overrides(load_raw(PARAMS_FILE), overrides)  # raises ParamsError naming the bad value
    check(params, f"{PARAMS_FILE} with overrides {overrides}")  # what check_params adds: lora, backend


def apply_overrides(overrides: dict[str, Any]) -> None:
    """Set dotted keys in params.yaml like `dvc exp run -S key=value`, after validating them."""
    from dvc.utils.serialize import modify_yaml  # keeps params.yaml's comments and order

    validate_overrides(overrides)
    with modify_yaml(PARAMS_FILE) as data:
        for dotted, value in overrides.items():
            set_dotted(data, dotted, value)


def set_param_args(overrides: dict[str, Any]) -> list[str]:
    """The `-S key=value` arguments of `dvc exp run` for ``overrides`` (values as YAML, as DVC parses them)."""
    args = []
    for key, value in overrides.items():
        args += ["-S", f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return args


def save_experiment(name: str) -> str:
    """Record the workspace (params, dvc.lock, metrics) as a DVC experiment, like `dvc exp run` does."""
    dvc("exp", "save", "--force", "--name", name, "dvc.yaml")  # the main pipeline; experiments/ has its own outputs
    return name


@contextmanager
def checkout_lock(timeout_s: float = 3600.0, poll_s: float = 1.0) -> Iterator[None]:
    """One pipeline run per checkout at a time: a second one waits here instead of corrupting the first."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "w") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another pipeline run held {LOCK_FILE} for over {timeout_s:.0f} s") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- moving a workspace between checkouts (training on another machine) --------------------------------

def git_tracked_outputs() -> list[str]:
    """Paths that DVC does not cache (metrics, plots, dvclive curves): they travel as text, not via the remote."""
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    paths = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    (path, options), = entry.items()
                    if options and options.get("cache") is False:
                        paths.append(path)
    return paths


def snapshot() -> dict[str, str]:
    """params.yaml, dvc.lock and every git-tracked output, as {path: text} (directories expanded)."""
    files: dict[str, str] = {}
    for name in ["params.yaml", "dvc.lock", *git_tracked_outputs()]:
        path = Path(name)
        candidates = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
        for candidate in candidates:
            if candidate.is_file() and candidate.suffix != ".png":
                files[str(candidate)] = candidate.read_text()
    return files


def restore(files: dict[str, str]) -> None:
    for name, text in files.items():
        write_text(name, text)


def has_default_remote() -> bool:
    """Whether DVC has a default remote: `dvc remote default` exits 1 (printing a message) when there is none."""
    result = dvc("remote", "default", check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


def _exchange_path(exchange_id: str, name: str) -> tuple[Any, str]:
    from dvc.repo import Repo

    with Repo(".") as repo:
        remote = repo.cloud.get_remote()
    return remote.fs, remote.fs.join(remote.path, "lora-mnist-exchange", exchange_id, name)


def send(exchange_id: str, name: str, files: dict[str, str]) -> None:
    """Put a workspace snapshot beside the DVC remote's objects, where the other checkout can read it."""
    fs, path = _exchange_path(exchange_id, name)
    fs.makedirs(fs.parent(path), exist_ok=True)
    fs.pipe(path, json.dumps(files).encode())


def receive(exchange_id: str, name: str) -> dict[str, str]:
    fs, path = _exchange_path(exchange_id, name)
    return json.loads(fs.cat(path))

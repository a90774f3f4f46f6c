"""DVC and git as the flows see them: run one stage, ask whether it is up to date, apply `-S`-style
overrides, save an experiment, and give a run with overrides a workspace of its own."""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_mnist.errors import EXPECTED_ERRORS
from tasks.check_params import check
from tasks.params import PARAMS_FILE, ParamsError, load_raw, set_dotted, with_overrides

# Order of dvc.yaml's DAG; the flows run the stages in this order.
STAGES = ("check_params", "download", "pretrain", "analyze", "finetune", "evaluate")
TRAINING_STAGES = ("pretrain", "finetune")
LOCK_FILE = Path(".dvc/tmp/lora-mnist-flow.lock")
SAVE_LOCK_FILE = Path(".dvc/tmp/lora-mnist-exp-save.lock")  # `dvc exp save` in two worktrees at once races on git refs


class StageFailed(RuntimeError):
    """A DVC or git command failed; the message carries its first error line, the stage's own when it has one."""


def _command(program: list[str], args: tuple[str, ...], cwd: Path | None, check: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([*program, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if check and result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.lower().startswith(("error:", "fatal:"))]
        name = Path(program[-1]).name
        raise StageFailed(f"{name} {' '.join(args)} failed: {(errors or lines or ['no output'])[0].strip()}")
    return result


def dvc(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run the dvc CLI of this environment in ``cwd`` (the current checkout by default)."""
    return _command([sys.executable, "-m", "dvc"], args, cwd, check)


def git(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return _command(["git"], args, cwd, check)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """For the flow commands: a known failure becomes one line on stderr and exit status 2."""
    try:
        yield
    except (*EXPECTED_ERRORS, OSError, ParamsError, StageFailed, ValueError) as exc:  # OSError: a lock timeout too
        print(f"error: {exc}", file=sys.stderr)  # Prefect has logged the traceback already
        sys.exit(2)


def is_up_to_date(stage: str, cwd: Path | None = None) -> bool:
    return json.loads(dvc("status", "--json", stage, cwd=cwd).stdout or "{}") == {}


def reproduce(stage: str, log: Callable[[str], Any], cwd: Path | None = None) -> None:
    """`dvc repro --single-item <stage>`: runs the stage, records it in dvc.lock, logs its output line by line."""
    for line in dvc("repro", "--single-item", stage, cwd=cwd).stdout.splitlines():
        log(line)


def validate_overrides(overrides: dict[str, Any], params_file: Path = PARAMS_FILE) -> None:
    """Refuse, before anything runs, an override of an unknown key or to a value params.yaml forbids."""
    params = with_overrides(load_raw(params_file), overrides)  # raises ParamsError naming the bad value
    check(params, f"{PARAMS_FILE} with overrides {overrides}")  # what check_params adds: lora, backend


def apply_overrides(overrides: dict[str, Any], params_file: Path = PARAMS_FILE) -> None:
    """Set dotted keys in ``params_file`` like `dvc exp run -S key=value`, after validating them."""
    from dvc.utils.serialize import modify_yaml  # keeps params.yaml's comments and order

    validate_overrides(overrides, params_file)
    with modify_yaml(params_file) as data:
        for dotted, value in overrides.items():
            set_dotted(data, dotted, value)


def save_experiment(name: str, cwd: Path | None = None) -> str:
    """Record the workspace (params, dvc.lock, metrics) as a DVC experiment, like `dvc exp run` does."""
    dvc("exp", "save", "--name", name, "dvc.yaml", cwd=cwd)  # the main pipeline; experiments/ has its own
    return name


def experiment_exists(name: str, cwd: Path | None = None) -> bool:
    """Whether HEAD has a DVC experiment ``name`` already (DVC keeps it as the git ref refs/exps/<HEAD>/<name>)."""
    head = git("rev-parse", "HEAD", cwd=cwd).stdout.strip()
    ref = f"refs/exps/{head[:2]}/{head[2:]}/{name}"
    return git("show-ref", "--verify", "--quiet", ref, cwd=cwd, check=False).returncode == 0


WORKSPACES = Path(".dvc/tmp/flow-workspaces")
EXPERIMENT_NAME_LIMIT = 100
EXPERIMENT_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{EXPERIMENT_NAME_LIMIT - 1}}}")


def validate_experiment_name(name: Any) -> str:
    """A name DVC takes for an experiment and that is one directory under WORKSPACES."""
    if isinstance(name, str) and len(name) > EXPERIMENT_NAME_LIMIT:
        raise ValueError(f"experiment name {name!r} is {len(name)} characters long: at most {EXPERIMENT_NAME_LIMIT} "
                         "are allowed")
    if not isinstance(name, str) or not EXPERIMENT_NAME.fullmatch(name) or name.endswith((".lock", ".")) or ".." in name:
        raise ValueError(f"experiment name {name!r} is invalid: letters, digits, '_', '.' and '-', starting with a "
                         "letter or digit, are allowed")
    return name


@contextmanager
def experiment_workspace(name: str) -> Iterator[Path]:
    """A workspace of the run's own, as `dvc exp run --temp` makes one, so concurrent runs never share a
    params.yaml: a git worktree of HEAD with this checkout's uncommitted changes to tracked files, on its DVC
    cache and config, with the outputs dvc.lock names checked out from the cache. Removed afterwards; the
    experiment saved in it stays (`dvc exp show`, `dvc exp apply`)."""
    root = Path.cwd().resolve()
    path = root / WORKSPACES / name
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()  # claims the name atomically; git fills the empty directory
    except FileExistsError:
        raise ValueError(f"experiment name {name!r} is taken by another flow run, or by one that stopped without "
                         f"cleaning up ({path}: remove it with `git worktree remove --force {path}`)") from None
    try:
        with checkout_lock():  # `git stash create` takes .git/index.lock, and a run in the checkout rewrites dvc.lock
            git("worktree", "add", "--detach", "-q", str(path), "HEAD")
            changes = git("stash", "create").stdout.strip()  # a commit of the uncommitted changes; the checkout is untouched
        if changes:
            git("checkout", changes, "--", ".", cwd=path)
            git("reset", "-q", cwd=path)
        use_checkout_dvc_config(root, path)
        dvc("checkout", "--allow-missing", cwd=path, check=False)  # what the cache lacks, the stages rebuild
        yield path
    finally:
        git("worktree", "remove", "--force", str(path), check=False)
        shutil.rmtree(path, ignore_errors=True)
        git("worktree", "prune", check=False)


def use_checkout_dvc_config(root: Path, workspace: Path) -> None:
    """``workspace`` on ``root``'s DVC cache and remotes: its config.local copied, then every remote's URL and the
    cache directory as ``root`` resolves them (DVC writes local paths relative to the config file)."""
    from dvc.repo import Repo

    if (root / ".dvc" / "config.local").is_file():
        shutil.copy2(root / ".dvc" / "config.local", workspace / ".dvc" / "config.local")
    with Repo(str(root)) as repo:
        config = repo.config
        remotes = {name: options["url"] for name, options in config["remote"].items()}
        default, cache_dir = config["core"].get("remote"), repo.cache.local_cache_dir
    for name, url in remotes.items():
        dvc("remote", "add", "--local", "--force", name, url, cwd=workspace)
    if default:
        dvc("remote", "default", "--local", default, cwd=workspace)
    dvc("cache", "dir", "--local", str(cache_dir), cwd=workspace)


@contextmanager
def checkout_lock(lock_file: Path = LOCK_FILE, timeout_s: float = 3600.0, poll_s: float = 1.0) -> Iterator[None]:
    """One pipeline run per checkout at a time, and no workspace snapshot while one runs: the second waits here
    instead of corrupting or copying the first's half-written files."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another pipeline run held {lock_file} for over {timeout_s:.0f} s") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def has_default_remote(cwd: Path | None = None) -> bool:
    """Whether DVC has a default remote: `dvc remote default` exits 1 (printing a message) when there is none."""
    result = dvc("remote", "default", cwd=cwd, check=False)
    return result.returncode == 0 and bool(result.stdout.strip())

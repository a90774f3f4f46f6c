"""DVC and git as the flows call them: this environment's CLIs in a subprocess, a failure as one line."""
from __future__ import annotations

import argparse
import graphlib
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, NoReturn


EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # what DVC and git take as one experiment ref


class CommandFailed(RuntimeError):
    """A DVC or git command failed; the message carries its first error line."""


def _run(name: str, program: list[str], args: tuple[str, ...], cwd: Path | None) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run([*program, *args], capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.lower().startswith(("error:", "fatal:"))]
        raise CommandFailed(f"{name} {' '.join(args)} failed: {(errors or lines or ['no output'])[0]}")
    return result.stdout


def dvc(*args: str, cwd: Path | None = None) -> str:
    # Concurrent points each take the repo's lock for a few seconds; DVC's own retries give up after 3 s.
    return _run("dvc", [sys.executable, "-m", "dvc", "--wait-for-lock"], args, cwd)


def git(*args: str, cwd: Path | None = None) -> str:
    return _run("git", ["git"], args, cwd)


def dag(*args: str, cwd: Path | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """The nodes and the (upstream, downstream) edges of `dvc dag --dot ARGS`: stages, or with --outs outputs."""
    dot = dvc("dag", "--dot", *args, cwd=cwd)
    return re.findall(r'^"([^"]+)";$', dot, re.M), re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M)


def stage_order(cwd: Path | None = None) -> list[str]:
    """dvc.yaml's stages in an order DVC can run them, from `dvc dag`."""
    nodes, edges = dag(cwd=cwd)
    graph: dict[str, set[str]] = {name: set() for name in nodes}
    for upstream, downstream in edges:
        graph[downstream].add(upstream)
    order = graphlib.TopologicalSorter(graph).static_order()
    return [name for name in order if ":" not in name]  # experiments/dvc.yaml's stages are named file:stage


def how_ran(output: str, stage: str) -> str:
    """What `dvc repro` or `dvc exp run` printed of ``stage``: "here", "run cache" (its outputs restored), or "skipped"."""
    if f"Running stage '{stage}'" in output:
        return "here"
    return "run cache" if f"Stage '{stage}' is cached" in output else "skipped"


def set_params(overrides: dict[str, Any]) -> list[str]:
    """``{"lora.rank": 4}`` as `dvc exp run` arguments, each value written as YAML reads it back."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def experiment_metrics(names: list[str], cwd: Path | None = None, files: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """Each experiment's metrics, by file, from `dvc exp show --json` (one call for all), and ``files`` (JSON outputs
    git keeps, not metrics) read from the experiment's commit."""
    found = {}
    for commit in json.loads(dvc("exp", "show", "--json", "--no-fetch", cwd=cwd) or "[]"):
        for experiment in commit.get("experiments") or []:
            for rev in experiment["revs"]:
                if rev.get("name") in names:
                    found[rev["name"]] = {path: value.get("data", {}) for path, value in (rev["data"].get("metrics") or {}).items()}
                    found[rev["name"]].update({str(f): json.loads(git("show", f"{rev['rev']}:{f}", cwd=cwd)) for f in files})
    return found


def check_names(names: list[Any]) -> list[str]:
    """Names DVC takes for new experiments of HEAD, from one `dvc exp list` (DVC refuses a taken one too, but only
    once it runs)."""
    for name in names:
        if not isinstance(name, str) or not EXPERIMENT_NAME.fullmatch(name) or name.endswith((".lock", ".")) or ".." in name:
            raise ValueError(f"experiment name {name!r} is invalid: up to 100 letters, digits, '_', '.' and '-', "
                             "starting with a letter or digit, are allowed")
    for name in names:  # `dvc exp apply NAME` takes a git revision of that name before an experiment
        try:
            git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
        except CommandFailed:
            continue
        raise ValueError(f"experiment name {name!r} is a git revision here (a branch, tag or commit), which "
                         f"`dvc exp apply {name}` would take instead: choose another")
    existing = set(dvc("exp", "list", "--name-only").split())
    if taken := [name for name in names if name in existing]:
        raise ValueError(f"experiment name {taken[0]!r} is taken by an experiment of HEAD: choose another, or "
                         f"`dvc exp remove {taken[0]}` first")
    return names


class CommandLine(argparse.ArgumentParser):
    """The flow commands' parser: a bad argument is one line on stderr (argparse's usage block left out), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def prefect_api_url() -> str | None:
    """The configured Prefect server's URL, or None: a flow then starts a temporary server of its own."""
    from prefect.settings import get_current_settings

    return os.environ.get("PREFECT_API_URL") or get_current_settings().api.url


def require_prefect_api() -> None:
    """A configured Prefect server must answer before a flow starts: one line, not Prefect's 100-line traceback."""
    if not (url := prefect_api_url()):
        return
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10).close()
    except (OSError, ValueError) as exc:
        raise CommandFailed(f"PREFECT_API_URL={url!r}: no Prefect server answers there ({exc}); start one, or unset "
                            "it for a temporary server") from None


def use_project_prefect_home() -> None:
    """Entry points only: Prefect keeps its database and logs inside the project (git-ignored) unless told otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")  # 20 s is too short on a busy 2-core machine

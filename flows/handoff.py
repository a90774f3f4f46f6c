"""The GPU hand-off in DVC's and git's own terms: a training stage leaves as a commit, params and the
dvc.lock entries of the stages before it; it comes back as its own dvc.lock entry, whose outputs `dvc pull`
fetches from the remote by their hashes.

Both directions are checked against dvc.yaml before anything is written: an entry may name only the stage's
declared command, dependencies, params and outputs, so nothing that comes back can reach a code file, a path
outside the stage's outputs or outside the checkout.
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from flows.dvc_stage import STAGES, StageFailed, dvc
from lora_mnist.io import write_text

LOCK = Path("dvc.lock")
HASH = re.compile(r"[0-9a-f]{32}(\.dir)?")
COMMIT = re.compile(r"[0-9a-f]{40}")


class HandoffRefused(ValueError):
    """A training request or a returned lock entry names something that dvc.yaml does not declare."""


def declared(stage: str, root: Path) -> dict[str, Any]:
    """What dvc.yaml declares for ``stage``: its cmd, deps, params and outputs (outs, metrics and plots)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]
    outs = [next(iter(entry)) if isinstance(entry, dict) else entry
            for kind in ("outs", "metrics", "plots") for entry in spec.get(kind, [])]
    params = [next(iter(p)) if isinstance(p, dict) else p for p in spec.get("params", [])]
    return {"cmd": spec["cmd"], "deps": sorted(spec.get("deps", [])), "params": sorted(params), "outs": sorted(outs)}


def check_lock_entry(stage: str, entry: Any, root: Path) -> None:
    """Refuse a dvc.lock entry for ``stage`` unless it names exactly what dvc.yaml declares, with DVC hashes."""
    where = f"the dvc.lock entry for {stage}"
    if not isinstance(entry, dict) or not set(entry) <= {"cmd", "deps", "params", "outs"}:
        raise HandoffRefused(f"{where} is not a mapping of cmd, deps, params and outs")
    spec = declared(stage, root)
    if entry.get("cmd") != spec["cmd"]:
        raise HandoffRefused(f"{where} has cmd {entry.get('cmd')!r}; dvc.yaml declares {spec['cmd']!r}")
    for kind in ("deps", "outs"):
        files = entry.get(kind, [])
        if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
            raise HandoffRefused(f"{where}: {kind} must be a list of entries with a path")
        for item in files:
            path = PurePosixPath(item["path"])
            if path.is_absolute() or ".." in path.parts:
                raise HandoffRefused(f"{where}: {kind} path {item['path']!r} escapes the checkout")
            if item["path"] not in spec[kind]:
                raise HandoffRefused(f"{where}: {kind} path {item['path']!r} is not one dvc.yaml declares for {stage}: "
                                     f"{', '.join(spec[kind])}")
            if not HASH.fullmatch(str(item.get("md5", ""))):
                raise HandoffRefused(f"{where}: {item['path']!r} has no DVC md5 hash")
        if sorted(item["path"] for item in files) != spec[kind]:
            raise HandoffRefused(f"{where} lists {kind} {sorted(f['path'] for f in files)}; dvc.yaml declares {spec[kind]}")
    params = entry.get("params", {})
    if set(params) - {"params.yaml"} or sorted(params.get("params.yaml", {})) != spec["params"]:
        raise HandoffRefused(f"{where} records params {params!r}; dvc.yaml declares params.yaml: {spec['params']}")


def upstream_entries(stage: str, root: Path) -> dict[str, Any]:
    """The dvc.lock entries of the stages before ``stage``: what a worker needs to `dvc pull` its inputs."""
    lock = yaml.safe_load((root / LOCK).read_text()) if (root / LOCK).is_file() else {}
    before = STAGES[: STAGES.index(stage)]
    return {name: entry for name, entry in (lock or {}).get("stages", {}).items() if name in before}


def check_upstream(stage: str, entries: Any, root: Path) -> None:
    """Refuse a request whose lock entries are not those of stages before ``stage``, each as dvc.yaml declares it."""
    if not isinstance(entries, dict) or not set(entries) <= set(STAGES[: STAGES.index(stage)]):
        names = sorted(entries) if isinstance(entries, dict) else entries
        raise HandoffRefused(f"the request's dvc.lock entries {names!r} are not stages before {stage}")
    for name, entry in entries.items():
        check_lock_entry(name, entry, root)


def check_commit(commit: Any) -> str:
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        raise HandoffRefused(f"commit={commit!r} is invalid: a full 40-character git commit id is allowed")
    return commit


def write_lock_entries(entries: dict[str, Any], root: Path) -> str:
    """Put ``entries`` into dvc.lock (atomically); returns the previous text, for :func:`restore_lock`."""
    path = root / LOCK
    before = path.read_text() if path.is_file() else ""
    lock = yaml.safe_load(before) or {"schema": "2.0", "stages": {}}
    lock.setdefault("stages", {}).update(entries)
    write_text(path, yaml.safe_dump(lock, sort_keys=False))
    return before


def restore_lock(text: str, root: Path) -> None:
    if text:
        write_text(root / LOCK, text)
    else:
        (root / LOCK).unlink(missing_ok=True)


def lock_entry(stage: str, root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / LOCK).read_text())["stages"][stage]


def accept_lock_entry(stage: str, entry: Any, root: Path) -> None:
    """Take a stage's dvc.lock entry back from a worker: checked against dvc.yaml, then against this checkout's
    own dependencies (`dvc status`), then its outputs pulled from the DVC remote by hash. A refusal writes nothing."""
    check_lock_entry(stage, entry, root)
    before = write_lock_entries({stage: entry}, root)
    try:
        status = json.loads(dvc("status", "--json", stage, cwd=root).stdout or "{}").get(stage, [])
        changed = [key for item in status for key in ([item] if isinstance(item, str) else item) if key != "changed outs"]
        if changed:
            raise HandoffRefused(f"the dvc.lock entry for {stage} does not match this checkout ({', '.join(changed)})")
        dvc("pull", "--force", stage, cwd=root)  # only this stage's declared outputs, each checked against its hash
    except (HandoffRefused, StageFailed):
        restore_lock(before, root)
        raise

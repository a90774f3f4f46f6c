"""The GPU hand-off in DVC's and git's own terms: a training stage leaves as a commit, params and the
dvc.lock entries of the stages before it; it comes back as its own dvc.lock entry, whose outputs `dvc pull`
fetches from the remote by their hashes.

Both directions are checked against dvc.yaml before anything is written: an entry may name only the stage's
declared command, dependencies, params and outputs, and every file of a returned directory must lie inside it,
so nothing that comes back can reach a code file, a path outside the stage's outputs or outside the checkout.
The entry travels as JSON in a Prefect artifact of the worker's flow run, never through a pickled result.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from flows.dvc_stage import STAGES, dvc, git
from lora_mnist.io import write_text

LOCK = Path("dvc.lock")
HASH = re.compile(r"[0-9a-f]{32}(\.dir)?")
ENTRY_KEYS = {"path", "hash", "md5", "size", "nfiles"}
LOCK_ENTRY_ARTIFACT = "dvc-lock-entry"
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
            if set(item) - ENTRY_KEYS:
                raise HandoffRefused(f"{where}: {item['path']!r} has keys {sorted(set(item) - ENTRY_KEYS)}; "
                                     f"{sorted(ENTRY_KEYS)} are allowed")
            path = PurePosixPath(item["path"])
            if path.is_absolute() or ".." in path.parts:
                raise HandoffRefused(f"{where}: {kind} path {item['path']!r} escapes the checkout")
            if item["path"] not in spec[kind]:
                raise HandoffRefused(f"{where}: {kind} path {item['path']!r} is not one dvc.yaml declares for {stage}: "
                                     f"{', '.join(spec[kind])}")
            if item.get("hash") != "md5" or not HASH.fullmatch(str(item.get("md5", ""))):  # no "hash": DVC 2's cache layout
                raise HandoffRefused(f"{where}: {item['path']!r} has no DVC 3 md5 hash (hash: md5 and its md5)")
        if sorted(item["path"] for item in files) != spec[kind]:
            raise HandoffRefused(f"{where} lists {kind} {sorted(f['path'] for f in files)}; dvc.yaml declares {spec[kind]}")
    params = entry.get("params", {})
    if set(params) - {"params.yaml"} or sorted(params.get("params.yaml", {})) != spec["params"]:
        raise HandoffRefused(f"{where} records params {params!r}; dvc.yaml declares params.yaml: {spec['params']}")


def uncommitted_code(stages: tuple[str, ...], root: Path) -> list[str]:
    """The dependencies of ``stages`` that differ from HEAD in ``root`` and that no stage writes: the code a gpu
    worker, which trains HEAD, would not have."""
    specs = {stage: declared(stage, root) for stage in STAGES}
    written = [PurePosixPath(out) for spec in specs.values() for out in spec["outs"]]
    deps = sorted({dep for stage in stages for dep in specs[stage]["deps"]})
    changed = git("diff", "--name-only", "HEAD", "--", *deps, cwd=root).stdout.split()
    changed += git("ls-files", "--others", "--exclude-standard", "--", *deps, cwd=root).stdout.split()  # not added yet
    return sorted({path for path in changed if not any(PurePosixPath(path).is_relative_to(out) for out in written)})


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


def _cache_object(cache: Path, digest: str, path: str) -> bytes:
    """The bytes of the DVC ``cache``'s object ``digest``, refused unless they hash to it (the remote is not trusted)."""
    try:
        data = (cache / "files" / "md5" / digest[:2] / digest[2:]).read_bytes()
    except OSError:
        raise HandoffRefused(f"the returned {path}: object {digest} is not in the DVC cache after `dvc fetch`") from None
    if hashlib.md5(data).hexdigest() != digest.removesuffix(".dir"):
        raise HandoffRefused(f"the returned {path}: the fetched object {digest} does not match its hash")
    return data


def check_fetched_outputs(entry: dict[str, Any], cache: Path) -> None:
    """Refuse a returned output whose fetched objects in the DVC ``cache`` do not hash to what ``entry`` names
    (`dvc fetch` does not verify by default), or a directory that lists a file that would land outside it: an
    absolute path, or one with '.', '..' or empty parts."""
    for item in entry["outs"]:
        listing = _cache_object(cache, item["md5"], item["path"])
        if not item["md5"].endswith(".dir"):
            continue
        try:
            files = json.loads(listing)
        except ValueError:
            raise HandoffRefused(f"the returned {item['path']} has a directory listing that is not JSON") from None
        for file in files if isinstance(files, list) else [None]:
            relpath = file.get("relpath") if isinstance(file, dict) else None
            parts = relpath.split("/") if isinstance(relpath, str) else [""]
            if relpath is None or relpath.startswith("/") or any(part in ("", ".", "..") for part in parts):
                raise HandoffRefused(f"the returned {item['path']} lists a file {relpath!r} outside itself")
            if not isinstance(file.get("md5"), str) or not HASH.fullmatch(file["md5"]) or file["md5"].endswith(".dir"):
                raise HandoffRefused(f"the returned {item['path']} lists {relpath!r} without an md5 hash")
            _cache_object(cache, file["md5"], f"{item['path']}/{relpath}")


def fetch_checked(entries: dict[str, dict[str, Any]], root: Path) -> None:
    """Fetch the outputs of the stages ``entries`` names into the DVC cache (`dvc fetch`), refuse any of them whose
    objects do not match their hashes or that lists a file outside itself, and only then check them out."""
    dvc("fetch", *entries, cwd=root)
    cache = Path(dvc("cache", "dir", cwd=root).stdout.strip())
    for entry in entries.values():
        check_fetched_outputs(entry, cache)
    dvc("checkout", "--force", *entries, cwd=root)


def accept_lock_entry(stage: str, entry: Any, root: Path) -> None:
    """Take a stage's dvc.lock entry back from a worker: checked against dvc.yaml, then against this checkout's
    own dependencies (`dvc status`); its outputs fetched into the cache (`dvc fetch`), checked against their hashes
    and directory listings, and only then checked out. A refusal leaves dvc.lock as it was."""
    check_lock_entry(stage, entry, root)
    before = write_lock_entries({stage: entry}, root)
    try:
        status = json.loads(dvc("status", "--json", stage, cwd=root).stdout or "{}").get(stage, [])
        changed = [key for item in status for key in ([item] if isinstance(item, str) else item) if key != "changed outs"]
        if changed:
            raise HandoffRefused(f"the dvc.lock entry for {stage} does not match this checkout ({', '.join(changed)})")
        fetch_checked({stage: entry}, root)
    except BaseException:
        restore_lock(before, root)
        raise


def publish_lock_entry(stage: str, root: Path) -> dict[str, Any]:
    """On the worker: the stage's dvc.lock entry as a JSON artifact of this flow run; returns the entry."""
    from prefect.artifacts import create_markdown_artifact

    entry = lock_entry(stage, root)
    create_markdown_artifact(key=LOCK_ENTRY_ARTIFACT, markdown=json.dumps(entry), description=f"dvc.lock entry of {stage}")
    return entry


def read_lock_entry(flow_run_id: Any) -> Any:
    """On the pipeline: the entry a worker's flow run published, parsed as JSON (nothing of it is executed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[LOCK_ENTRY_ARTIFACT])),
                                          flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    if len(artifacts) != 1:
        raise HandoffRefused(f"flow run {flow_run_id} published {len(artifacts)} dvc.lock entries; one is expected")
    try:
        return json.loads(artifacts[0].data)
    except (TypeError, ValueError):
        raise HandoffRefused(f"flow run {flow_run_id} published a dvc.lock entry that is not JSON") from None

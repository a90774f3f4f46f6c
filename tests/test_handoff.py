"""The GPU hand-off's checks (flows/handoff.py): a returned dvc.lock entry or a training request that names
anything dvc.yaml does not declare for the stage is refused in one message, before anything is written; so is
an experiment name that is not one plain directory name (flows/dvc_stage.py)."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.handoff import (
    HandoffRefused,
    accept_lock_entry,
    check_commit,
    check_fetched_outputs,
    check_upstream,
    declared,
    upstream_entries,
)
from tests.helpers import ROOT


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """dvc.yaml and dvc.lock of this project, as a CPU checkout that waits for a stage to come back has them."""
    for name in ("dvc.yaml", "dvc.lock"):
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def _entry(checkout: Path, stage: str) -> dict:
    return copy.deepcopy(yaml.safe_load((checkout / "dvc.lock").read_text())["stages"][stage])


def _refused(checkout: Path, stage: str, entry: dict, message: str) -> None:
    before = (checkout / "dvc.lock").read_bytes()
    with pytest.raises(HandoffRefused, match=message):
        accept_lock_entry(stage, entry, checkout)
    assert (checkout / "dvc.lock").read_bytes() == before
    assert sorted(p.name for p in checkout.iterdir()) == ["dvc.lock", "dvc.yaml"]


def test_the_committed_lock_entries_of_the_training_stages_pass_the_checks(checkout):
    for stage in ("pretrain", "finetune"):
        check_upstream(stage, upstream_entries(stage, checkout), checkout)
        assert sorted(o["path"] for o in _entry(checkout, stage)["outs"]) == declared(stage, checkout)["outs"]


@pytest.mark.parametrize("path,message", [
    ("models/other.safetensors", "outs path 'models/other.safetensors' is not one dvc.yaml declares for pretrain"),
    ("../outside.safetensors", "outs path '../outside.safetensors' escapes the checkout"),
    ("/etc/passwd", "outs path '/etc/passwd' escapes the checkout"),
    ("tasks/pretrain.py", "outs path 'tasks/pretrain.py' is not one dvc.yaml declares for pretrain"),
], ids=["outside-the-outputs", "escaping", "absolute", "code-file"])
def test_a_returned_entry_naming_an_undeclared_output_is_refused_with_nothing_written(checkout, path, message):
    entry = _entry(checkout, "pretrain")
    entry["outs"][0]["path"] = path
    _refused(checkout, "pretrain", entry, message)


def test_a_returned_entry_with_an_extra_output_another_command_or_other_params_is_refused(checkout):
    extra = _entry(checkout, "finetune")
    extra["outs"].append({**extra["outs"][0], "path": "lora/layer.py"})
    _refused(checkout, "finetune", extra, "'lora/layer.py' is not one dvc.yaml declares for finetune")
    duplicate = _entry(checkout, "finetune")
    duplicate["outs"].append(dict(duplicate["outs"][0]))
    _refused(checkout, "finetune", duplicate, "lists outs")
    command = _entry(checkout, "pretrain")
    command["cmd"] = "python -c 'import os; os.remove(\"dvc.yaml\")'"
    _refused(checkout, "pretrain", command, "has cmd")
    params = _entry(checkout, "pretrain")
    params["params"]["other.yaml"] = {"x": 1}
    _refused(checkout, "pretrain", params, "records params")
    unhashed = _entry(checkout, "pretrain")
    unhashed["outs"][0]["md5"] = "../../x"
    _refused(checkout, "pretrain", unhashed, "has no DVC 3 md5 hash")
    legacy = _entry(checkout, "finetune")  # without `hash: md5` DVC would read DVC 2's cache layout, unchecked
    del legacy["outs"][0]["hash"]
    _refused(checkout, "finetune", legacy, "has no DVC 3 md5 hash")
    _refused(checkout, "pretrain", ["not", "a", "mapping"], "is not a mapping")
    extra_key = _entry(checkout, "pretrain")
    extra_key["outs"][0]["isexec"] = True
    _refused(checkout, "pretrain", extra_key, r"has keys \['isexec'\]")


def _cache_object_path(cache: Path, digest: str) -> Path:
    return cache / "files" / "md5" / digest[:2] / digest[2:]


def _store(cache: Path, data: bytes, suffix: str = "") -> str:
    """``data`` as an object of a DVC cache, under its md5 (``suffix`` ".dir" for a directory listing)."""
    digest = hashlib.md5(data).hexdigest() + suffix
    path = _cache_object_path(cache, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _fetched(entry: dict, cache: Path, adapter_file: str) -> dict:
    """``entry`` with its outputs as objects of ``cache``, as `dvc fetch` leaves them; the adapter lists
    ``adapter_file``."""
    for item in entry["outs"]:
        if item["md5"].endswith(".dir"):
            files = ["adapter_config.json", adapter_file] if item["path"] == "models/adapter" else ["loss.tsv"]
            listing = [{"md5": _store(cache, name.encode() + b" bytes"), "relpath": name} for name in files]
            item["md5"] = _store(cache, json.dumps(listing).encode(), ".dir")
        else:
            item["md5"] = _store(cache, item["path"].encode())
    return entry


@pytest.mark.parametrize("relpath", ["../../lora/layer.py", "/etc/passwd", "a/../../x", "./x", "a//b", ""])
def test_a_returned_directory_listing_a_file_outside_itself_is_refused(checkout, tmp_path, relpath):
    entry = _fetched(_entry(checkout, "finetune"), tmp_path / "cache", relpath)
    with pytest.raises(HandoffRefused, match="the returned models/adapter lists a file .* outside itself"):
        check_fetched_outputs(entry, tmp_path / "cache")
    check_fetched_outputs(_fetched(_entry(checkout, "finetune"), tmp_path / "cache", "sub/weights.bin"), tmp_path / "cache")


def test_a_fetched_object_that_does_not_match_its_hash_or_is_missing_is_refused(checkout, tmp_path):
    cache = tmp_path / "cache"
    entry = _fetched(_entry(checkout, "finetune"), cache, "adapter_model.safetensors")
    listing = json.loads(_cache_object_path(cache, next(o for o in entry["outs"] if o["path"] == "models/adapter")["md5"]).read_text())
    weights = _cache_object_path(cache, listing[1]["md5"])
    weights.write_bytes(b"other weights")  # a remote that serves other bytes under the hash
    with pytest.raises(HandoffRefused, match="models/adapter/adapter_model.safetensors: the fetched object .* does not "
                                             "match its hash"):
        check_fetched_outputs(entry, cache)
    weights.unlink()
    with pytest.raises(HandoffRefused, match="is not in the DVC cache after `dvc fetch`"):
        check_fetched_outputs(entry, cache)


def test_a_request_is_refused_for_a_later_stage_entry_or_a_malformed_commit(checkout):
    upstream = upstream_entries("pretrain", checkout)
    assert set(upstream) == {"check_params", "download"}
    with pytest.raises(HandoffRefused, match=r"\['evaluate'\] are not stages before pretrain"):
        check_upstream("pretrain", {"evaluate": _entry(checkout, "evaluate")}, checkout)
    bad = copy.deepcopy(upstream)
    bad["download"]["outs"][0]["path"] = "flows/train.py"
    with pytest.raises(HandoffRefused, match="'flows/train.py' is not one dvc.yaml declares for download"):
        check_upstream("pretrain", bad, checkout)
    for commit in ("HEAD", "main", "abc", "../" * 10 + "x" * 10, 12):
        with pytest.raises(HandoffRefused, match="a full 40-character git commit id is allowed"):
            check_commit(commit)
    assert check_commit("0" * 40) == "0" * 40


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x..y", "name.lock", "-flag", "a" * 101, None])
def test_an_experiment_name_that_is_not_one_plain_directory_name_is_refused(name):
    from flows.dvc_stage import validate_experiment_name

    message = "is 101 characters long: at most 100 are allowed" if name == "a" * 101 else "is invalid: letters, digits"
    with pytest.raises(ValueError, match=message):
        validate_experiment_name(name)
    assert validate_experiment_name("rank-4_a.2") == "rank-4_a.2"

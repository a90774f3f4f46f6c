"""The GPU hand-off's checks (flows/handoff.py): a returned dvc.lock entry or a training request that names
anything dvc.yaml does not declare for the stage is refused in one message, before anything is written; so is
an experiment name that is not one plain directory name (flows/dvc_stage.py)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.handoff import (
    HandoffRefused,
    accept_lock_entry,
    check_commit,
    check_directory_manifests,
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
    _refused(checkout, "pretrain", unhashed, "has no DVC md5 hash")
    _refused(checkout, "pretrain", ["not", "a", "mapping"], "is not a mapping")
    extra_key = _entry(checkout, "pretrain")
    extra_key["outs"][0]["isexec"] = True
    _refused(checkout, "pretrain", extra_key, r"has keys \['isexec'\]")


def _write_listings(entry: dict, cache: Path, adapter_file: str) -> None:
    """`.dir` objects in a DVC cache for every directory output of ``entry``; the adapter lists ``adapter_file``."""
    for item in entry["outs"]:
        if item["md5"].endswith(".dir"):
            listing = cache / "files" / "md5" / item["md5"][:2] / item["md5"][2:]
            listing.parent.mkdir(parents=True, exist_ok=True)
            files = ["adapter_config.json", adapter_file] if item["path"] == "models/adapter" else ["loss.tsv"]
            listing.write_text(json.dumps([{"md5": f"{n:032d}", "relpath": name} for n, name in enumerate(files)]))


@pytest.mark.parametrize("relpath", ["../../lora/layer.py", "/etc/passwd", "a/../../x", "./x", "a//b", ""])
def test_a_returned_directory_listing_a_file_outside_itself_is_refused(checkout, tmp_path, relpath):
    entry = _entry(checkout, "finetune")
    _write_listings(entry, tmp_path / "cache", relpath)
    with pytest.raises(HandoffRefused, match="the returned models/adapter lists a file .* outside itself"):
        check_directory_manifests(entry, tmp_path / "cache")
    _write_listings(entry, tmp_path / "cache", "sub/weights.bin")
    check_directory_manifests(entry, tmp_path / "cache")


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

    with pytest.raises(ValueError, match="is invalid: letters, digits"):
        validate_experiment_name(name)
    assert validate_experiment_name("rank-4_a.2") == "rank-4_a.2"

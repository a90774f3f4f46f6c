"""params.yaml is read once, by one schema (lora_mnist/params.py), before any work: bad values and unknown keys are
named with what is allowed, the `lora` section by LoRAConfig itself, hostile files are refused in bounded time and
memory, and numbers are read as DVC reads them (YAML 1.2)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from lora_mnist.params import MAX_STEPS, Params, ParamsError, load_params, load_raw, parse_grid, parse_overrides, read_yaml, with_overrides
from tests.helpers import ROOT, one_line_error, set_params


def test_the_shipped_params_are_valid_and_typed():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params) and params.finetune.digit == "auto" and params.pretrain.lr == 0.001
    config = params.lora
    assert config.r == 1 and config.target_modules == ("linear1", "linear2", "linear3")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("finetune.digit", 10, "finetune.digit=10 is invalid: 'auto' or a digit 0-9 is allowed"),
        ("finetune.digit", "nine", "finetune.digit='nine' is invalid"),
        ("finetune.digit", True, "finetune.digit=True is invalid"),
        ("pretrain.batch_size", 0, "pretrain.batch_size=0 is invalid"),
        ("pretrain.lr", float("inf"), "pretrain.lr=inf is invalid: a finite number > 0 is allowed"),
        ("finetune.steps", 2.5, "finetune.steps=2.5 is invalid"),
        ("finetune.replay_fraction", 1.0, "finetune.replay_fraction=1.0 is invalid: a number in \\[0, 1\\) is allowed"),
        ("seed", 2**64, "seed=18446744073709551616 is invalid: an integer in \\[0, 2\\*\\*63\\) is allowed"),
        ("pretrain.lr", 10**400, "pretrain.lr=10+… \\(40[12] characters\\) is invalid: a finite number > 0 is allowed"),  # no float holds it
        ("finetune.replay_fraction", -10**400, "finetune.replay_fraction=-10+… \\(40[12] characters\\) is invalid"),
        ("pretrain.batch_size", 2**63, "pretrain.batch_size=9223372036854775808 is invalid: an integer in \\[1, 2\\*\\*63\\)"),
        ("model.hidden_1", 10**400, "model.hidden_1=10+… \\(40[12] characters\\) is invalid: an integer in \\[1, 2\\*\\*63\\) is allowed"),
        ("pretrain.max_steps", 2**63, "pretrain.max_steps=9223372036854775808 is invalid: null or an integer in"),
        ("device", "tpu", "device='tpu' is invalid: 'auto', 'cpu', 'cuda' or 'cuda:N' is allowed"),
        ("pretrain.typo", 1, "unknown key pretrain.'typo'"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(project, key, value, message):
    set_params(project / "params.yaml", **{key: value})
    with pytest.raises(ParamsError, match=message):
        load_params(project / "params.yaml")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora.rank", 0, "lora.rank=0 is invalid: an integer >= 1 is allowed"),
        ("lora.rank", True, "lora.rank=True is invalid"),
        ("lora.rank", 65, "lora.rank=65 is invalid: 1..64 is allowed"),
        ("lora.alpha", -1, "lora.alpha=-1 is invalid: a finite number > 0 is allowed"),
        ("lora.alpha", float("inf"), "lora.alpha=inf is invalid"),
        ("lora.alpha", 10**400, "lora.alpha=10+… \\(40[12] characters\\) is invalid: a finite number > 0 is allowed"),
        ("lora.dropout", 10**400, "lora.dropout=10+… \\(40[12] characters\\) is invalid"),
        ("lora.dropout", False, "lora.dropout=False is invalid"),
        ("lora.targets", ["linear4"], "lora.targets=\\['linear4'\\] is invalid"),
        ("lora.targets", "linear9", "lora.targets='linear9' is invalid: a non-empty list of 'linear1', 'linear2', 'linear3'"),
        ("lora.targets", "linear2", "lora.targets='linear2' is invalid: a non-empty list of"),  # one name, not a list
        ("lora.targets", [], "lora.targets=\\[\\] is invalid: a non-empty list of"),
        ("lora.targets", [{"a": 1}], "lora.targets=\\[\\{'a': 1\\}\\] is invalid"),
        ("lora.init", "xavier", "lora.init='xavier' is invalid"),
        ("lora.use_rslora", 1, "lora.use_rslora=1 is invalid: true or false is allowed"),
        ("lora.typo", 1, "unknown key lora.'typo'"),
        ("lora.alpha", 1e38, "lora.alpha=1e\\+38 with lora.rank=\\d+ is invalid: a scale alpha/rank of at most 1e\\+04 is allowed"),
    ],
)
def test_bad_lora_values_are_refused_by_lora_config_with_the_params_name(project, key, value, message):
    set_params(project / "params.yaml", **{key: value})
    with pytest.raises(ParamsError, match=message):
        load_params(project / "params.yaml")


def test_missing_section_and_unknown_top_level_keys_are_reported(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["lora"]
    params["extra"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="lora is missing .*; unknown key 'extra'"):
        load_params(project / "params.yaml")


@pytest.mark.parametrize("arg, value", [
    ("seed=010", "010"), ("seed=0x10", "0x10"), ("pretrain.max_steps=", ""), ("pretrain.max_steps=null", None),
    ("download.source_dir=2024-01-01", "2024-01-01"), ("lora.targets=[linear1,linear2]", ["linear1", "linear2"]),
    ("finetune.lr=1e-3", 0.001), ("lora.use_rslora=true", True), ("lora.init='normal'", "normal"),
])
def test_override_values_are_read_as_dvc_exp_run_reads_them(tmp_path, arg, value):
    from dvc.utils.hydra import apply_overrides

    key = arg.partition("=")[0]
    assert parse_overrides([arg]) == {key: value}
    copy = tmp_path / "params.yaml"
    copy.write_text((ROOT / "params.yaml").read_text())
    apply_overrides(copy, [arg])  # what `dvc exp run -S` writes into params.yaml
    section, _, name = key.rpartition(".")
    written = read_yaml(copy.read_text(), str(copy))
    assert (written[section] if section else written)[name] == value


def test_a_sweep_of_lists_of_quoted_strings_reads_as_plain_strings_and_each_key_and_value_once():
    assert parse_grid(['lora.targets=["linear1"],[linear1,\'linear2\']', "lora.rank=range(1,3)"]) == {
        "lora.targets": [["linear1"], ["linear1", "linear2"]], "lora.rank": [1, 2]}
    with pytest.raises(ParamsError, match="lora.rank is swept twice"):
        parse_grid(["lora.rank=1", "lora.rank=2"])
    with pytest.raises(ParamsError, match="sweep 'lora.rank=1,1' repeats a value"):
        parse_grid(["lora.rank=1,1"])


@pytest.mark.parametrize("arg, message", [
    ("lora.rank=1,2", "is a sweep: one value is allowed"),
    ("~seed", "is invalid: key=value is allowed"),
    ("+extra=1", "is invalid: key=value is allowed"),
    ("lora.targets=[linear1", "is invalid \\(no viable alternative"),
])
def test_an_override_dvc_would_read_as_a_sweep_a_key_edit_or_nothing_is_refused(arg, message):
    with pytest.raises(ParamsError, match=message):
        parse_overrides([arg])


def test_numbers_with_an_exponent_are_numbers_as_dvc_writes_them(project):
    text = (project / "params.yaml").read_text()
    assert text.count("lr: 0.001") == 2
    (project / "params.yaml").write_text(text.replace("lr: 0.001", "lr: 1e-4"))  # PyYAML would read '1e-4' as text
    params = load_params(project / "params.yaml")
    assert params.pretrain.lr == params.finetune.lr == 1e-4
    assert parse_overrides(["finetune.lr=1e+30", "lora.rank=2"]) == {"finetune.lr": 1e30, "lora.rank": 2}


def test_an_override_key_given_twice_is_refused_not_the_last_one_taken():
    with pytest.raises(ParamsError, match="override lora.rank is given more than once: one value per key is allowed"):
        parse_overrides(["lora.rank=2", "lora.alpha=4", "lora.rank=8"])


def test_overrides_are_validated_like_the_file():
    params = load_raw(ROOT / "params.yaml")
    assert with_overrides(params, {"finetune.steps": 5}).finetune.steps == 5
    with pytest.raises(ParamsError, match="has no key 'finetune.stpes'"):
        with_overrides(params, {"finetune.stpes": 5})
    with pytest.raises(ParamsError, match="finetune.steps=0 is invalid"):
        with_overrides(params, {"finetune.steps": 0})


def test_a_stage_with_bad_params_exits_non_zero_with_one_line_and_writes_nothing(project):
    set_params(project / "params.yaml", **{"pretrain.lr": 0})
    result = subprocess.run(
        [sys.executable, "-m", "stages.pretrain"], cwd=project, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: pretrain.lr=0 is invalid: a finite number > 0 is allowed"
    ]
    assert not (project / "models").exists()


def test_check_params_writes_one_verdict_that_is_the_same_for_every_valid_file(project):
    from stages import check_params

    check_params.run(load_params(project / "params.yaml"))
    verdict = (project / "params_checked.json").read_bytes()
    set_params(project / "params.yaml", **{"lora.rank": 4, "seed": 3})
    check_params.run(load_params(project / "params.yaml"))
    assert (project / "params_checked.json").read_bytes() == verdict  # so it re-runs no stage by itself
    assert json.loads(verdict) == {"checked": "params.yaml", "valid": True}


@pytest.mark.parametrize("key, value, message", [
    ("lora.rank", True, "lora.rank=True is invalid"),      # DVC's params comparison takes true for 1
    ("lora.dropout", False, "lora.dropout=False is invalid"),  # and false for 0
    ("backend", "gpu", "params.yaml: backend='gpu' is invalid: one of 'auto', 'torch' is allowed"),
])
def test_check_params_refuses_what_dvc_would_take_for_unchanged_and_keeps_its_verdict(project, capsys, key, value, message):
    from stages import check_params

    check_params.run(load_params(project / "params.yaml"))
    before = (project / "params_checked.json").read_bytes()
    set_params(project / "params.yaml", **{key: value})
    assert message in one_line_error(check_params.main, capsys)
    assert (project / "params_checked.json").read_bytes() == before


ALIAS_BOMB = "lora:\n  targets: [&a0 [x,x,x,x,x,x,x,x,x,x]" + "".join(
    f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)) + "]\n"


@pytest.mark.parametrize("text, message", [
    (ALIAS_BOMB, "holds more than 10,000 values \\(YAML aliases expand\\)"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "more than 32 levels of nesting|nested too deeply"),
    ("seed: " + "9" * 5000 + "\n", "a value cannot be read"),
    ("seed: 0\n# " + "x" * (2 << 20) + "\n", "characters; at most 1,048,576 are allowed"),
])
def test_a_hostile_params_file_is_refused_in_one_short_line(project, capsys, text, message):
    from stages import check_params

    (project / "params.yaml").write_text(text)
    error = one_line_error(check_params.main, capsys)
    assert re.search(message, error) and len(error) < 400, error


def test_a_5000_digit_rank_is_refused_as_a_value_in_one_line(project, capsys):
    from stages import check_params

    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(re.sub(r"\brank: 1\b", "rank: " + "9" * 5000, text, count=1))
    assert "a value cannot be read" in one_line_error(check_params.main, capsys)


def test_a_params_file_that_is_not_utf8_is_refused_naming_the_byte(project, capsys):
    from stages import check_params

    (project / "params.yaml").write_bytes(b"seed: 0\ndevice: caf\xe9\n")
    assert one_line_error(check_params.main, capsys) == "error: params.yaml: not UTF-8 text (byte 0xe9 at offset 19)"


@pytest.mark.parametrize("changes, message", [
    ({"finetune.steps": 10**12}, re.escape(f"finetune.steps=1000000000000 is invalid: an integer in [1, {MAX_STEPS:.0e}]")),
    ({"pretrain.epochs": 10**12, "pretrain.max_steps": None}, "steps: at most 1e\\+06 are allowed \\(or set pretrain.max_steps\\)"),
])
def test_values_that_could_not_run_are_refused_at_check_time_with_the_bound(project, capsys, changes, message):
    from stages import check_params

    set_params(project / "params.yaml", **changes)
    error = one_line_error(check_params.main, capsys)
    assert re.search(message, error) and len(error) < 400, error
    set_params(project / "params.yaml", **{"pretrain.max_steps": 5})  # a cap makes any number of epochs runnable
    if "pretrain.epochs" in changes:
        assert load_params(project / "params.yaml").pretrain.steps(200) == 5

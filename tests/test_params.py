"""params.yaml is checked before any work: bad values and unknown keys are named with what is allowed."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tasks.common import ParamsError, load_params
from tests.conftest import ROOT, set_params


def test_the_shipped_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params["lora"]["rank"] == 1 and params["finetune"]["digit"] == "auto"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora.rank", 0, "lora.rank=0 is invalid: an integer >= 1 is allowed"),
        ("lora.rank", 65, "lora.rank=65 is invalid: 1..64 is allowed"),
        ("lora.alpha", -1, "lora.alpha=-1 is invalid: a number > 0 is allowed"),
        ("finetune.digit", 10, "finetune.digit=10 is invalid: 'auto' or a digit 0-9 is allowed"),
        ("finetune.digit", "nine", "finetune.digit='nine' is invalid"),
        ("pretrain.batch_size", 0, "pretrain.batch_size=0 is invalid"),
        ("pretrain.kernel", "gpu", "pretrain.kernel='gpu' is invalid: 'auto', 'fused' or 'torch' is allowed"),
        ("finetune.steps", 2.5, "finetune.steps=2.5 is invalid"),
        ("lora.targets", ["linear4"], "lora.targets=\\['linear4'\\] is invalid"),
        ("lora.init", "xavier", "lora.init='xavier' is invalid"),
        ("lora.use_rslora", 1, "lora.use_rslora=1 is invalid: true or false is allowed"),
        ("lora.typo", 1, "unknown key lora.'typo'"),
        ("finetune.replay_fraction", 1.0, "finetune.replay_fraction=1.0 is invalid: a number in \\[0, 1\\) is allowed"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(project, key, value, message):
    set_params(project / "params.yaml", **{key: value})
    with pytest.raises(ParamsError, match=message):
        load_params(project / "params.yaml")


def test_missing_section_is_reported(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    del params["lora"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match="section 'lora' is missing"):
        load_params(project / "params.yaml")


def test_a_stage_with_bad_params_exits_non_zero_with_one_line_and_writes_nothing(project):
    set_params(project / "params.yaml", **{"pretrain.lr": 0})
    result = subprocess.run(
        [sys.executable, "-m", "tasks.pretrain"], cwd=project, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: pretrain.lr=0 is invalid: a number > 0 is allowed"
    ]
    assert not (project / "models").exists()

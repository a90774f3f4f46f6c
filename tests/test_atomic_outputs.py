"""Outputs are written to a temporary file and renamed: a process killed at any moment leaves the old
output or none, never a half-written one."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from lora.files import atomic_dir
from lora.files import atomic_file as atomic_path
from tests.helpers import ROOT

KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from lora.files import atomic_dir
    from lora.files import atomic_file as atomic_path
    target, kind = Path(sys.argv[1]), sys.argv[2]
    context = atomic_path(target) if kind == "file" else atomic_dir(target)
    with context as tmp:
        (tmp if kind == "file" else tmp / "weights.bin").write_bytes(b"half-written")
        os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_writer_killed_mid_write_leaves_the_old_output_intact(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"old complete output")
    else:
        with atomic_dir(target) as tmp:
            (tmp / "weights.bin").write_bytes(b"old complete output")
    result = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(target), kind], cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]})
    assert result.returncode == -signal.SIGKILL
    written = target.read_bytes() if kind == "file" else (target / "weights.bin").read_bytes()
    assert written == b"old complete output"
    assert sorted(p.name for p in (target.iterdir() if kind == "dir" else [])) in ([], ["weights.bin"])


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # the full-size model, pretrained eight times
def test_pretrain_killed_at_random_moments_leaves_weights_absent_or_complete(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = {"hidden_1": 1000, "hidden_2": 2000}  # full-size weights: the save takes a while
    params["pretrain"].update({"epochs": 1, "max_steps": 30})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]}
    command = [sys.executable, "-m", "stages.pretrain"]

    weights = project / "models" / "base.safetensors"
    subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)  # warms the disk cache
    reference = weights.read_bytes()
    started = time.monotonic()
    subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)
    duration = time.monotonic() - started

    rng = random.Random(0)
    # One kill surely before the save (half a second in, torch is still importing), then moments around the save.
    delays = [0.5] + [rng.uniform(0.5, 1.1) * duration for _ in range(4)]
    outcomes = set()
    for delay in delays:
        weights.unlink(missing_ok=True)
        process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if weights.exists():
            assert weights.read_bytes() == reference  # deterministic: complete means identical
            outcomes.add("complete")
        else:
            outcomes.add("absent")
    assert "absent" in outcomes
    # The next run recovers whatever was left.
    subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)
    assert weights.read_bytes() == reference

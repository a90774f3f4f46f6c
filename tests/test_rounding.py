"""Stage processes round the same on every x86 CPU with AVX2 and FMA: `tasks` pins torch's CPU kernels and MKL
to their AVX2 code before torch loads, unless the environment chooses; the CPU kernels are built without fused
multiply-adds (tests/test_cpu_kernels.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tasks import _cpu_has_avx2
from tests.helpers import ROOT

PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR")
# A product and a softmax as finetune and evaluate compute them (MKL's sgemm, ATen's vectorised kernels).
PRODUCT = """
import hashlib, torch
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(10, 784, generator=g), torch.randn(1000, 784, generator=g), torch.randn(1000, generator=g)
y = torch.nn.functional.linear(x, w, b)
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(torch.softmax(y, 1).numpy().tobytes()).hexdigest())
"""
HAS_AVX2 = _cpu_has_avx2()


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in PINS}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **env},
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


@pytest.mark.skipif(not HAS_AVX2, reason="the pin applies to x86 CPUs with AVX2 and FMA")
def test_a_stage_process_computes_what_torch_and_mkl_pinned_to_avx2_compute():
    pinned = _run(PRODUCT, ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2,STRICT")
    assert _run("import tasks" + PRODUCT) == pinned
    assert pinned.startswith("AVX2 ")


def test_the_environment_overrides_the_pin():
    assert _run("import tasks" + PRODUCT, ATEN_CPU_CAPABILITY="default").startswith("DEFAULT ")
    assert _run("import tasks, os; print(os.environ.get('MKL_CBWR'))", MKL_CBWR="COMPATIBLE") == "COMPATIBLE"


@pytest.mark.skipif(HAS_AVX2, reason="this CPU has AVX2")
def test_a_cpu_without_avx2_is_not_pinned():  # torch would run AVX2 code it cannot execute
    assert _run("import tasks, os; print(os.environ.get('ATEN_CPU_CAPABILITY'), os.environ.get('MKL_CBWR'))") == "None None"

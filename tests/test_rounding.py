"""Stage processes round alike across x86 CPUs: a stage's entry point pins torch's CPU kernels to their AVX2 code
(on CPUs with AVX2 and FMA) and MKL to its one branch that runs alike on Intel and AMD, before torch loads, unless
the environment chooses; importing a module pins nothing. The CPU kernels are built without fused multiply-adds
(tests/test_cpu_kernels.py)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from bench.rounding import PINS, weights_sha256
from lora_mnist.reproducible import cpu_flags, pinned_environment
from tests.helpers import ROOT

# A product and a softmax as finetune and evaluate compute them (MKL's sgemm, ATen's vectorised kernels).
PRODUCT = """
import hashlib, torch
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(10, 784, generator=g), torch.randn(1000, 784, generator=g), torch.randn(1000, generator=g)
y = torch.nn.functional.linear(x, w, b)
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(torch.softmax(y, 1).numpy().tobytes()).hexdigest())
"""
PIN = "from lora_mnist.reproducible import pin_cpu_arithmetic; pin_cpu_arithmetic()\n"
HAS_AVX2 = {"avx2", "fma"} <= cpu_flags()


def _run(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in PINS}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **env},
                            capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_the_pins_are_mkls_cross_vendor_branch_everywhere_and_avx2_kernels_only_where_the_cpu_has_them():
    assert pinned_environment({"avx2", "fma", "avx512f"}) == {
        "MKL_CBWR": "COMPATIBLE,STRICT", "MKL_NUM_THREADS": "2", "MKL_DYNAMIC": "FALSE", "GOMP_SPINCOUNT": "10000",
        "ATEN_CPU_CAPABILITY": "avx2"}
    assert "ATEN_CPU_CAPABILITY" not in pinned_environment({"avx2"})  # torch would run FMA code the CPU lacks
    assert "ATEN_CPU_CAPABILITY" not in pinned_environment(set())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_AVX2, reason="the kernel pin applies to x86 CPUs with AVX2 and FMA")
def test_a_pinned_process_computes_what_torch_and_mkl_compute_under_the_pins():
    explicit = _run(PRODUCT, **pinned_environment(cpu_flags()))
    assert _run(PIN + PRODUCT) == explicit and explicit.startswith("AVX2 ")


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to compare one against two")
def test_a_pinned_process_fine_tunes_the_same_bits_on_one_core_as_on_two():
    # LoRA fine-tuning as the finetune stage runs it (autograd through MKL's products, Adam), on the MLP's shapes, in a
    # process kept first to one of this machine's CPUs, as a smaller machine or VM would be, then to two.
    assert weights_sha256("LoRA fine-tuning", 1) == weights_sha256("LoRA fine-tuning", 2)


@pytest.mark.slow
def test_the_environment_overrides_the_pin_and_importing_a_stage_pins_nothing():
    assert _run(PIN + PRODUCT, ATEN_CPU_CAPABILITY="default").startswith("DEFAULT ")
    assert _run(PIN + "import os; print(os.environ['MKL_CBWR'])", MKL_CBWR="AUTO") == "AUTO"
    assert _run("import os, stages.finetune, stages.evaluate; print(os.environ.get('MKL_CBWR'))") == "None"


TORCH_FREE_STAGES = ("check_params", "download")


def test_the_stages_that_pin_nothing_load_no_torch():
    code = "import sys, stages.{}; print('torch' in sys.modules)"
    assert [_run(code.format(stage)) for stage in TORCH_FREE_STAGES] == ["False"] * len(TORCH_FREE_STAGES)


def test_every_other_stage_pins_before_its_first_other_import():
    for path in sorted((ROOT / "stages").glob("*.py")):
        if path.stem in ("__init__", *TORCH_FREE_STAGES):
            continue
        body = ast.parse(path.read_text()).body
        first = next(node for node in body if isinstance(node, (ast.Import, ast.ImportFrom)))
        assert isinstance(first, ast.ImportFrom) and first.module == "lora_mnist.reproducible", path.name
        guard = body[body.index(first) + 1]
        assert isinstance(guard, ast.If) and "__main__" in ast.unparse(guard.test), path.name
        assert ast.unparse(guard.body) == "pin_cpu_arithmetic()", path.name

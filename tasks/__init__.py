"""tasks: one thin module per DVC stage, run as ``python -m tasks.<stage>``, and the helpers they share.

Set before any stage loads torch, each unless the environment sets it:
- An OpenMP thread without work spins for a while before it sleeps, and on a machine whose other cores are busy
  that spinning takes the CPU from the threads that have work, so pretraining beside one busy process ran many
  times slower. A short spin keeps the quiet machine's speed.
- torch's CPU kernels and MKL pick code by the CPU's instruction set, and each rounds differently: an AVX-512
  Intel and an AVX2 AMD trained different base models from the same commit. Pinned to AVX2 (ATen's kernels, and
  MKL's reproducible AVX2 branch), every x86 CPU with AVX2 and FMA computes the same bits (docs/performance.md).
"""
import os
from pathlib import Path


def _cpu_has_avx2() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split())


os.environ.setdefault("GOMP_SPINCOUNT", "10000")
if _cpu_has_avx2():  # torch runs the kernels ATEN_CPU_CAPABILITY names without asking the CPU
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
    os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")

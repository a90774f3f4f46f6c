"""The same bits on every x86 CPU: what each stage's entry point sets before torch loads (docs/performance.md).

torch's CPU kernels and MKL choose their code by the CPU, and their choices round differently: from one commit
an AVX-512 Intel Xeon and an AVX2 AMD EPYC trained different models. Each setting is taken only where the
environment sets none:

- ``ATEN_CPU_CAPABILITY=avx2`` on CPUs with AVX2 and FMA: ATen's kernels then run the AVX2 code everywhere.
- ``MKL_CBWR=COMPATIBLE,STRICT``: MKL's one code branch that runs alike on Intel and AMD (its AVX2 branch is
  Intel-only; on an AMD CPU MKL silently takes its own), thread count and alignment aside.
- ``MKL_NUM_THREADS=2`` and ``MKL_DYNAMIC=FALSE``: MKL splits a product's sums by its thread count, which it
  otherwise takes from the cores it sees (one on a VM with one core of two threads), so a fine-tuned adapter
  differed between machines; two fixed threads are what the committed runs used.
- ``GOMP_SPINCOUNT=10000``: an idle OpenMP thread spins briefly before it sleeps, so on a machine whose other
  cores are busy the spinning does not take the CPU from the threads with work.
"""
from __future__ import annotations

import os
from pathlib import Path


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (/proc/cpuinfo), empty where the system does not tell."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.partition(":")[2].split())


def pinned_environment(flags: set[str]) -> dict[str, str]:
    """The settings a stage process runs with on a CPU with ``flags``."""
    pins = {"MKL_CBWR": "COMPATIBLE,STRICT", "MKL_NUM_THREADS": "2", "MKL_DYNAMIC": "FALSE", "GOMP_SPINCOUNT": "10000"}
    if {"avx2", "fma"} <= flags:  # torch runs the kernels ATEN_CPU_CAPABILITY names without asking the CPU
        pins["ATEN_CPU_CAPABILITY"] = "avx2"
    return pins


def pin_cpu_arithmetic() -> None:
    """Set the pins in this process, unless the environment sets them; call it before torch is imported."""
    for name, value in pinned_environment(cpu_flags()).items():
        os.environ.setdefault(name, value)

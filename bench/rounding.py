"""Probe: which thread and instruction-set settings change the bits of training on this CPU.

    python -m bench.rounding                            # prints the table
    python -m bench.rounding --write docs/performance.md

Each row is a fresh process that keeps to some of this machine's cores, takes the stage pins
(lora_mnist.reproducible) with one setting changed, then either fine-tunes LoRA (20 steps of autograd through MKL's
products and Adam, on the MLP's shapes) or pretrains with the C kernels (20 steps); the table says whether its
weights' sha256 equals the pinned two-core run's. tests/test_rounding.py checks the one row the stages rely on.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

from bench import Output
from lora_mnist.reproducible import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_NUM_THREADS", "MKL_DYNAMIC", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
# CORES, UNPIN and TRAINING are filled in per row; the weights' sha256 is printed.
PROGRAM = """
import hashlib, os
cpus = sorted(os.sched_getaffinity(0))
os.sched_setaffinity(0, cpus[:CORES])
from lora_mnist.reproducible import pin_cpu_arithmetic
pin_cpu_arithmetic()
for name in UNPIN:
    del os.environ[name]
import torch, lora
from lora_mnist.mlp import OversizedMLP
torch.manual_seed(0)
model = OversizedMLP(1000, 2000)
g = torch.Generator().manual_seed(1)
TRAINING
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in params)).hexdigest())
"""
LORA_STEPS = """
from lora_mnist.backend import make_optimizer
lora.inject(model, lora.LoRAConfig(r=1, alpha=1, target_modules=("linear1", "linear2", "linear3")))
lora.mark_only_lora_trainable(model)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = make_optimizer(params, 1e-3)
for _ in range(20):
    x, y = torch.rand(10, 784, generator=g), torch.randint(0, 10, (10,), generator=g)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
"""
KERNEL_PRETRAINING = """
from lora_mnist.backend import training_path
from lora_mnist.train import train
x, y = torch.rand(640, 784, generator=g), torch.randint(0, 10, (640,), generator=g)
assert training_path(model, x, None, "auto") == "cpu-kernels", "the C kernels do not build here"
train(model, x, y, steps=20, batch_size=32, lr=1e-3, seed=0, backend="auto", desc="probe")
params = list(model.parameters())
"""
TRAININGS = {"LoRA fine-tuning": LORA_STEPS, "C-kernel pretraining": KERNEL_PRETRAINING}
# (label, cores, environment changed after the pins, pins removed)
SETTINGS = [
    ("the stage pins, 2 cores (the reference)", 2, {}, ()),
    ("the stage pins, 1 core", 1, {}, ()),
    ("without MKL_NUM_THREADS and MKL_DYNAMIC, 1 core", 1, {}, ("MKL_NUM_THREADS", "MKL_DYNAMIC")),
    ("MKL_NUM_THREADS=1", 2, {"MKL_NUM_THREADS": "1"}, ()),
    ("MKL_NUM_THREADS=3", 2, {"MKL_NUM_THREADS": "3"}, ()),
    ("MKL_NUM_THREADS=4", 2, {"MKL_NUM_THREADS": "4"}, ()),
    ("OMP_NUM_THREADS=1", 2, {"OMP_NUM_THREADS": "1"}, ()),
    ("DNNL_MAX_CPU_ISA=AVX2", 2, {"DNNL_MAX_CPU_ISA": "AVX2"}, ()),
    ("MKL_ENABLE_INSTRUCTIONS=AVX2", 2, {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, ()),
]


def program(training: str, cores: int, unpin: tuple[str, ...] = ()) -> str:
    """The probe's Python source for one row: ``training`` is a key of TRAININGS."""
    return PROGRAM.replace("CORES", str(cores)).replace("UNPIN", repr(unpin)).replace("TRAINING", TRAININGS[training])


def weights_sha256(training: str, cores: int, env: dict[str, str] | None = None, unpin: tuple[str, ...] = ()) -> str:
    """The sha256 of the weights one row's process trains (the pins of the caller's environment left out)."""
    base = {k: v for k, v in os.environ.items() if k not in PINS}
    result = subprocess.run([sys.executable, "-c", program(training, cores, unpin)], cwd=ROOT, capture_output=True,
                            text=True, env={**base, "PYTHONPATH": str(ROOT), **(env or {})})
    if result.returncode != 0:
        raise SystemExit(f"error: the {training} probe failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    return result.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PAGE", help="also write the table into PAGE between its bench.rounding markers")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("error: the probe compares one core against two: this process has one CPU")
    out = Output()
    flags = cpu_flags()
    isa = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f")))
    out(f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, {isa}; \"same\": the same weights' sha256 as the "
        "reference row")
    out()
    out("| setting | " + " | ".join(TRAININGS) + " |")
    out("|---|" + "---|" * len(TRAININGS))
    reference = {training: weights_sha256(training, 2) for training in TRAININGS}
    for label, cores, env, unpin in SETTINGS:
        found = [reference[t] if not env and not unpin and cores == 2 else weights_sha256(t, cores, env, unpin) for t in TRAININGS]
        out(f"| {label} | " + " | ".join("same" if sha == reference[t] else "other bits" for sha, t in zip(found, TRAININGS)) + " |")
    if args.write:
        out.write_into(args.write, "bench.rounding")


if __name__ == "__main__":
    main()

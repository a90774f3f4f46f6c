"""Pretraining the MLP on CPU with the kernels of linear_adam.c.

At batch 10 a CPU step is bound by memory traffic: autograd writes each weight gradient, Adam reads it back
and the next forward reads the weights again. The C kernels form each gradient row in cache, update the
weights and both Adam moments in the same pass, and compute the next batch's activations from the updated
rows while they are still in cache; products with the zeros of ReLU outputs are skipped. The math is
torch.optim.Adam's on the same seeded batches; results agree with the autograd path to float rounding and are
deterministic (tests/test_cpu_kernels.py).

The kernels are compiled with the system's C compiler on first use and cached (``$LORA_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/lora-mnist``, else ``~/.cache/lora-mnist``); without a compiler with OpenMP the backend
trains through autograd instead.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import BackendError
from ..reproducible import cpu_flags
from .adam import ADAM_BETAS, ADAM_EPS

SOURCE = Path(__file__).with_name("linear_adam.c")
# No fused multiply-adds: where GCC fuses depends on the target (AVX-512 and AVX2 builds fused different
# products), so the weights would too; unfused, every x86 build rounds the same.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]


class KernelUnavailable(BackendError):
    """The CPU kernels cannot be built or used here."""


def trains_with_kernels(model: nn.Module, images: torch.Tensor) -> bool:
    """Whether :func:`train_fused` can train ``model`` on ``images``: an MLP of linear1..3 (ReLU between), every
    parameter a trainable, contiguous float32 CPU tensor, float32 CPU images, and a kernel that builds."""
    layers = [getattr(model, name, None) for name in ("linear1", "linear2", "linear3")]
    if not all(isinstance(layer, nn.Linear) and layer.bias is not None for layer in layers):
        return False
    if len(list(model.parameters())) != 2 * len(layers):
        return False
    if images.dtype != torch.float32 or images.device.type != "cpu":
        return False
    if any(p.device.type != "cpu" or p.dtype != torch.float32 or not p.requires_grad or not p.is_contiguous()
           for p in model.parameters()):
        return False
    return kernel_builds()


def train_fused(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor], lr: float,
                desc: str = "train") -> torch.Tensor:
    """The training loop for the plain MLP on CPU (Adam, cross-entropy, the same seeded batches), with each
    layer's weight gradient, Adam update and next forward in one kernel call; returns every step's loss.
    Only for models and images that :func:`trains_with_kernels` accepts."""
    layers = [model.linear1, model.linear2, model.linear3]
    library, threads = _library(), torch.get_num_threads()
    moments = [[torch.zeros_like(p) for p in (layer.weight, layer.weight, layer.bias, layer.bias)] for layer in layers]
    scratch = torch.empty(threads, max(layer.in_features for layer in layers))
    relu = [depth < len(layers) - 1 for depth in range(len(layers))]  # a ReLU after every layer but the last
    steps = len(batches)
    losses = torch.empty(steps)
    with torch.no_grad():
        # the input and every layer's output for the current batch; the kernels compute them for the next one
        activations = [images[batches[0]].reshape(len(batches[0]), -1)]
        for layer, layer_relu in zip(layers, relu):
            activations.append(torch.empty(len(batches[0]), layer.out_features))
            library.linear_forward(*_ptrs(layer.weight, layer.bias, activations[-2], activations[-1]), len(batches[0]),
                                   layer.in_features, layer.out_features, layer_relu, threads)
        for step, index in enumerate(tqdm(batches, desc=desc, disable=None), 1):
            *inputs, logits = activations
            y = labels[index]
            losses[step - 1] = F.cross_entropy(logits, y)
            grads_out = [torch.softmax(logits, dim=1)]  # d(mean cross-entropy)/d(logits) = (softmax - one-hot) / batch
            grads_out[0][torch.arange(len(y)), y] -= 1
            grads_out[0] /= len(y)
            for layer, layer_input in zip(layers[:0:-1], inputs[:0:-1]):  # down the layers, through the old weights
                grads_out.insert(0, torch.empty_like(layer_input))
                library.linear_input_grad(*_ptrs(layer.weight, grads_out[1], layer_input, grads_out[0]), len(y),
                                          layer.in_features, layer.out_features, threads)
            next_x = images[batches[step]].reshape(len(batches[step]), -1) if step < steps else None
            activations = [next_x]
            for layer, layer_moments, layer_input, grad_out, layer_relu in zip(layers, moments, inputs, grads_out, relu):
                next_input = activations[-1]
                next_output = None if next_x is None else torch.empty(len(next_x), layer.out_features)
                library.linear_adam_step(
                    *_ptrs(layer.weight, layer.bias, *layer_moments, layer_input, grad_out, scratch, next_input, next_output),
                    len(y), 0 if next_x is None else len(next_x), layer.in_features, layer.out_features, layer_relu,
                    threads, lr, *ADAM_BETAS, ADAM_EPS, step,
                )
                activations.append(next_output)
    return losses


@functools.cache
def kernel_builds() -> bool:
    """Whether the kernel builds here, asked once per process (tests that change the compiler clear this cache
    with _library's)."""
    try:
        _library()
    except KernelUnavailable:
        return False
    return True


def _ptrs(*tensors: torch.Tensor | None) -> list[int | None]:
    """Data pointers for the kernels (None for NULL); every tensor here is contiguous float32 on CPU."""
    return [None if tensor is None else tensor.data_ptr() for tensor in tensors]


@functools.cache
def _library() -> ctypes.CDLL:
    path = _build()
    library = ctypes.CDLL(str(path))
    pointer, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    library.linear_adam_step.argtypes = [pointer] * 11 + [i64] * 4 + [ctypes.c_int] * 2 + [f64] * 4 + [i64]
    library.linear_adam_step.restype = None
    library.linear_input_grad.argtypes = [pointer] * 4 + [i64] * 3 + [ctypes.c_int]
    library.linear_input_grad.restype = None
    library.linear_forward.argtypes = [pointer] * 4 + [i64] * 3 + [ctypes.c_int] * 2
    library.linear_forward.restype = None
    return library


def _build() -> Path:
    """The compiled kernel for this source, compiler and CPU, building it (atomically) when absent."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise KernelUnavailable(f"the CPU kernels need a C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH")
    key = hashlib.sha256(SOURCE.read_bytes())
    key.update(" ".join([compiler, *FLAGS, platform.machine(), _cpu_flags()]).encode())
    target = _cache_dir() / f"linear_adam-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                first = (result.stderr.strip().splitlines() or ["no output"])[0]
                raise KernelUnavailable(f"the CPU kernels could not be compiled with {compiler}: {first}")
            os.replace(built, target)
    except OSError as exc:
        raise KernelUnavailable(f"the CPU kernels could not be cached in {target.parent} ({exc.strerror}); "
                                "set $LORA_KERNEL_CACHE to a writable directory") from None
    return target


def _cache_dir() -> Path:
    if os.environ.get("LORA_KERNEL_CACHE"):
        return Path(os.environ["LORA_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-mnist"


def _cpu_flags() -> str:
    # -march=native code may not run on another CPU that shares this cache (a network home directory).
    return " ".join(sorted(cpu_flags())) or platform.processor()

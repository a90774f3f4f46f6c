"""MNIST in memory: a strict IDX reader, normalised tensors, and the split of the training images into the
images a model trains on and the validation images every choice is made on (the test set is only scored)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .download import SPLIT_FILES
from .errors import DataError

# Normalisation constants of the seed notebook (MNIST's pixel mean and std after scaling to [0, 1]).
MEAN, STD = 0.1307, 0.3081


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an unsigned-byte IDX file (magic 0x0000080N) into a uint8 tensor of its declared shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    data = path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex() or 'empty'}, expected 0000080N)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes, expected at least {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + _product(shape)
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes, but its header {shape} promises {expected}")
    if expected == header:  # a zero-sized dimension: frombuffer refuses empty buffers
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def split_image_file(raw_dir: str | os.PathLike, split: str) -> Path:
    return Path(raw_dir) / SPLIT_FILES[split][0]


def load_split(raw_dir: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of ``split`` ('train' or 'test'): float32 (N, 784) normalised, int64 (N,)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split={split!r} is invalid: 'train' or 'test' is allowed")
    image_file, label_file = (Path(raw_dir) / name for name in SPLIT_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.dim() != 3 or labels.dim() != 1:
        raise DataError(f"{image_file}: expected 3-d images and 1-d labels, got {images.dim()}-d and {labels.dim()}-d")
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{image_file}: images are {tuple(images.shape[1:])}, MNIST's 28x28 are expected")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{image_file}: {images.shape[0]} images but {labels.shape[0]} labels in {label_file.name}")
    if labels.numel() and int(labels.max()) > 9:
        raise DataError(f"{label_file}: label {int(labels.max())} found, labels 0-9 are allowed")
    flat = images.reshape(images.shape[0], -1).to(torch.float32).div_(255.0)
    return flat.sub_(MEAN).div_(STD), labels.to(torch.int64)


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def validation_split(count: int, validation: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices of ``count`` training images: a seeded permutation's first ``validation`` are
    held out, the rest train; both sorted, so every stage that asks gets the same two sets."""
    if not 1 <= validation < count:
        raise DataError(f"data.validation={validation} is invalid for {count} training images: 1..{count - 1} is allowed")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[validation:].sort().values, order[:validation].sort().values

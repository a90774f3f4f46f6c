"""Deployment pull steps (prefect.yaml): where a worker runs the flows, and which DVC remote and cache it uses."""
from __future__ import annotations

import os
from pathlib import Path

from flows.dvc import dvc

CHECKOUT_ENV = "LORA_MNIST_CHECKOUT"
DVC_REMOTE_ENV = "LORA_MNIST_DVC_REMOTE"
DVC_CACHE_ENV = "LORA_MNIST_DVC_CACHE"


def enter_checkout() -> dict[str, str]:
    """chdir to $LORA_MNIST_CHECKOUT, else to the checkout this package is installed from (pip -e)."""
    directory = os.environ.get(CHECKOUT_ENV) or str(Path(__file__).resolve().parents[1])
    if not (Path(directory) / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{directory} holds no dvc.yaml; set ${CHECKOUT_ENV} to the project checkout")
    os.chdir(directory)
    return {"directory": directory}


def use_worker_dvc_config() -> dict[str, str]:
    """In a fresh clone: $LORA_MNIST_DVC_REMOTE as the default DVC remote and $LORA_MNIST_DVC_CACHE as the DVC
    cache (both optional, in the clone's git-ignored config.local), so the worker's runs share one cache."""
    configured = {}
    for variable, args in ((DVC_REMOTE_ENV, ["remote", "add", "--local", "--force", "--default", "worker"]),
                           (DVC_CACHE_ENV, ["cache", "dir", "--local"])):
        if value := os.environ.get(variable):
            dvc(*args, value)
            configured[variable] = value
    return configured

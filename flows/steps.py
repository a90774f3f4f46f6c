"""A deployment pull step: run flows in the checkout whose environment the worker runs from."""
from __future__ import annotations

import os
from pathlib import Path

CHECKOUT_ENV = "LORA_MNIST_CHECKOUT"


def enter_checkout() -> dict[str, str]:
    """chdir to $LORA_MNIST_CHECKOUT, else to the checkout this package is installed from (pip -e)."""
    directory = os.environ.get(CHECKOUT_ENV) or str(Path(__file__).resolve().parents[1])
    if not (Path(directory) / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{directory} holds no dvc.yaml; set ${CHECKOUT_ENV} to the project checkout")
    os.chdir(directory)
    return {"directory": directory}

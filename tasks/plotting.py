"""Figures as the stages write them: matplotlib on the Agg backend, PNGs written atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_mnist.io import atomic_path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: stages draw PNGs without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG atomically, then free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})  # no matplotlib version in the bytes
    pyplot().close(fig)

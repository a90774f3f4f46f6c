"""Figures as the stages write them: matplotlib on the Agg backend, PNGs without a version in their bytes."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: stages draw PNGs without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG to ``path`` (a staged temporary: lora_mnist.io.Outputs), then free it."""
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})  # no matplotlib version in the bytes
    pyplot().close(fig)

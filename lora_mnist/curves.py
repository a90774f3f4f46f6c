"""Training curves as dvclive writes them: dvclive/<stage>/plots/metrics/loss.tsv and a summary."""
from __future__ import annotations

from typing import Any

import torch

from .paths import DVCLIVE


def log_losses(name: str, losses: torch.Tensor, **summary: Any) -> None:
    """Per-step training loss as a dvclive curve plus a summary (dvclive/<name>/metrics.json); no timestamps."""
    from dvclive import Live

    with Live(dir=str(DVCLIVE / name), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for step, loss in enumerate(losses.tolist()):
            live.step = step  # one write per row; next_step() would rewrite the summary every step
            live.log_metric("loss", round(loss, 6), timestamp=False)
        live.summary["loss_mean_last_100"] = round(float(losses[-100:].mean()), 6)
        live.summary.update(summary)

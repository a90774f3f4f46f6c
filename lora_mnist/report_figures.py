"""The experiments report's figures: each draws one section's numbers, already computed by lora_mnist.report."""
from __future__ import annotations

from typing import Any

from .plotting import pyplot


def rank_sweep(curves: dict[str, list[tuple[int, int, float]]], ranks: list[int], base_accuracy: float, digit: int) -> Any:
    """Target-digit errors and accuracy against the rank, a curve per label's (rank, errors, accuracy) points."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    for label, points in curves.items():
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        right.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=label)
    right.axhline(base_accuracy, color="grey", linestyle=":", label="base model")
    for ax, ylabel in ((left, "target-digit test errors"), (right, "overall test accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(f"Rank sweep: adapters trained on digit {digit}, scored with LoRA on")
    fig.tight_layout()
    return fig


def frontier(points: list[dict[str, Any]], front: list[dict[str, Any]]) -> Any:
    """Each replay fraction's curve over inference scales, and the Pareto front."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    for fraction in sorted({p["replay_fraction"] for p in points}):
        curve = [p for p in points if p["replay_fraction"] == fraction]
        for ax, key in ((left, "accuracy"), (right, "other_errors")):
            ax.plot([p["digit_errors"] for p in curve], [p[key] for p in curve], marker=".", label=f"replay {fraction:g}")
    left.plot([p["digit_errors"] for p in front], [p["accuracy"] for p in front], color="black", linewidth=3, alpha=0.3, label="frontier")
    for ax, ylabel in ((left, "overall test accuracy"), (right, "other digits' test errors")):
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("target-digit test errors (symlog)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle("Forgetting trade-off: each curve is a replay fraction at inference scales 0 (right end) to 1")
    fig.tight_layout()
    return fig


def learning_rates(points: list[dict[str, Any]], fronts: dict[str, list[dict[str, Any]]], methods: dict[str, str],
                   digit: int) -> Any:
    """Learning against forgetting on validation: every point, and each method's frontier."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for method, label in methods.items():
        mine = [p for p in points if p["method"] == method]
        dots = ax.scatter([p["forgot"] for p in mine], [p["learned"] for p in mine], s=14, alpha=0.5)
        ax.plot([p["forgot"] for p in fronts[method]], [p["learned"] for p in fronts[method]], marker="o",
                color=dots.get_facecolor()[0], label=f"{label} (frontier)")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("other digits' validation errors added (forgetting, symlog)")
    ax.set_ylabel("target-digit validation errors removed (learning)")
    ax.set_title(f"Learning against forgetting over learning rates, digit {digit}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def digit_adapters(changes: list[list[int]], adapter_digits: list[int]) -> Any:
    """The change in each test digit's errors (columns) with each digit's adapter on (rows)."""
    from matplotlib.colors import SymLogNorm

    fig, ax = pyplot().subplots(figsize=(6.5, 5.5))
    limit = max(1, max(abs(v) for row in changes for v in row))
    # Symmetric log colours: the fine-tuned digit's large drop would otherwise wash out the side effects.
    image_data = ax.imshow(changes, cmap="RdBu_r", norm=SymLogNorm(linthresh=5, vmin=-limit, vmax=limit))
    for i, row in enumerate(changes):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
    ax.set_xticks(list(range(10)))
    ax.set_yticks(range(len(adapter_digits)), [str(d) for d in adapter_digits])
    ax.set_xlabel("test digit")
    ax.set_ylabel("adapter trained on digit")
    ax.set_title("Change in test errors with each adapter on")
    fig.colorbar(image_data, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def compose(variants: list[dict[str, Any]], families: tuple[str, ...], base_accuracy: float) -> Any:
    """Each composed variant's accuracy against the digits it makes worse, by family, near the base's accuracy."""
    fig, ax = pyplot().subplots(figsize=(7.5, 4.5))
    floor = base_accuracy - 0.03  # the region where a variant could beat the base; the rest is counted, not drawn
    for family, marker in zip(families, "o^sx"):
        members = [v for v in variants if v["family"] == family and v["accuracy"] >= floor]
        ax.scatter([v["accuracy"] for v in members], [v["digits_worse"] for v in members], marker=marker, label=family, alpha=0.8)
    ax.axvline(base_accuracy, color="black", linewidth=1, linestyle="--", label="base model's accuracy")
    ax.set_xlim(floor, max(v["accuracy"] for v in variants) + 0.005)
    ax.set_ylim(-0.5, 10.5)
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("digits with more test errors than the base")
    hidden = sum(v["accuracy"] < floor for v in variants)
    ax.set_title(f"Ten digit adapters on one base ({hidden} variants below {floor:.2f} accuracy not drawn)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

"""Experiment report: experiments/results/**.json collected into experiments/report.md with PNG plots.

Also writes the CSV tables that `dvc plots show` renders (experiments/plots/) and the headline numbers
of every group, experiments/metrics.json, for `dvc metrics diff`. A section whose results are missing
says so instead of failing, so the report builds from any subset of the experiment stages.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from lora.data import DataError
from lora.files import write_csv, write_json, write_text

from .common import EXPERIMENT_RESULTS, pyplot, run_cli, save_figure

PLOTS = Path("experiments/plots")
REPORT = Path("experiments/report.md")
SUMMARY = Path("experiments/metrics.json")


def load_results(results: Path = EXPERIMENT_RESULTS) -> dict[str, list[dict[str, Any]]]:
    """Every result file, grouped by its folder (rank_sweep, seeds, ...); full_finetune.json under 'full_finetune'."""
    groups: dict[str, list[dict[str, Any]]] = {}
    rebuild = "`dvc repro experiments/dvc.yaml` re-runs the stage that writes it"
    for path in sorted(results.rglob("*.json")):
        group = path.parent.name if path.parent != results else path.stem
        try:
            result = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc}); {rebuild}") from None
        if not isinstance(result, dict) or "digit" not in result:
            raise DataError(f"{path}: not an experiment result (no 'digit'); {rebuild}")
        groups.setdefault(group, []).append(result)
    return groups


def digit_errors(run: dict[str, Any], key: str = "lora_on") -> int:
    return run[key]["errors_per_digit"][run["digit"]]


def other_errors(errors_per_digit: list[int], digit: int) -> int:
    return sum(errors_per_digit) - errors_per_digit[digit]


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both fewer target-digit errors and higher accuracy, by errors."""
    front = [
        p for p in points
        if not any(
            q["digit_errors"] <= p["digit_errors"] and q["accuracy"] >= p["accuracy"]
            and (q["digit_errors"], q["accuracy"]) != (p["digit_errors"], p["accuracy"])
            for q in points
        )
    ]
    unique = {(p["digit_errors"], p["accuracy"]): p for p in sorted(front, key=lambda p: (p["replay_fraction"], p["scale"]))}
    return sorted(unique.values(), key=lambda p: p["digit_errors"])


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def frontier_points(replay_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each replay fraction at each inference scale as (target-digit errors, accuracy)."""
    return [
        {
            "replay_fraction": run["replay_fraction"],
            "scale": point["scale"],
            "digit_errors": point["errors_per_digit"][run["digit"]],
            "other_errors": other_errors(point["errors_per_digit"], run["digit"]),
            "accuracy": point["accuracy"],
        }
        for run in sorted(replay_runs, key=lambda r: r["replay_fraction"])
        for point in run["scale_curve"]
    ]


# metrics key -> table heading
SEED_COLUMNS = {
    "base_accuracy": "base accuracy",
    "lora_on_accuracy": "LoRA-on accuracy",
    "target_errors_base": "target errors, base",
    "target_errors_lora_on": "target errors, LoRA on",
    "other_errors_added": "other digits' errors added",
}


def seed_table(runs: list[dict[str, Any]]) -> tuple[list[str], dict[str, tuple[float, float]]]:
    runs = sorted(runs, key=lambda r: r["seed"])
    columns = {
        "base_accuracy": [r["base"]["accuracy"] for r in runs],
        "lora_on_accuracy": [r["lora_on"]["accuracy"] for r in runs],
        "target_errors_base": [digit_errors(r, "base") for r in runs],
        "target_errors_lora_on": [digit_errors(r) for r in runs],
        "other_errors_added": [
            other_errors(r["lora_on"]["errors_per_digit"], r["digit"]) - other_errors(r["base"]["errors_per_digit"], r["digit"])
            for r in runs
        ],
    }
    lines = ["| seed | digit | " + " | ".join(SEED_COLUMNS.values()) + " |", "|---:|---:|" + "---:|" * len(columns)]
    for i, run in enumerate(runs):
        lines.append(f"| {run['seed']} | {run['digit']} | " + " | ".join(_fmt(values[i]) for values in columns.values()) + " |")
    stats = {key: mean_std([float(v) for v in values]) for key, values in columns.items()}
    lines.append("| **mean ± std** | | " + " | ".join(f"{_fmt(m)} ± {_fmt(s)}" for m, s in stats.values()) + " |")
    return lines, stats


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"


def _save(fig: Any, name: str) -> str:
    save_figure(fig, PLOTS / name)
    return f"plots/{name}"


def rank_section(runs: list[dict[str, Any]]) -> list[str]:
    runs = sorted(runs, key=lambda r: (r["alpha"], r["rank"]))
    alphas = sorted({r["alpha"] for r in runs})
    ranks = sorted({r["rank"] for r in runs})
    by_key = {(r["rank"], r["alpha"]): r for r in runs}
    header = ["rank"] + [f"{kind}_alpha{_fmt(a)}" for kind in ("digit_errors", "accuracy") for a in alphas]
    table = [header] + [
        [rank] + [
            (digit_errors(by_key[rank, a]) if kind == "digit_errors" else by_key[rank, a]["lora_on"]["accuracy"])
            if (rank, a) in by_key else ""
            for kind in ("digit_errors", "accuracy") for a in alphas
        ]
        for rank in ranks
    ]
    write_csv(PLOTS / "rank_sweep.csv", table)

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for alpha in alphas:
        points = [(r["rank"], digit_errors(r), r["lora_on"]["accuracy"]) for r in runs if r["alpha"] == alpha]
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"alpha {_fmt(alpha)}")
        right.plot([p[0] for p in points], [p[2] for p in points], marker="o", label=f"alpha {_fmt(alpha)}")
    right.axhline(runs[0]["base"]["accuracy"], color="grey", linestyle=":", label="base model")
    for ax, ylabel in ((left, "target-digit test errors"), (right, "overall test accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(ylabel)
        ax.legend()
    fig.suptitle(f"Rank sweep: adapters trained on digit {runs[0]['digit']}, scored with LoRA on")
    fig.tight_layout()
    image = _save(fig, "rank_sweep.png")

    lines = [
        "## Rank sweep",
        "",
        f"Digit {runs[0]['digit']}, {runs[0]['steps']} steps, scaling = alpha / r. Base model: "
        f"{digit_errors(runs[0], 'base')} target-digit errors, accuracy {runs[0]['base']['accuracy']:.4f}.",
        "",
        "| rank | alpha | scaling | trainable parameters | adapter file | target errors | other digits' errors | accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['rank']} | {_fmt(r['alpha'])} | {r['scaling']:g} | {r['trainable_parameters']:,} | "
            f"{r['adapter_file_bytes'] / 1024:.1f} KiB | {digit_errors(r)} | "
            f"{other_errors(r['lora_on']['errors_per_digit'], r['digit'])} | {r['lora_on']['accuracy']:.4f} |"
        )
    return lines + ["", f"![rank sweep]({image})", ""]


def seeds_section(runs: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    table, stats = seed_table(runs)
    write_csv(PLOTS / "seeds.csv", (
        [["seed", "base_accuracy", "lora_on_accuracy"]]
        + [[r["seed"], r["base"]["accuracy"], r["lora_on"]["accuracy"]] for r in sorted(runs, key=lambda r: r["seed"])]
    ))
    lines = [
        "## Variance over seeds",
        "",
        f"The whole comparison (pretrain, worst digit, LoRA, evaluation) repeated with {len(runs)} seeds; "
        "each seed picks its own worst digit. Standard deviations are sample standard deviations.",
        "",
        *table,
        "",
    ]
    summary = {key: {"mean": round(m, 4), "std": round(s, 4)} for key, (m, s) in stats.items()}
    return lines, summary


def frontier_section(runs: list[dict[str, Any]], points: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The section for the replay runs and their ``frontier_points``; returns it with the Pareto front."""
    front = pareto_front(points)
    write_csv(PLOTS / "frontier.csv", (
        [["replay_fraction", "scale", "digit_errors", "other_errors", "accuracy"]]
        + [[p["replay_fraction"], p["scale"], p["digit_errors"], p["other_errors"], p["accuracy"]] for p in points]
    ))

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
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
    image = _save(fig, "frontier.png")

    digit = runs[0]["digit"]
    plain = next((r for r in runs if r["replay_fraction"] == 0), None)
    lines = ["## Forgetting and how to trade it", ""]
    if plain is not None:
        added = other_errors(plain["lora_on"]["errors_per_digit"], digit) - other_errors(plain["base"]["errors_per_digit"], digit)
        lines += [
            f"Fine-tuned on digit {digit} alone, LoRA on adds {added} errors on the other nine digits "
            f"({other_errors(plain['base']['errors_per_digit'], digit)} → {other_errors(plain['lora_on']['errors_per_digit'], digit)}). "
            "Two levers: the adapter's scale at inference (no retraining) and replaying a share of the other "
            "digits' images during fine-tuning. Each curve is one replay fraction from scale 0 (the base model) to 1.",
            "",
        ]
    lines += [
        f"![frontier]({image})",
        "",
        "Settings on the frontier (no other setting has both fewer target-digit errors and higher accuracy):",
        "",
        "| replay fraction | inference scale | target errors | other digits' errors | accuracy |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {p['replay_fraction']:g} | {p['scale']:g} | {p['digit_errors']} | {p['other_errors']} | {p['accuracy']:.4f} |" for p in front),
        "",
    ]
    return lines, front


def full_section(result: dict[str, Any]) -> list[str]:
    digit = result["digit"]
    lines = [
        "## LoRA against full fine-tuning",
        "",
        f"Same images (digit {digit}), {result['steps']} Adam steps, learning rate and seed; timed side by side in "
        f"one process on {result['device']} ({result['torch_threads']} threads). Base: "
        f"{result['base']['errors_per_digit'][digit]} target errors, accuracy {result['base']['accuracy']:.4f}.",
        "",
        "| | trainable parameters | optimiser state | file | step time | target errors | other digits' errors | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("lora", "LoRA"), ("full", "full fine-tuning")):
        row = result[name]
        lines.append(
            f"| {label} | {row['trainable_parameters']:,} | {_bytes(row['optimizer_state_bytes'])} | {_bytes(row['file_bytes'])} | "
            f"{row['step_ms']:.2f} ms | {row['errors_per_digit'][digit]} | {other_errors(row['errors_per_digit'], digit)} | "
            f"{row['accuracy']:.4f} |"
        )
    return lines + [""]


def _bytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 1024:.1f} KiB"


def digits_section(runs: list[dict[str, Any]]) -> list[str]:
    runs = sorted(runs, key=lambda r: r["digit"])
    changes = [[on - base for on, base in zip(r["lora_on"]["errors_per_digit"], r["base"]["errors_per_digit"])] for r in runs]
    write_csv(PLOTS / "digit_adapters.csv", (
        [["adapter_digit"] + [f"change_digit_{d}" for d in range(10)]] + [[r["digit"], *row] for r, row in zip(runs, changes)]
    ))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    from matplotlib.colors import SymLogNorm

    limit = max(1, max(abs(v) for row in changes for v in row))
    # Symmetric log colours: the fine-tuned digit's large drop would otherwise wash out the side effects.
    image_data = ax.imshow(changes, cmap="RdBu_r", norm=SymLogNorm(linthresh=5, vmin=-limit, vmax=limit))
    for i, row in enumerate(changes):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(10))
    ax.set_yticks(range(len(runs)), [str(r["digit"]) for r in runs])
    ax.set_xlabel("test digit")
    ax.set_ylabel("adapter trained on digit")
    ax.set_title("Change in test errors with each adapter on")
    fig.colorbar(image_data, ax=ax, shrink=0.8)
    fig.tight_layout()
    image = _save(fig, "digit_adapters.png")

    adapters = sum(r["adapter_file_bytes"] for r in runs)
    copies = sum(r["base_file_bytes"] for r in runs)
    lines = [
        "## One adapter per digit",
        "",
        f"{len(runs)} adapters on the one frozen base, side by side in experiments/models/digit_adapters/: "
        f"{_bytes(adapters)} in all, against {_bytes(copies)} for as many full copies of the weights. "
        "Rows: the digit an adapter was trained on; columns: the change in test errors of each digit with it on "
        "(negative is better).",
        "",
        "| adapter | " + " | ".join(str(d) for d in range(10)) + " | accuracy |",
        "|---:|" + "---:|" * 11,
    ]
    for r, row in zip(runs, changes):
        lines.append(f"| {r['digit']} | " + " | ".join(f"**{v}**" if d == r["digit"] else str(v) for d, v in enumerate(row))
                     + f" | {r['lora_on']['accuracy']:.4f} |")
    return lines + ["", f"![digit adapters]({image})", ""]


SECTIONS = ("rank_sweep", "seeds", "replay_sweep", "full_finetune", "digit_adapters")


def run(params: dict[str, Any] | None = None) -> dict[str, Any]:
    groups = load_results()
    PLOTS.mkdir(parents=True, exist_ok=True)  # a DVC output of the stage, even when no section has a plot
    lines = [
        "# Experiments",
        "",
        "Generated by `dvc repro experiments/dvc.yaml` (stage `report`, tasks/report.py) from the committed results "
        "in experiments/results/; do not edit by hand.",
        "",
    ]
    summary: dict[str, Any] = {}
    missing = [name for name in SECTIONS if name not in groups]
    if "rank_sweep" in groups:
        lines += rank_section(groups["rank_sweep"])
        summary["rank_sweep"] = {
            f"r{r['rank']}-a{_fmt(r['alpha'])}": {"digit_errors": digit_errors(r), "accuracy": r["lora_on"]["accuracy"]}
            for r in sorted(groups["rank_sweep"], key=lambda r: (r["rank"], r["alpha"]))
        }
    if "seeds" in groups:
        seed_lines, summary["seeds"] = seeds_section(groups["seeds"])
        lines += seed_lines
    if "replay_sweep" in groups:
        points = frontier_points(groups["replay_sweep"])
        frontier_lines, front = frontier_section(groups["replay_sweep"], points)
        lines += frontier_lines
        summary["frontier"] = {"points": len(front), "max_accuracy": max(p["accuracy"] for p in front)}
        summary["replay_sweep"] = {
            f"replay-{p['replay_fraction']:g}": {k: p[k] for k in ("digit_errors", "other_errors", "accuracy")}
            for p in points if p["scale"] == 1.0
        }
    if "full_finetune" in groups:
        full = groups["full_finetune"][0]
        lines += full_section(full)
        summary["full_vs_lora"] = {
            name: {"digit_errors": full[name]["errors_per_digit"][full["digit"]], "accuracy": full[name]["accuracy"]}
            for name in ("lora", "full")
        }
    if "digit_adapters" in groups:
        lines += digits_section(groups["digit_adapters"])
        summary["digit_adapters"] = {
            f"digit-{r['digit']}": {"digit_errors_change": digit_errors(r) - digit_errors(r, "base"), "accuracy": r["lora_on"]["accuracy"]}
            for r in sorted(groups["digit_adapters"], key=lambda r: r["digit"])
        }
    if missing:
        lines += ["## Not run", "", "No results yet for: " + ", ".join(missing) + ".", ""]
    write_text(REPORT, "\n".join(lines))
    write_json(SUMMARY, summary)
    print(f"report: {REPORT} with {len(SECTIONS) - len(missing)} of {len(SECTIONS)} sections")
    return summary


if __name__ == "__main__":
    run_cli(run)

"""The experiments' report: experiments/results/**.json collected into experiments/report.md with PNG plots.

Each experiment group of experiments/dvc.yaml has one section builder in SECTIONS (the one list of the
groups): it turns the group's results into a :class:`Section` (Markdown lines, headline numbers for
experiments/metrics.json, CSV tables for `dvc plots show`, figures drawn by lora_mnist.report_figures), and
:func:`write_report` writes them all. A group without results is named as not run instead of failing the report.
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError
from .io import csv_text, staged_outputs
from .params import BACKENDS
from .paths import EXPERIMENT_PLOTS, EXPERIMENT_REPORT, EXPERIMENT_RESULTS, EXPERIMENT_SUMMARY
from . import report_figures as figures
from .plotting import save_figure
from .stats import mean_interval


@dataclass
class Section:
    lines: list[str]
    summary: Any
    tables: dict[str, list[list[Any]]] = field(default_factory=dict)  # experiments/plots/<name>.csv
    figures: dict[str, Any] = field(default_factory=dict)  # experiments/plots/<name>.png


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
        if not isinstance(result, dict) or not {"digit", "variants", "points"} & result.keys():
            raise DataError(f"{path}: not an experiment result (no 'digit', 'variants' or 'points'); {rebuild}")
        groups.setdefault(group, []).append(result)
    return groups


def errors_of(errors_per_digit: dict[str, int], digit: int) -> int:
    return errors_per_digit[str(digit)]


def other_errors(errors_per_digit: dict[str, int], digit: int) -> int:
    return sum(errors_per_digit.values()) - errors_per_digit[str(digit)]


def digit_errors(run: dict[str, Any], key: str = "lora_on") -> int:
    return errors_of(run[key]["errors_per_digit"], run["digit"])


def pareto_front(points: list[dict[str, Any]], prefer: tuple[str, ...] = ("replay_fraction", "scale"),
                 lower: str = "digit_errors", higher: str = "accuracy") -> list[dict[str, Any]]:
    """The points no other point beats on both axes (``lower`` is better lower, ``higher`` higher), by ``lower``;
    of points with the same pair, the one lowest in ``prefer``'s keys."""
    def beats(q: dict[str, Any], p: dict[str, Any]) -> bool:
        return q[lower] <= p[lower] and q[higher] >= p[higher] and (q[lower], q[higher]) != (p[lower], p[higher])

    unique: dict[tuple[Any, Any], dict[str, Any]] = {}
    for p in sorted((p for p in points if not any(beats(q, p) for q in points)), key=lambda p: tuple(p[k] for k in prefer)):
        unique.setdefault((p[lower], p[higher]), p)
    return sorted(unique.values(), key=lambda p: p[lower])


def frontier_points(replay_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each replay fraction at each inference scale as (target-digit errors, accuracy)."""
    return [
        {
            "replay_fraction": run["replay_fraction"],
            "scale": point["scale"],
            "digit_errors": errors_of(point["errors_per_digit"], run["digit"]),
            "other_errors": other_errors(point["errors_per_digit"], run["digit"]),
            "accuracy": point["accuracy"],
        }
        for run in sorted(replay_runs, key=lambda r: r["replay_fraction"])
        for point in run["scale_curve"]
    ]


def _fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"


def _bytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 1024:.1f} KiB"


def rank_sweep(runs: list[dict[str, Any]]) -> Section:
    runs = sorted(runs, key=lambda r: (r["alpha"], r["rank"]))
    alphas, ranks = sorted({r["alpha"] for r in runs}), sorted({r["rank"] for r in runs})
    by_key = {(r["rank"], r["alpha"]): r for r in runs}
    kinds = {"digit_errors": digit_errors, "accuracy": lambda r: r["lora_on"]["accuracy"]}
    table = [["rank"] + [f"{kind}_alpha{_fmt(a)}" for kind in kinds for a in alphas]] + [
        [rank] + [value(by_key[rank, a]) if (rank, a) in by_key else "" for value in kinds.values() for a in alphas]
        for rank in ranks
    ]

    fig = figures.rank_sweep({f"alpha {_fmt(a)}": [(r["rank"], digit_errors(r), r["lora_on"]["accuracy"]) for r in runs
                                                  if r["alpha"] == a] for a in alphas},
                             ranks, runs[0]["base"]["accuracy"], runs[0]["digit"])

    lines = [
        "## Rank sweep",
        "",
        f"Digit {runs[0]['digit']}, {runs[0]['steps']} steps, scaling = alpha / r. Base model: "
        f"{digit_errors(runs[0], 'base')} target-digit errors, accuracy {runs[0]['base']['accuracy']:.4f}.",
        "",
        "| rank | alpha | scaling | trainable parameters | adapter file | target errors | other digits' errors | accuracy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['rank']} | {_fmt(r['alpha'])} | {r['scaling']:g} | {r['trainable_parameters']:,} | "
          f"{r['adapter_file_bytes'] / 1024:.1f} KiB | {digit_errors(r)} | "
          f"{other_errors(r['lora_on']['errors_per_digit'], r['digit'])} | {r['lora_on']['accuracy']:.4f} |" for r in runs),
        "",
        "![rank sweep](plots/rank_sweep.png)",
        "",
    ]
    summary = {f"r{r['rank']}-a{_fmt(r['alpha'])}": {"digit_errors": digit_errors(r), "accuracy": r["lora_on"]["accuracy"]}
               for r in sorted(runs, key=lambda r: (r["rank"], r["alpha"]))}
    return Section(lines, summary, {"rank_sweep": table}, {"rank_sweep": fig})


# metrics key -> table heading
SEED_COLUMNS = {
    "base_accuracy": "base accuracy",
    "lora_on_accuracy": "LoRA-on accuracy",
    "accuracy_change": "accuracy change",
    "target_errors_base": "target errors, base",
    "target_errors_lora_on": "target errors, LoRA on",
    "other_errors_added": "other digits' errors added",
}


def seed_columns(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    return {
        "base_accuracy": [r["base"]["accuracy"] for r in runs],
        "lora_on_accuracy": [r["lora_on"]["accuracy"] for r in runs],
        "accuracy_change": [round(r["lora_on"]["accuracy"] - r["base"]["accuracy"], 6) for r in runs],
        "target_errors_base": [digit_errors(r, "base") for r in runs],
        "target_errors_lora_on": [digit_errors(r) for r in runs],
        "other_errors_added": [
            other_errors(r["lora_on"]["errors_per_digit"], r["digit"]) - other_errors(r["base"]["errors_per_digit"], r["digit"])
            for r in runs
        ],
    }


def sign_of(run: dict[str, Any], alpha: float = 0.05) -> str:
    """What LoRA on does to overall test accuracy on this base, by McNemar's test on the same images at ``alpha``."""
    test = run["mcnemar_on_vs_off"]
    if test["p_value"] >= alpha:
        return "no significant change"
    return "helps" if test["only_on_right"] > test["only_off_right"] else "hurts"


def seed_rows(runs: list[dict[str, Any]], columns: dict[str, list[float]]) -> list[str]:
    return [f"| {run['seed']} | {run['pretrain_epochs']} | {run['digit']} | " + " | ".join(_fmt(values[i]) for values in columns.values())
            + f" | {run['mcnemar_on_vs_off']['p_value']:.3g} | {sign_of(run)} |" for i, run in enumerate(runs)]


SEED_HEADER = ["| seed | epochs | digit | " + " | ".join(SEED_COLUMNS.values()) + " | McNemar p | overall |",
               "|---:|---:|---:|" + "---:|" * len(SEED_COLUMNS) + "---:|---|"]


def seeds(runs: list[dict[str, Any]]) -> Section:
    runs = sorted(runs, key=lambda r: r["seed"])
    columns = seed_columns(runs)
    stats = {key: mean_interval([float(v) for v in values]) for key, values in columns.items()} if len(runs) > 1 else {}
    signs = [sign_of(r) for r in runs]
    lines = [
        "## The headline over seeds",
        "",
        f"The whole comparison (pretrain, worst digit on validation, LoRA, test) repeated with {len(runs)} seeds; each "
        "base picks its own worst digit. The interval is the 95% t interval of the mean over seeds; McNemar's exact "
        "test compares LoRA on against off on the same 10,000 test images (overall: its verdict at p < 0.05). "
        f"LoRA on {'; '.join(f'{verdict} on {signs.count(verdict)}' for verdict in sorted(set(signs)))} of the {len(runs)} bases.",
        "",
        *SEED_HEADER,
        *seed_rows(runs, columns),
        *(["| **mean (95% interval)** | | | " + " | ".join(
            f"{_fmt(st['mean'])} ({_fmt(st['ci95_low'])} to {_fmt(st['ci95_high'])})" for st in stats.values()) + " | | |"] if stats else []),
        "",
    ]
    table = [["seed", "base_accuracy", "lora_on_accuracy"]] + [[r["seed"], r["base"]["accuracy"], r["lora_on"]["accuracy"]] for r in runs]
    summary = {"bases": len(runs), "overall": {verdict: signs.count(verdict) for verdict in sorted(set(signs))},
               **{key: {k: round(v, 4) for k, v in st.items() if k != "n"} for key, st in stats.items()}}
    return Section(lines, summary, {"seeds": table})


def long_base(runs: list[dict[str, Any]]) -> Section:
    """Bases trained longer than params.yaml says, each with its own adapter: does the sign of LoRA's effect hold?"""
    runs = sorted(runs, key=lambda r: (r["pretrain_epochs"], r["seed"]))
    lines = ["## A longer-trained base", "",
             "The same comparison on a base pretrained for more epochs (seed as given): a stronger base, the same "
             "fine-tuning.", "", *SEED_HEADER, *seed_rows(runs, seed_columns(runs)), ""]
    summary = [{"seed": r["seed"], "epochs": r["pretrain_epochs"], "base_accuracy": r["base"]["accuracy"],
                "lora_on_accuracy": r["lora_on"]["accuracy"], "mcnemar_p": r["mcnemar_on_vs_off"]["p_value"],
                "overall": sign_of(r)} for r in runs]
    return Section(lines, summary)


def backends(runs: list[dict[str, Any]]) -> Section:
    """Does the fast path train the same model? Each seed's base pretrained by both backends, compared on test."""
    by = {b: {r["seed"]: r for r in runs if r["overrides"]["backend"] == b} for b in BACKENDS}
    both = sorted(set(by["auto"]) & set(by["torch"]))
    lines = ["## Does the fast path train the same model?", "",
             "Each seed's base pretrained twice, by `backend: auto` (the CPU kernels, the default) and by `backend: torch` "
             "(autograd and torch.optim.Adam), from the same initial weights, images and steps, then fine-tuned on its "
             "worst validation digit and scored alike. The two round differently, so their trajectories drift apart. "
             "The test is paired by seed: the 95% t interval of the per-seed difference in base test accuracy "
             "(auto minus torch); the backends differ significantly when it excludes 0.", ""]
    summary: dict[str, Any] = {"seeds": len(both)}
    if len(both) >= 2:
        stats = {b: mean_interval([by[b][s]["base"]["accuracy"] for s in both]) for b in BACKENDS}
        difference = mean_interval([by["auto"][s]["base"]["accuracy"] - by["torch"][s]["base"]["accuracy"] for s in both])
        verdict = ("no significant difference" if difference["ci95_low"] <= 0 <= difference["ci95_high"] else
                   "the CPU kernels' bases are " + ("more" if difference["mean"] > 0 else "less") + " accurate")
        lines += [f"Over {len(both)} seeds: {verdict}; auto minus torch {difference['mean']:.4f} "
                  f"({difference['ci95_low']:.4f} to {difference['ci95_high']:.4f}).", "",
                  "| backend | base accuracy, mean | sd | 95% interval | LoRA-on accuracy, mean |", "|---|---:|---:|---:|---:|"]
        for b, st in stats.items():
            lora_on = statistics.fmean(by[b][s]["lora_on"]["accuracy"] for s in both)
            lines.append(f"| {b} | {st['mean']:.4f} | {st['sd']:.4f} | {st['ci95_low']:.4f} to {st['ci95_high']:.4f} | {lora_on:.4f} |")
        lines.append("")
        summary |= {"verdict": verdict, "difference": {k: round(v, 4) for k, v in difference.items() if k != "n"},
                    **{b: {k: round(v, 4) for k, v in st.items() if k != "n"} for b, st in stats.items()}}
    signs = {b: {seed: sign_of(r) for seed, r in by[b].items()} for b in BACKENDS}
    summary["overall"] = {b: {v: list(found.values()).count(v) for v in sorted(set(found.values()))} for b, found in signs.items()}
    summary["helps"] = [{"backend": b, "seed": seed, "base_accuracy": by[b][seed]["base"]["accuracy"],
                         "lora_on_accuracy": by[b][seed]["lora_on"]["accuracy"], "mcnemar_p": by[b][seed]["mcnemar_on_vs_off"]["p_value"]}
                        for b in BACKENDS for seed, sign in signs[b].items() if sign == "helps"]
    lines += ["LoRA on, overall (McNemar at p < 0.05): " + "; ".join(
        f"{b}: " + ", ".join(f"{v} on {n}" for v, n in summary["overall"][b].items()) for b in BACKENDS) + ".", "",
        "| seed | " + " | ".join(f"base accuracy, {b} | LoRA on (McNemar p), {b}" for b in BACKENDS) + " |",
        "|---:|" + "---:|---|" * len(BACKENDS)]
    for seed in sorted({r["seed"] for r in runs}):
        lines.append(f"| {seed} | " + " | ".join(f"{by[b][seed]['base']['accuracy']:.4f} | {signs[b][seed]} "
                                                 f"({by[b][seed]['mcnemar_on_vs_off']['p_value']:.3g})" if seed in by[b] else "– | –"
                                                 for b in BACKENDS) + " |")
    return Section([*lines, ""], summary)


def replay_sweep(runs: list[dict[str, Any]]) -> Section:
    """The forgetting frontier: each replay fraction at each inference scale, and the Pareto front."""
    points = frontier_points(runs)
    front = pareto_front(points)
    table = [["replay_fraction", "scale", "digit_errors", "other_errors", "accuracy"]] + [
        [p["replay_fraction"], p["scale"], p["digit_errors"], p["other_errors"], p["accuracy"]] for p in points
    ]

    fig = figures.frontier(points, front)

    digit = runs[0]["digit"]
    plain = next((r for r in runs if r["replay_fraction"] == 0), None)
    lines = ["## Forgetting and how to trade it", ""]
    if plain is not None:
        before, after = (other_errors(plain[key]["errors_per_digit"], digit) for key in ("base", "lora_on"))
        lines += [
            f"Fine-tuned on digit {digit} alone, LoRA on adds {after - before} errors on the other nine digits "
            f"({before} → {after}). Two levers: the adapter's scale at inference (no retraining) and replaying a share "
            "of the other digits' images during fine-tuning. Each curve is one replay fraction from scale 0 (the base "
            "model) to 1.",
            "",
        ]
    lines += [
        "![frontier](plots/frontier.png)",
        "",
        "Settings on the Pareto front of the test-set points (descriptive: no setting is chosen from it). A setting is "
        "on it unless another has at most as many target-digit errors and at least its accuracy, and differs in one of "
        "the two; of settings with the same pair, the one with the lowest replay fraction, then scale, is listed:",
        "",
        "| replay fraction | inference scale | target errors | other digits' errors | accuracy |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {p['replay_fraction']:g} | {p['scale']:g} | {p['digit_errors']} | {p['other_errors']} | {p['accuracy']:.4f} |" for p in front),
        "",
    ]
    summary = {
        "frontier": {"points": len(front), "max_accuracy": max(p["accuracy"] for p in front)},
        "points": {f"replay-{p['replay_fraction']:g}": {k: p[k] for k in ("digit_errors", "other_errors", "accuracy")}
                   for p in points if p["scale"] == 1.0},
    }
    return Section(lines, summary, {"frontier": table}, {"frontier": fig})


def full_finetune(runs: list[dict[str, Any]]) -> Section:
    result = runs[0]
    digit = result["digit"]
    lines = [
        "## LoRA against full fine-tuning",
        "",
        f"Same images (digit {digit}), {result['steps']} Adam steps, learning rate and seed. Base: "
        f"{errors_of(result['base']['errors_per_digit'], digit)} target errors, accuracy {result['base']['accuracy']:.4f}. "
        "Step times are printed by the stage, not written: they are not results.",
        "",
        "| | trainable parameters | optimiser state | file | target errors | other digits' errors | accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("lora", "LoRA"), ("full", "full fine-tuning")):
        row = result[name]
        lines.append(
            f"| {label} | {row['trainable_parameters']:,} | {_bytes(row['optimizer_state_bytes'])} | {_bytes(row['file_bytes'])} | "
            f"{errors_of(row['errors_per_digit'], digit)} | {other_errors(row['errors_per_digit'], digit)} | {row['accuracy']:.4f} |"
        )
    summary = {name: {"digit_errors": errors_of(result[name]["errors_per_digit"], digit), "accuracy": result[name]["accuracy"]}
               for name in ("lora", "full")}
    return Section(lines + [""], summary)


METHODS = {"lora_alpha_fixed": "LoRA, alpha fixed", "lora_alpha_over_rank": "LoRA, alpha/rank fixed",
           "full": "full fine-tuning"}


def learning_rates(runs: list[dict[str, Any]]) -> Section:
    """Learning (target-digit errors removed) against forgetting (other digits' errors added) over learning rates:
    each method's frontier drawn on validation, its points' test numbers beside them."""
    result = runs[0]
    base, digit = result["base"], result["digit"]

    def moved(point: dict[str, Any], split: str) -> dict[str, Any]:
        return {"learned": base[split]["digit_errors"] - point[split]["digit_errors"],
                "forgot": point[split]["other_errors"] - base[split]["other_errors"]}

    points = [{**p, "rank_or_0": p["rank"] or 0, **moved(p, "validation")} for p in result["points"]]
    fronts = {m: sorted(pareto_front([p for p in points if p["method"] == m], prefer=("lr", "rank_or_0"), lower="forgot",
                                     higher="learned"), key=lambda p: -p["learned"]) for m in METHODS}
    table = [["method", "rank", "alpha", "lr", "validation_learned", "validation_forgot", "test_learned", "test_forgot"]] + [
        [p["method"], p["rank"] or "", p["alpha"] or "", p["lr"], p["learned"], p["forgot"], *moved(p, "test").values()]
        for p in points]

    fig = figures.learning_rates(points, fronts, METHODS, digit)

    lrs = sorted({p["lr"] for p in points})
    ranks = sorted({p["rank"] for p in points if p["rank"]})
    lines = [
        "## Learning against forgetting, across learning rates",
        "",
        f"As Biderman et al. 2024 compare them: LoRA at ranks {', '.join(map(str, ranks))} with alpha fixed (at "
        f"{_fmt(result['alpha_fixed'])}) and with alpha/rank fixed (at {_fmt(result['alpha_over_rank'])}; the two are one "
        f"setting where rank × {_fmt(result['alpha_over_rank'])} = {_fmt(result['alpha_fixed'])}), and full fine-tuning, "
        f"each at learning rates {', '.join(f'{lr:g}' for lr in lrs)}: "
        f"{len(points)} runs from the main pipeline's base on digit {digit}'s images, {result['steps']} Adam steps, seed "
        f"{result['seed']}. Learning is the target digit's errors removed, forgetting the other digits' errors added "
        f"(validation base: {base['validation']['digit_errors']} and {base['validation']['other_errors']}). One base "
        "and one fine-tuning seed: the frontiers describe this run, they are not a claim about bases in general.",
        "",
        "![learning rates](plots/learning_rates.png)",
        "",
        "Each method's frontier on validation (a run is on it unless another run of the method learned at least as "
        "much and forgot at most as much, and differs in one; of tied runs, the lowest learning rate, then rank), "
        "with the same runs' test numbers:",
        "",
        "| method | rank | alpha | learning rate | learned (val) | forgot (val) | learned (test) | forgot (test) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {METHODS[p['method']]} | {p['rank'] or '–'} | {_fmt(p['alpha']) if p['alpha'] else '–'} | {p['lr']:g} | "
          f"{p['learned']} | {p['forgot']} | {moved(p, 'test')['learned']} | {moved(p, 'test')['forgot']} |"
          for method in METHODS for p in fronts[method]),
        "",
    ]
    target = base["validation"]["digit_errors"]
    lines += [f"The least forgetting (validation) of each method's runs that removed at least a share of the {target} "
              "target errors:", "", "| removed at least | " + " | ".join(METHODS.values()) + " |",
              "|---|" + "---:|" * len(METHODS)]
    for share in (0.5, 0.8, 0.9):
        least = {m: min((p["forgot"] for p in points if p["method"] == m and p["learned"] >= share * target), default=None)
                 for m in METHODS}
        lines.append(f"| {share:.0%} ({math.ceil(share * target)}) | "
                     + " | ".join("–" if v is None else str(v) for v in least.values()) + " |")
    lines.append("")
    most = {m: max(fronts[m], key=lambda p: (p["learned"], -p["forgot"])) for m in METHODS}
    where = {m: f"learning rate {p['lr']:g}" + (f", rank {p['rank']}" if p["rank"] else "") for m, p in most.items()}
    lines += ["Most learning on validation per method: " + "; ".join(
        f"{METHODS[m]} {p['learned']} errors removed for {p['forgot']} added ({where[m]})" for m, p in most.items()) + ".", ""]
    summary = {m: {"frontier_points": len(fronts[m]), "most_learned_validation": most[m]["learned"],
                   "its_forgetting_validation": most[m]["forgot"], "its_lr": most[m]["lr"], "its_rank": most[m]["rank"]}
               for m in METHODS}
    return Section(lines, summary, {"learning_rates": table}, {"learning_rates": fig})


def digit_adapters(runs: list[dict[str, Any]]) -> Section:
    runs = sorted(runs, key=lambda r: r["digit"])
    digits = range(10)
    changes = [[r["lora_on"]["errors_per_digit"][str(d)] - r["base"]["errors_per_digit"][str(d)] for d in digits] for r in runs]
    table = [["adapter_digit"] + [f"change_digit_{d}" for d in digits]] + [[r["digit"], *row] for r, row in zip(runs, changes)]

    fig = figures.digit_adapters(changes, [r["digit"] for r in runs])

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
        "| adapter | " + " | ".join(str(d) for d in digits) + " | accuracy |",
        "|---:|" + "---:|" * 11,
        *(f"| {r['digit']} | " + " | ".join(f"**{v}**" if d == r["digit"] else str(v) for d, v in enumerate(row))
          + f" | {r['lora_on']['accuracy']:.4f} |" for r, row in zip(runs, changes)),
        "",
        "![digit adapters](plots/digit_adapters.png)",
        "",
    ]
    summary = {f"digit-{r['digit']}": {"digit_errors_change": digit_errors(r) - digit_errors(r, "base"), "accuracy": r["lora_on"]["accuracy"]}
               for r in runs}
    return Section(lines, summary, {"digit_adapters": table}, {"digit_adapters": fig})


FAMILIES = ("control", "combination", "routing", "control: random adapters")


def control_lines(controls: dict[str, Any] | None) -> list[str]:
    """Where the real routing and the learned weighting fall among the random draws, on test accuracy."""
    if not controls:
        return []
    routings, weightings = controls["random_routing_accuracy"], controls["random_weights_accuracy"]
    return [
        f"Random controls: {controls['draws']} random routings (each image to a uniformly drawn adapter) reach test "
        f"accuracy {min(routings):.4f} to {max(routings):.4f}; routing to the base's prediction ({controls['routing_accuracy']:.4f}) "
        f"is at the {controls['routing_percentile']:.0f}th percentile of them. {controls['draws']} random weightings of the ten "
        f"adapters (a linear combination, weights uniform in [0, 1)) reach {min(weightings):.4f} to {max(weightings):.4f}; "
        f"the weighting learned on validation (LoraHub-style, a gradient-free search from equal weights, the table's linear, each 1/10, and free to leave [0, 1); validation "
        f"accuracy {controls['learned_validation_accuracy']:.4f}) reaches {controls['learned_accuracy']:.4f} on test, the "
        f"{controls['learned_percentile']:.0f}th percentile of the random weightings; its test errors per digit are "
        f"{', '.join(f'{d}: {e}' for d, e in controls['learned_errors_per_digit'].items())}.",
        "",
    ]


def random_adapter_lines(controls: dict[str, Any] | None) -> list[str]:
    """Each combination and routing rule of the real ten adapters against the same on many draws of random ones."""
    draws = (controls or {}).get("random_adapters")
    if not draws:
        return []
    count = len(next(iter(draws.values()))["random_accuracy"])
    above = sum(d["accuracy"] > max(d["random_accuracy"]) for d in draws.values())
    below = sum(d["accuracy"] < min(d["random_accuracy"]) for d in draws.values())
    return [
        f"Random adapters: {count} draws of ten random adapters with the real ones' per-layer norms (the table's "
        f"\"random\" rows are the first draw), each combined and routed as the real ten. {above} of the {len(draws)} "
        f"real variants beat every draw on test accuracy, and {below} fall below every draw; the percentile is the "
        "share of draws below the real variant (ties count half).",
        "",
        "| variant | accuracy | random draws: min | median | max | percentile |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {d['accuracy']:.4f} | {min(d['random_accuracy']):.4f} | "
          f"{statistics.median(d['random_accuracy']):.4f} | {max(d['random_accuracy']):.4f} | "
          f"{d['percentile']:.0f} |" for name, d in draws.items()),
        "",
    ]


def compose(runs: list[dict[str, Any]]) -> Section:
    """Ten adapters on one base: every combination, routing rule and control, against the base per digit."""
    result = runs[0]
    base, variants = result["base"], result["variants"]
    digits = [str(d) for d in range(10)]
    ordered = sorted(variants, key=lambda v: (FAMILIES.index(v["family"]), v["digits_worse"], -v["accuracy"]))
    real = [v for v in variants if v["family"] in ("combination", "routing")]
    closest = min(real, key=lambda v: (v["digits_worse"], -v["accuracy"]))
    winners = [v for v in real if v["digits_better"] == 10]
    base_macs = next(v["multiply_adds_per_image"] for v in variants if v["family"] == "control" and v["stored_bytes"] == 0)
    table = [["variant", "family", "accuracy", "digits_worse", *(f"errors_digit_{d}" for d in digits)]] + [
        [v["name"], v["family"], v["accuracy"], v["digits_worse"], *(v["errors_per_digit"][d] for d in digits)] for v in ordered
    ]

    fig = figures.compose(variants, FAMILIES, base["accuracy"])

    if winners:
        answer = (f"**Yes.** {len(winners)} of the {len(real)} combinations and routing rules have fewer test errors than "
                  f"the base on all ten digits; the most accurate on the test set, "
                  f"{max(winners, key=lambda v: v['accuracy'])['name']}, reaches "
                  f"{max(v['accuracy'] for v in winners):.4f} against the base's {base['accuracy']:.4f}.")
    else:
        answer = (f"**No.** None of the {len(real)} combinations and routing rules beats the base on every digit. "
                  f"The closest on the test set (picked there after the fact, so an optimistic pick), "
                  f"{closest['name']}, is worse on {closest['digits_worse']}, equal on "
                  f"{10 - closest['digits_worse'] - closest['digits_better']} and better on {closest['digits_better']} "
                  f"of the ten digits, at accuracy {closest['accuracy']:.4f} against the base's {base['accuracy']:.4f}.")
    lines = [
        "## Ten adapters, one base",
        "",
        "Can the frozen base plus the ten per-digit adapters beat the base on every digit? Each combination of "
        "`lora.add_weighted_adapter` (PEFT's types) makes the ten one adapter at three weightings; each routing rule "
        "picks an adapter per test image from the base model's own top predictions (`lora.adapter_per_row`, never the "
        "label). Controls: the base, the best single adapter, the replay sweep's adapter with the best validation "
        "accuracy, and ten random adapters with the "
        "real ones' per-layer norms, combined and routed the same ways, over many draws. Weights and the best single "
        "adapter come "
        f"from {result['selection']}; the test set is only scored.",
        "",
        answer,
        "",
        *control_lines(result.get("controls")),
        *random_adapter_lines(result.get("controls")),
        "![compose](plots/compose.png)",
        "",
        "| variant | family | accuracy | digits worse | better | " + " | ".join(digits) + " | stored | multiply-adds × base |",
        "|---|---|---:|---:|---:|" + "---:|" * 10 + "---:|---:|",
        *(f"| {v['name']} | {v['family']} | {v['accuracy']:.4f} | {v['digits_worse']} | {v['digits_better']} | "
          + " | ".join(str(v["errors_per_digit"][d]) for d in digits)
          + f" | {_bytes(v['stored_bytes']) if v['stored_bytes'] else '–'} | {v['multiply_adds_per_image'] / base_macs:.2f} |"
          for v in ordered),
        "",
        "Stored: the adapter weights a variant needs beside the base (routing keeps all ten). Multiply-adds: per image, "
        "against the base model's one forward; measured forward times are in [docs/experiments.md](../docs/experiments.md).",
        "",
    ]
    summary = {v["name"]: {"accuracy": v["accuracy"], "digits_worse": v["digits_worse"]} for v in ordered}
    if controls := result.get("controls"):
        summary["controls"] = {key: controls[key] for key in ("draws", "routing_percentile", "learned_accuracy", "learned_percentile")}
    return Section(lines, summary, {"compose": table}, {"compose": fig})


def sweep(runs: list[dict[str, Any]]) -> Section:
    """The batched sweep's committed grid (stages/sweep.py): each point's test numbers, all from one process."""
    result = runs[0]
    lines = ["## The batched sweep", "",
             "`python -m flows.sweep --batched` trains every point of a grid of `finetune.*` and `lora.*` keys in one "
             f"process (stages/sweep.py); this is the committed grid of experiments/sweep.yaml, `{'`, `'.join(result['grid'])}`. A "
             "point's numbers are the ones the finetune and evaluate stages give it with its overrides (tests/test_flows.py "
             "runs the same points both ways through DVC); the digit is the base's worst on validation unless "
             "`finetune.digit` is swept.", "",
             "| point | digit | trainable | digit errors, base → LoRA on | test accuracy, base → LoRA on | validation "
             "accuracy, LoRA on | McNemar p |", "|---|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for point in result["points"]:
        name = ", ".join(f"{key}={value}" for key, value in point["overrides"].items())
        lines.append(f"| {name} | {point['digit']} | {point['trainable_parameters']:,} | {point['digit_errors']['base']} → "
                     f"{point['digit_errors']['lora_on']} | {point['base']['accuracy']:.4f} → {point['lora_on']['accuracy']:.4f} "
                     f"| {point['validation']['lora_on']['accuracy']:.4f} | {point['mcnemar_on_vs_off']['p_value']:.3g} |")
        summary.append({"overrides": point["overrides"], "lora_on_accuracy": point["lora_on"]["accuracy"],
                        "digit_errors": point["digit_errors"]["lora_on"]})
    return Section([*lines, ""], summary)


# The experiment groups, in report order: each is a stage of experiments/dvc.yaml (tests/test_dvc_graph.py).
SECTIONS: dict[str, Callable[[list[dict[str, Any]]], Section]] = {
    "rank_sweep": rank_sweep,
    "seeds": seeds,
    "long_base": long_base,
    "backends": backends,
    "replay_sweep": replay_sweep,
    "full_finetune": full_finetune,
    "learning_rates": learning_rates,
    "digit_adapters": digit_adapters,
    "compose": compose,
    "sweep": sweep,
}


def write_report() -> dict[str, Any]:
    """Build every section from the results there are and write the report, its plots and its summary, all at once."""
    groups = load_results()
    sections = {name: build(groups[name]) for name, build in SECTIONS.items() if name in groups}
    missing = [name for name in SECTIONS if name not in groups]
    lines = [
        "# Experiments",
        "",
        "Generated by `dvc repro experiments/dvc.yaml` (stage `report`, lora_mnist/report.py) from the committed "
        "results in experiments/results/; do not edit by hand.",
        "",
        *(line for section in sections.values() for line in section.lines),
    ]
    if missing:
        lines += ["## Not run", "", "No results yet for: " + ", ".join(missing) + ".", ""]
    summary = {name: section.summary for name, section in sections.items()}
    with staged_outputs() as outputs:
        plots = outputs.directory(EXPERIMENT_PLOTS)  # a DVC output of the stage, even when no section has a plot
        for section in sections.values():
            for name, rows in section.tables.items():
                (plots / f"{name}.csv").write_text(csv_text(rows))
            for name, fig in section.figures.items():
                save_figure(fig, plots / f"{name}.png")
        outputs.text(EXPERIMENT_REPORT, "\n".join(lines))
        outputs.json(EXPERIMENT_SUMMARY, summary)
    print(f"report: {EXPERIMENT_REPORT} with {len(sections)} of {len(SECTIONS)} sections")
    return summary

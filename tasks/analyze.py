"""Stage 3, analyze: the base model on the 10,000 test images; pick the digit it gets wrong most often."""
from __future__ import annotations

import json
from typing import Any

from lora.files import write_json
from lora.metrics import predict, summarize, worst_digit
from lora.train import resolve_device

from .common import ANALYSIS, load_base_model, load_data, per_digit, run_cli


def run(params: dict[str, Any]) -> dict[str, Any]:
    device = resolve_device(params["device"])
    images, labels = load_data("analyze", params, "test", training=False)
    summary = summarize(labels, predict(load_base_model(params, device), images))
    worst = worst_digit(summary["errors_per_digit"])
    result = {
        "accuracy": summary["accuracy"],
        "errors": summary["errors"],
        "errors_per_digit": per_digit(summary["errors_per_digit"]),
        "worst_digit": worst,
        "target_digit": chosen_digit(params, summary["errors_per_digit"]),
    }
    write_json(ANALYSIS, result)
    print(f"analyze: base accuracy {result['accuracy']:.4f}; worst digit {worst} "
          f"({summary['errors_per_digit'][worst]} errors); fine-tuning digit {result['target_digit']}")
    return result


def chosen_digit(params: dict[str, Any], errors_per_digit: list[int]) -> int:
    """`finetune.digit` when forced, else the digit with the most errors."""
    forced = params["finetune"]["digit"]
    return worst_digit(errors_per_digit) if forced == "auto" else forced


def target_digit() -> int:
    """The digit chosen by the last analyze run."""
    return int(json.loads(ANALYSIS.read_text())["target_digit"])


if __name__ == "__main__":
    run_cli(run)

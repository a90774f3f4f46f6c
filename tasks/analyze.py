"""Stage 3, analyze: the base model on the 10,000 test images; pick the digit it gets wrong most often."""
from __future__ import annotations

from typing import Any

from lora_mnist.backend import check_backend
from lora_mnist.io import write_json
from lora_mnist.metrics import per_digit, predict, summarize, worst_digit
from lora_mnist.train import resolve_device

from .cli import run_cli
from .inputs import load_base_model, load_data, recorded_value
from .params import Params
from .paths import ANALYSIS


def run(params: Params) -> dict[str, Any]:
    device, backend = resolve_device(params.device), check_backend(params.backend)
    images, labels = load_data("analyze", params, "test", training=False)
    summary = summarize(labels, predict(load_base_model(params, device), images, backend))
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


def chosen_digit(params: Params, errors_per_digit: list[int]) -> int:
    """`finetune.digit` when forced, else the digit with the most errors."""
    forced = params.finetune.digit
    return worst_digit(errors_per_digit) if forced == "auto" else forced


def target_digit() -> int:
    """The digit chosen by the last analyze run, from metrics/analyze.json."""
    return recorded_value(ANALYSIS, "target_digit", lambda d: type(d) is int and 0 <= d <= 9, "a digit 0-9", "analyze")


def main() -> None:
    run_cli(run)


if __name__ == "__main__":
    main()

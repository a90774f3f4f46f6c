"""Stage 3, analyze: the base model on the validation images (held out of training); pick the digit it gets wrong
most often. The test set is not read: it is only for evaluate's final numbers."""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

from typing import Any

from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.cli import run_stage
from lora_mnist.io import write_json
from lora_mnist.metrics import chosen_digit, per_digit, predict, summarize, worst_digit
from lora_mnist.params import Params
from lora_mnist.paths import ANALYSIS
from lora_mnist.train import resolve_device


def run(params: Params) -> dict[str, Any]:
    device = resolve_device(params.device)
    images, labels = load_data("analyze", params, "validation", training=False)
    summary = summarize(labels, predict(load_base_model(params, device), images, params.backend))
    worst = worst_digit(summary["errors_per_digit"])
    result = {
        "split": "validation",
        "images": len(labels),
        "accuracy": summary["accuracy"],
        "errors": summary["errors"],
        "errors_per_digit": per_digit(summary["errors_per_digit"]),
        "worst_digit": worst,
        "target_digit": chosen_digit(params.finetune.digit, summary["errors_per_digit"]),
    }
    write_json(ANALYSIS, result)
    print(f"analyze: base validation accuracy {result['accuracy']:.4f}; worst digit {worst} "
          f"({summary['errors_per_digit'][worst]} errors of {len(labels):,} images); fine-tuning digit {result['target_digit']}")
    return result


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()

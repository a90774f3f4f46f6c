"""Stage 5, evaluate: LoRA on and off, on the validation images and on the test set (read here only), per-digit
changes, McNemar's test of on against off on the same test images, and the integrity check.

The check fails the stage when the base weights' sha256 after fine-tuning differs from the one recorded before it
(or from the weights file now), or when LoRA-off logits are not bit-identical to the base's. Every output is staged
and renamed in once all are written: a failure leaves the previous set (lora_mnist.io.staged_outputs).
"""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

from typing import Any

import torch

from lora import AdapterLoadError, disable_adapter, load_adapter
from lora.config import is_integer
from lora.save_load import PROVENANCE_NAME
from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.cli import run_stage
from lora_mnist.errors import DataError
from lora_mnist.integrity import check_integrity, require_finite
from lora_mnist.io import Outputs, staged_outputs
from lora_mnist.metrics import per_digit, predict, summarize
from lora_mnist.params import Params
from lora_mnist.paths import ADAPTER_DIR, EVALUATE_METRICS, REPORTS
from lora_mnist.plotting import pyplot, save_figure
from lora_mnist.scoring import on_against_base, validation_numbers
from lora_mnist.train import resolve_device

PER_DIGIT_CSV = REPORTS / "per_digit_errors.csv"
PREDICTIONS_CSV = REPORTS / "predictions.csv"
PER_DIGIT_PNG = REPORTS / "per_digit_errors.png"
CONFUSION_JSON = REPORTS / "confusion.json"


def run(params: Params) -> dict[str, Any]:
    device = resolve_device(params.device)
    images, labels = load_data("evaluate", params, "test", training=False)
    model = load_base_model(params, device)
    base_logits = predict(model, images, params.backend)

    # The integrity check compares the hashes itself, with its own verdict, so the loader does not.
    provenance = load_adapter(model, ADAPTER_DIR, allow_base_mismatch=True)
    digit = provenance_digit(provenance)
    base_sha = check_integrity(model, images, base_logits, {
        "before fine-tuning": provenance.get("base_weights_sha256_before"),
        "after fine-tuning": provenance.get("base_weights_sha256"),
    }, params.backend)
    on_logits = require_finite(predict(model, images, params.backend), ADAPTER_DIR)
    off_logits = base_logits  # bit for bit, as check_integrity has just shown

    base, on, off = (summarize(labels, logits) for logits in (base_logits, on_logits, off_logits))
    change = [a - b for a, b in zip(on["errors_per_digit"], base["errors_per_digit"])]
    result = {
        "digit": digit,
        "base": _brief(base),
        "lora_on": _brief(on),
        "lora_off": _brief(off),
        "lora_on_change_per_digit": per_digit(change),
        **on_against_base(labels, base_logits, on_logits, base, on, digit),
        "validation": validation_scores(params, model, digit),
        "integrity": {"base_weights_unchanged": True, "lora_off_bit_identical": True, "base_weights_sha256": base_sha},
    }
    with staged_outputs() as outputs:
        outputs.json(EVALUATE_METRICS, result)
        write_reports(outputs, labels, base_logits, on_logits, base, on, off, digit)
    print(table(base, on, off, digit))
    return result


def validation_scores(params: Params, model: torch.nn.Module, digit: int) -> dict[str, Any]:
    """Accuracy and the digit's errors on the validation images, LoRA off and on (the split the choices use)."""
    images, labels = load_data("evaluate", params, "validation", training=False)
    on = summarize(labels, predict(model, images, params.backend))
    with disable_adapter(model):
        off = summarize(labels, predict(model, images, params.backend))
    return validation_numbers(off, on, digit)


def provenance_digit(provenance: dict[str, Any]) -> int:
    """The digit the adapter was fine-tuned on, as its provenance file records it."""
    digit = provenance.get("digit")
    if not (is_integer(digit) and 0 <= digit <= 9):
        raise DataError(f"{ADAPTER_DIR / PROVENANCE_NAME}: digit={digit!r} is invalid: a digit 0-9 is allowed; "
                        "`dvc repro finetune` rebuilds the adapter")
    return digit


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": summary["accuracy"], "errors": summary["errors"], "errors_per_digit": per_digit(summary["errors_per_digit"])}


def table(base: dict[str, Any], on: dict[str, Any], off: dict[str, Any], digit: int) -> str:
    """Per-digit errors as a Markdown table, the fine-tuned digit marked."""
    rows = ["| digit | base | LoRA on | LoRA off |", "|---|---:|---:|---:|"]
    for d in range(10):
        mark = " (fine-tuned)" if d == digit else ""
        rows.append(f"| {d}{mark} | {base['errors_per_digit'][d]} | {on['errors_per_digit'][d]} | {off['errors_per_digit'][d]} |")
    rows.append(f"| **errors** | {base['errors']} | {on['errors']} | {off['errors']} |")
    rows.append(f"| **accuracy** | {base['accuracy']:.4f} | {on['accuracy']:.4f} | {off['accuracy']:.4f} |")
    return "\n".join(rows)


def write_reports(outputs: Outputs, labels, base_logits, on_logits, base, on, off, digit) -> None:
    outputs.csv(PER_DIGIT_CSV, [["digit", "base", "lora_on", "lora_off"]] + [
        [d, base["errors_per_digit"][d], on["errors_per_digit"][d], off["errors_per_digit"][d]] for d in range(10)
    ])
    outputs.csv(PREDICTIONS_CSV, [["actual", "base", "lora_on"], *zip(
        labels.tolist(), base_logits.argmax(1).tolist(), on_logits.argmax(1).tolist()
    )])
    outputs.json(CONFUSION_JSON, {name: s["confusion"] for name, s in (("base", base), ("lora_on", on), ("lora_off", off))})
    save_figure(per_digit_figure(base, on, digit), outputs.file(PER_DIGIT_PNG))


def per_digit_figure(base: dict[str, Any], on: dict[str, Any], digit: int) -> Any:
    digits = range(10)
    fig, ax = pyplot().subplots(figsize=(7, 3.5), dpi=100)
    ax.bar([d - 0.2 for d in digits], base["errors_per_digit"], width=0.4, label=f"base / LoRA off (acc {base['accuracy']:.3f})")
    ax.bar([d + 0.2 for d in digits], on["errors_per_digit"], width=0.4, label=f"LoRA on (acc {on['accuracy']:.3f})")
    ax.set_xticks(list(digits), [f"{d}*" if d == digit else str(d) for d in digits])
    ax.set_xlabel("digit (* = fine-tuned on)")
    ax.set_ylabel("test errors")
    ax.set_title("Per-digit test errors, LoRA on vs off")
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    run_stage(run, AdapterLoadError)


if __name__ == "__main__":
    main()

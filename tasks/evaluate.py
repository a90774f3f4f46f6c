"""Stage 5, evaluate: the test set with LoRA on and off, per-digit changes, and the integrity check.

The check fails the stage when the base weights' sha256 after fine-tuning differs from the one recorded
before it (or from the weights file now), or when LoRA-off logits are not bit-identical to the base's.
"""
from __future__ import annotations

from typing import Any

from lora import AdapterLoadError, load_adapter
from lora.save_load import PROVENANCE_NAME
from lora_mnist.backend import check_backend
from lora_mnist.errors import DataError
from lora_mnist.integrity import check_integrity, require_finite
from lora_mnist.io import write_csv, write_json
from lora_mnist.metrics import per_digit, predict, summarize
from lora_mnist.train import resolve_device

from .cli import run_cli
from .inputs import load_base_model, load_data
from .params import Params
from .paths import ADAPTER_DIR, EVALUATE_METRICS, REPORTS
from .plotting import pyplot, save_figure

PER_DIGIT_CSV = REPORTS / "per_digit_errors.csv"
PREDICTIONS_CSV = REPORTS / "predictions.csv"
PER_DIGIT_PNG = REPORTS / "per_digit_errors.png"
CONFUSION_JSON = REPORTS / "confusion.json"


def run(params: Params) -> dict[str, Any]:
    device, backend = resolve_device(params.device), check_backend(params.backend)
    images, labels = load_data("evaluate", params, "test", training=False)
    model = load_base_model(params, device)
    base_logits = predict(model, images, backend)

    # The integrity check compares the hashes itself, with its own verdict, so the loader does not.
    provenance = load_adapter(model, ADAPTER_DIR, allow_base_mismatch=True)
    digit = provenance_digit(provenance)
    base_sha = check_integrity(model, images, base_logits, {
        "before fine-tuning": provenance.get("base_weights_sha256_before"),
        "after fine-tuning": provenance.get("base_weights_sha256"),
    }, backend)
    on_logits = require_finite(predict(model, images, backend), ADAPTER_DIR)
    off_logits = base_logits  # bit for bit, as check_integrity has just shown

    base, on, off = (summarize(labels, logits) for logits in (base_logits, on_logits, off_logits))
    change = [a - b for a, b in zip(on["errors_per_digit"], base["errors_per_digit"])]
    result = {
        "digit": digit,
        "base": _brief(base),
        "lora_on": _brief(on),
        "lora_off": _brief(off),
        "lora_on_change_per_digit": per_digit(change),
        "digit_errors": {"base": base["errors_per_digit"][digit], "lora_on": on["errors_per_digit"][digit]},
        "digit_error_reduction": round(1 - on["errors_per_digit"][digit] / max(base["errors_per_digit"][digit], 1), 4),
        "accuracy_change": round(on["accuracy"] - base["accuracy"], 6),
        "integrity": {"base_weights_unchanged": True, "lora_off_bit_identical": True, "base_weights_sha256": base_sha},
    }
    write_json(EVALUATE_METRICS, result)
    _write_reports(labels, base_logits, on_logits, base, on, off, digit)
    print(table(base, on, off, digit))
    return result


def provenance_digit(provenance: dict[str, Any]) -> int:
    """The digit the adapter was fine-tuned on, as its provenance file records it."""
    digit = provenance.get("digit")
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:
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


def _write_reports(labels, base_logits, on_logits, base, on, off, digit) -> None:
    write_csv(PER_DIGIT_CSV, [["digit", "base", "lora_on", "lora_off"]] + [
        [d, base["errors_per_digit"][d], on["errors_per_digit"][d], off["errors_per_digit"][d]] for d in range(10)
    ])
    write_csv(PREDICTIONS_CSV, [["actual", "base", "lora_on"], *zip(
        labels.tolist(), base_logits.argmax(1).tolist(), on_logits.argmax(1).tolist()
    )])

    write_json(CONFUSION_JSON, {name: s["confusion"] for name, s in (("base", base), ("lora_on", on), ("lora_off", off))})
    _plot_per_digit(base, on, digit)


def _plot_per_digit(base: dict[str, Any], on: dict[str, Any], digit: int) -> None:
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
    save_figure(fig, PER_DIGIT_PNG)


def main() -> None:
    run_cli(run, AdapterLoadError)


if __name__ == "__main__":
    main()

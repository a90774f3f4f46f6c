"""Stage 4, finetune: LoRA adapters on the frozen base, trained on the chosen digit's training images alone."""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

from typing import Any

from lora import AdapterLoadError, LoRAConfigError, base_weights_sha256, save_adapter, trainable_parameters
from lora.save_load import WEIGHTS_NAME
from lora_mnist.artifacts import load_base_model, load_data, target_digit
from lora_mnist.cli import run_stage
from lora_mnist.curves import log_losses
from lora_mnist.finetuning import add_adapter, train_on_digit, training_set
from lora_mnist.io import write_json
from lora_mnist.params import Params
from lora_mnist.paths import ADAPTER_DIR, FINETUNE_METRICS
from lora_mnist.train import resolve_device


def run(params: Params) -> dict[str, Any]:
    device, digit = resolve_device(params.device), target_digit()
    images, labels = load_data("finetune", params, "train", training=True)

    model = load_base_model(params, device)
    sha_before = base_weights_sha256(model)
    add_adapter(params, model)
    losses = train_on_digit(params, model, images, labels, digit)
    trainable, total = trainable_parameters(model)

    provenance = save_adapter(model, ADAPTER_DIR, info={"digit": digit, "steps": params.finetune.steps,
                                                         "base_weights_sha256_before": sha_before})
    log_losses("finetune", losses)
    base_total = total - trainable
    selection = training_set(params, labels, digit)
    result = {
        "digit": digit,
        "train_images": len(selection),
        "replay_images": int((labels[selection] != digit).sum()),
        "trainable_parameters": trainable,
        "base_parameters": base_total,
        "trainable_percent": round(100 * trainable / base_total, 3),
        "adapter_file_bytes": (ADAPTER_DIR / WEIGHTS_NAME).stat().st_size,
        "loss_first_10": round(float(losses[:10].mean()), 6),
        "loss_last_10": round(float(losses[-10:].mean()), 6),
        "base_weights_sha256_before": sha_before,
        "base_weights_sha256_after": provenance["base_weights_sha256"],
    }
    write_json(FINETUNE_METRICS, result)
    print(f"finetune: digit {digit}, {trainable:,} trainable parameters ({result['trainable_percent']}% of "
          f"{base_total:,}), loss {result['loss_first_10']:.4f} -> {result['loss_last_10']:.4f}; adapter in {ADAPTER_DIR}")
    return result


def main() -> None:
    run_stage(run, LoRAConfigError, AdapterLoadError)


if __name__ == "__main__":
    main()

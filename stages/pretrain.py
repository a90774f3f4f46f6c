"""Stage 2, pretrain: the oversized MLP on the training images (the validation images held out); weights to
models/base.safetensors, the loss curve and the weights' sha256 to dvclive/pretrain/."""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

import time

from lora.files import file_sha256
from lora_mnist.artifacts import load_data
from lora_mnist.cli import run_stage
from lora_mnist.curves import log_losses
from lora_mnist.pretraining import pretrain_model
from lora_mnist.io import staged_outputs
from lora_mnist.params import Params
from lora_mnist.paths import BASE_WEIGHTS
from lora_mnist.train import resolve_device


def run(params: Params) -> dict:
    device = resolve_device(params.device)
    images, labels = load_data("pretrain", params, "train", training=True)
    started = time.perf_counter()
    model, losses, path = pretrain_model(params, device, images, labels)
    seconds = time.perf_counter() - started  # printed only: no timing goes into a tracked output

    with staged_outputs() as outputs:
        outputs.tensors(BASE_WEIGHTS, model.state_dict())
    log_losses("pretrain", losses, training_path=path, weights_sha256=file_sha256(BASE_WEIGHTS))
    print(f"pretrain: {len(losses)} steps on {len(images):,} images, {device} ({path}), {seconds:.1f} s "
          f"({1e3 * seconds / len(losses):.2f} ms/step), mean loss of the last 100 steps {losses[-100:].mean():.4f}; "
          f"weights in {BASE_WEIGHTS}")
    return {"steps": len(losses), "losses": losses, "training_path": path}


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()

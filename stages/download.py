"""Stage 1, download: the four MNIST IDX files into data/mnist/raw/, each verified by sha256 (lora_mnist/download.py
says which sources are tried, and how)."""
from __future__ import annotations

from lora_mnist.cli import run_stage
from lora_mnist.download import fetch
from lora_mnist.params import Params
from lora_mnist.paths import RAW_DIR


def run(params: Params) -> dict[str, str]:
    used = fetch(RAW_DIR, params.download.sources, params.download.source_dir)
    for name, source in used.items():
        print(f"{name}: {source}")
    return used


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()

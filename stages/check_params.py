"""Stage 0, check_params: params.yaml checked whole (lora_mnist/params.py), before DVC touches any other stage.

DVC compares a stage's params with ``==`` (``true == 1``) and deletes a stage's outputs before it runs it, so
a bad value could either be taken for an unchanged one or cost the outputs of the stage that refuses it. This
stage depends on params.yaml as a file, so any edit runs it first: every other stage depends on its output, so
a refused value stops `dvc repro` and `dvc exp run` here with every output as it was. The output says only that
the file passed; it is the same for every valid file, so it re-runs no stage by itself (each declares its params).
"""
from __future__ import annotations

import json

from lora.files import atomic_file
from lora_mnist.cli import run_stage
from lora_mnist.params import PARAMS_FILE, Params
from lora_mnist.paths import PARAMS_CHECKED


def run(params: Params) -> None:
    with atomic_file(PARAMS_CHECKED) as tmp:
        tmp.write_text(json.dumps({"checked": str(PARAMS_FILE), "valid": True}) + "\n")
    print(f"check_params: {PARAMS_FILE} is valid")


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()

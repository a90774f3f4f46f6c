"""Stage 0, check_params: params.yaml checked whole, before DVC can touch any other stage's outputs.

DVC compares a stage's params with ``==`` (``true == 1``) and deletes a stage's outputs before it runs it, so
a bad value could either be taken for an unchanged one or cost the outputs of the stage that refuses it.
This stage depends on params.yaml as a file, so any edit runs it; it checks every section (the `lora` one
with LoRAConfig) and writes each value, as checked, to its own file: checked_params/seed.json,
checked_params/lora/rank.json and so on. Every stage depends on the files of the params it declares, so a
refused value stops the pipeline here with every output as it was, and a stage re-runs only when one of
its own values changes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora import LoRAConfigError
from lora.files import atomic_dir
from lora_mnist.backend import check_backend
from lora_mnist.errors import BackendError

from .cli import run_cli
from .finetune import lora_config
from .params import PARAMS_FILE, SECTIONS, Params, ParamsError, to_mapping
from .paths import CHECKED_PARAMS

SECTION_NAMES = {*SECTIONS, "lora"}


def checked_files(mapping: dict[str, Any]) -> dict[str, Any]:
    """``{"seed.json": 0, "lora/rank.json": 1, ...}``: one file per value of params.yaml."""
    files = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            files.update({f"{key}/{name}.json": item for name, item in value.items()})
        else:
            files[f"{key}.json"] = value
    return files


def checked_path(declared: str) -> Path:
    """What a stage depends on for a key of its `params:` list: checked_params/lora for a section,
    checked_params/seed.json or checked_params/finetune/digit.json for a value."""
    parts = declared.split(".")
    if declared in SECTION_NAMES:
        return CHECKED_PARAMS.joinpath(*parts)
    return CHECKED_PARAMS.joinpath(*parts[:-1], f"{parts[-1]}.json")


def check(params: Params, source: str = str(PARAMS_FILE)) -> None:
    """The checks that loading params.yaml leaves to the packages owning the values: `lora`, `backend`."""
    lora_config(params, source)
    try:
        check_backend(params.backend)
    except BackendError as exc:
        raise ParamsError(f"{source}: {exc}") from None


def run(params: Params) -> dict[str, Any]:
    check(params)
    checked = checked_files(to_mapping(params))
    with atomic_dir(CHECKED_PARAMS) as tmp:
        for name, value in checked.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(value) + "\n")
    print(f"check_params: params.yaml is valid; its {len(checked)} values are in {CHECKED_PARAMS}/")
    return checked


def main() -> None:
    run_cli(run, LoRAConfigError)


if __name__ == "__main__":
    main()

"""How every stage runs from the command line: params.yaml loaded and checked, expected failures in one line."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from lora_mnist.errors import EXPECTED_ERRORS

from .params import Params, ParamsError, load_params


def run_cli(stage: Callable[[Params], Any], *more_errors: type[BaseException]) -> None:
    """Run ``stage(params)``; an expected failure (the experiment's, a ParamsError, or one of ``more_errors``)
    becomes one line on stderr and exit status 2."""
    try:
        stage(load_params())
    except (*EXPECTED_ERRORS, ParamsError, *more_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

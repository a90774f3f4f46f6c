"""How every stage runs from the command line: params.yaml loaded and checked once, expected failures in one line."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import EXPECTED_ERRORS
from .params import Params, ParamsError, load_params


def run_stage(stage: Callable[[Params], Any], *more_errors: type[BaseException]) -> None:
    """Run ``stage(params)``, its expected failures (and ``more_errors``) each one line: see one_line_errors."""
    with one_line_errors(*more_errors):
        stage(load_params())


@contextmanager
def one_line_errors(*more_errors: type[BaseException]) -> Iterator[None]:
    """For every command: an expected failure (the experiment's, a ParamsError, one of ``more_errors``, or the
    system's: a full disk, a read-only directory, no memory) becomes one line on stderr and exit status 2."""
    try:
        yield
    except (*EXPECTED_ERRORS, ParamsError, *more_errors) as exc:
        _fail(str(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}; the previous outputs are kept")
    except MemoryError:
        _fail("out of memory; the previous outputs are kept")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)

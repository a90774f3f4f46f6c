"""The experiment's expected failures; each message names the value or file and what is allowed."""
from __future__ import annotations


class DataError(ValueError):
    """A dataset file is missing, damaged or not what it claims; the message names the file."""


class WeightsError(ValueError):
    """A weights file is missing, damaged or does not fit the model that params.yaml describes."""


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


class BackendError(ValueError):
    """The requested backend is unknown, or a fast path it needs cannot run here."""


class IntegrityError(RuntimeError):
    """The frozen base weights changed, or LoRA-off outputs differ from the base model's."""


class ResourceError(RuntimeError):
    """The machine lacks the memory a stage needs."""


class TrainingError(RuntimeError):
    """Training diverged: a loss or a trained weight became infinite or NaN."""


EXPECTED_ERRORS = (DataError, WeightsError, DeviceError, BackendError, IntegrityError, ResourceError, TrainingError)

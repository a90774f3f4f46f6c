"""A memory check before loading: stop in one line instead of being killed by the system halfway."""
from __future__ import annotations

from .errors import ResourceError

# What torch itself occupies before any data (its libraries; about 0.8 GB for the CUDA build).
TORCH_BASELINE_BYTES = 900 * 2**20


def require_memory(stage: str, weights: int, image_file_bytes: int, training: bool) -> None:
    """Raise ResourceError when the data (uint8 + float32 copies), ``weights`` float32 parameters (with
    gradients and two Adam moments when training) and torch itself would not fit in the memory available."""
    needed = 5 * image_file_bytes + (4 if training else 1) * 4 * weights + TORCH_BASELINE_BYTES
    available = available_memory()
    if available is not None and needed > available:
        raise ResourceError(
            f"{stage} needs about {needed / 2**30:.1f} GiB of memory but {available / 2**30:.1f} GiB is available; "
            "free memory or make model.hidden_1/hidden_2 smaller"
        )


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where the system does not tell."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

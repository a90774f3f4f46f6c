"""Prefect flows around the DVC pipeline: every DVC stage is a Prefect task; training can go to a GPU pool."""
import os
from pathlib import Path

# Prefect keeps its database and logs inside the project (git-ignored) unless told otherwise.
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parents[1] / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

"""The training flow that the `gpu` work pool runs: one stage, in this worker's own checkout.

Inputs arrive through the DVC remote (cached files with `dvc pull`, params.yaml, dvc.lock and the small
git-tracked outputs as a snapshot beside them); outputs leave the same way.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from prefect import flow, get_run_logger

from flows.dvc_stage import TRAINING_STAGES, checkout_lock, dvc, receive, reproduce, restore, send, snapshot


@flow(name="lora-mnist-train", log_prints=True)
def train_stage(stage: str, exchange_id: str) -> dict[str, Any]:
    if stage not in TRAINING_STAGES:
        raise ValueError(f"stage={stage!r} is invalid: one of {list(TRAINING_STAGES)} is allowed")
    logger = get_run_logger()
    with checkout_lock():
        restore(receive(exchange_id, "request.json"))
        dvc("pull", "--allow-missing")
        reproduce(stage, logger.info)
        dvc("push")
        send(exchange_id, "result.json", snapshot())
    return {"stage": stage, "host": socket.gethostname(), "checkout": os.getcwd()}

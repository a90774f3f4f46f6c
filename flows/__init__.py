"""flows: Prefect flows over DVC's own commands. pipeline (`dvc repro`, or `dvc exp run` with overrides), sweep
(`dvc exp run --temp` per point on a task runner), experiments (`dvc repro experiments/dvc.yaml`) and gpu (the hand-off
to a GPU work pool through git and a DVC remote)."""

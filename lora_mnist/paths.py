"""Where the stages read and write, relative to the project root (dvc.yaml and experiments/dvc.yaml agree)."""
from pathlib import Path

PARAMS_CHECKED = Path("params_checked.json")  # check_params' output, the first dep of every stage
RAW_DIR = Path("data/mnist/raw")
BASE_WEIGHTS = Path("models/base.safetensors")
ADAPTER_DIR = Path("models/adapter")
ANALYSIS = Path("metrics/analyze.json")
FINETUNE_METRICS = Path("metrics/finetune.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
REPORTS = Path("reports")
DVCLIVE = Path("dvclive")
PRETRAIN_SUMMARY = DVCLIVE / "pretrain" / "metrics.json"  # with the sha256 of the weights pretrain wrote
# The experiments pipeline (experiments/dvc.yaml): results in git, models in the DVC cache.
EXPERIMENT_RESULTS = Path("experiments/results")
EXPERIMENT_MODELS = Path("experiments/models")
EXPERIMENT_PLOTS = Path("experiments/plots")
EXPERIMENT_REPORT = Path("experiments/report.md")
EXPERIMENT_SUMMARY = Path("experiments/metrics.json")
SWEEP_GRID = Path("experiments/sweep.yaml")  # the sweep stage's grid: `-S` sweeps, every point in one process
SWEEP_RESULT = EXPERIMENT_RESULTS / "sweep.json"

"""Benchmark: the project's stages against the seed notebook's code, on real MNIST, in one run.

    python -m bench.pipeline                     # full epoch (about 10 minutes on 2 cores)
    python -m bench.pipeline --pretrain-steps 1000   # quicker, same per-step ratios
    python -m bench.pipeline --device cuda --kernels-only   # on a GPU machine without DVC: steps 1 and 2

1. The seed notebook as written (bench/seed_notebook.py) runs end to end in a subprocess and reports each
   step's time.
2. The project's stage kernels run in this process on the same data and hyper-parameters: pretraining,
   evaluation of the test set (base, LoRA on, LoRA off), 100 LoRA steps; medians over --repeats.
3. `dvc repro` of the whole pipeline (data already downloaded) in a temporary git repo, then each stage
   again as its own process for wall time, start-up (imports) and peak memory.
4. Cost growth: k = 1, 2, 4 LoRA configurations as `dvc exp run --temp` (pretrain comes from DVC's cache).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from bench import Output

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "mnist" / "raw"
STAGES = ("pretrain", "analyze", "finetune", "evaluate")


# Linux carries a forked process's peak RSS over from its parent, so a child of this (large) process would
# report at least our own peak: a small launcher process starts the command and reports its peak instead.
LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(f"@@peak_rss_kb={usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, output) of one command, run through the launcher."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}")
    lines = result.stdout.strip().splitlines()
    peak_kb = int(lines[-1].split("=", 1)[1])
    return seconds, peak_kb / 1024, "\n".join(lines[:-1])


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Read+write bandwidth of a 400 MB copy (larger than any cache)."""
    a, b = torch.empty(50_000_000, device=device), torch.empty(50_000_000, device=device)
    b.copy_(a)
    seconds = median_seconds(lambda: b.copy_(a), 5)
    return 2 * a.numel() * 4 / seconds / 1e9


def pretraining_kernels(device: torch.device) -> dict[str, tuple[str, Callable[..., torch.Tensor]]]:
    """The project's pretraining paths on this device, the default first: {key: (label, trainer)}."""
    from lora_mnist.train import train

    fast = "CUDA graphs" if device.type == "cuda" else "the CPU kernels"
    return {"pretrain": (f"pretrain (`backend: auto`: {fast}, the default)", partial(train, backend="auto")),
            "pretrain_torch": ("pretrain (`backend: torch`: autograd + torch.optim.Adam)", partial(train, backend="torch"))}


def project_kernels(pretrain_steps: int, repeats: int, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds, test accuracy after pretraining) of the project's steps, per pretraining kernel."""
    from lora import LoRAConfig, disable_adapter, inject, mark_only_lora_trainable
    from lora_mnist.data import load_split
    from lora_mnist.metrics import predict, summarize
    from lora_mnist.mlp import OversizedMLP
    from lora_mnist.params import LAYERS
    from lora_mnist.train import train

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    train_x, train_y = (t.to(device) for t in load_split(RAW, "train"))
    test_x, test_y = (t.to(device) for t in load_split(RAW, "test"))
    seconds["load"] = time.perf_counter() - started

    trained: dict[str, OversizedMLP] = {}
    for name, (_, trainer) in pretraining_kernels(device).items():
        def pretrain(name=name, trainer=trainer) -> None:
            torch.manual_seed(0)
            trained[name] = OversizedMLP().to(device)
            trainer(trained[name], train_x, train_y, steps=pretrain_steps, batch_size=10, lr=1e-3, seed=0, desc="bench")

        seconds[name] = median_seconds(pretrain, max(1, repeats // 3))
    test_y = test_y.cpu()
    accuracy = {name: summarize(test_y, predict(model, test_x))["accuracy"] for name, model in trained.items()}
    model = trained["pretrain"]
    seconds["test_base"] = median_seconds(lambda: summarize(test_y, predict(model, test_x)), repeats)
    only = train_y == 9

    def finetune() -> None:
        torch.manual_seed(0)
        fresh = OversizedMLP().to(device)
        fresh.load_state_dict(model.state_dict())
        inject(fresh, LoRAConfig(target_modules=LAYERS))
        mark_only_lora_trainable(fresh)
        train(fresh, train_x[only], train_y[only], steps=100, batch_size=10, lr=1e-3, seed=0, desc="bench")

    seconds["finetune_100"] = median_seconds(finetune, repeats)
    inject(model, LoRAConfig(target_modules=LAYERS))
    seconds["test_lora_on"] = median_seconds(lambda: summarize(test_y, predict(model, test_x)), repeats)

    def test_off() -> None:
        with disable_adapter(model):
            summarize(test_y, predict(model, test_x))

    seconds["test_lora_off"] = median_seconds(test_off, repeats)
    return seconds, accuracy


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of the benchmarks' commands: this venv first on PATH, this checkout's MNIST, a git identity."""
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", MNIST_SOURCE_DIR=str(RAW),
                GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@lora-mnist.invalid",
                GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@lora-mnist.invalid", **extra)


def pipeline_repo(tmp: Path, pretrain_steps: int | None, env: dict[str, str]) -> Path:
    import yaml

    repo = tmp / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"]["max_steps"] = pretrain_steps
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"],
                    ["dvc", "repro", "download"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    return repo


def run_pipeline(pretrain_steps: int | None, skip_sweep: bool, env: dict[str, str]) -> tuple[float, dict, dict]:
    """`dvc repro` end to end, each stage as its own process, and the sweep: (repro seconds, per stage, sweep)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        repo = pipeline_repo(Path(tmp), pretrain_steps, env)
        repro_wall, _, _ = run_measured(["dvc", "repro"], repo, env)
        per_stage = {}
        for stage in STAGES:
            wall, rss, _ = run_measured([sys.executable, "-m", f"stages.{stage}"], repo, env)
            startup, _, _ = run_measured([sys.executable, "-c", f"import stages.{stage}"], repo, env)
            per_stage[stage] = (wall, startup, rss)
        sweep = {}
        if not skip_sweep:
            subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True)
            subprocess.run(["git", "commit", "--allow-empty", "-qm", "baseline"], cwd=repo, env=env, check=True)
            ranks = iter(range(2, 9))
            for k in (1, 2, 4):
                started = time.perf_counter()
                for _ in range(k):
                    run_measured(["dvc", "exp", "run", "--temp", "-S", f"lora.rank={next(ranks)}"], repo, env)
                sweep[k] = time.perf_counter() - started
    return repro_wall, per_stage, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=None, help="cap pretraining (default: 1 epoch, 6000 steps)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (as the notebook: CUDA when present) | cpu | cuda")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--kernels-only", action="store_true", help="only steps 1 and 2: no DVC needed")
    parser.add_argument("--write", metavar="PAGE", help="also write the output into PAGE between its bench.pipeline markers")
    args = parser.parse_args()
    emit = Output()
    from lora_mnist.errors import DeviceError
    from lora_mnist.train import resolve_device

    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        parser.error(str(exc))
    steps = args.pretrain_steps or 6000
    env = bench_env()

    seed_cmd = [sys.executable, "-m", "bench.seed_notebook", "--raw-dir", str(RAW), "--device", str(device)]
    if args.pretrain_steps:
        seed_cmd += ["--pretrain-steps", str(args.pretrain_steps)]
    seed_wall, seed_rss, seed_out = run_measured(seed_cmd, ROOT, env)
    seed = json.loads(seed_out.strip().splitlines()[-1])
    ours, accuracy = project_kernels(steps, args.repeats, device)
    if not args.kernels_only:
        repro_wall, per_stage, sweep = run_pipeline(args.pretrain_steps, args.skip_sweep, env)

    weights, input_grad_weights = 2_807_010, 2_020_000  # all parameters; linear2 and linear3 (their input gradients)
    # float32 bytes read or written per step, if nothing stayed in cache. Autograd + Adam: forward reads the
    # weights, backward reads two and writes every gradient, Adam reads p, g, m, v and writes p, m, v.
    autograd_mb = 4 * (9 * weights + input_grad_weights) / 1e6
    # The fused CPU kernel reads and writes p, m, v (the next forward rides along); input gradients read two
    # weights at most (only the rows some batch row back-propagates through).
    fused_mb = 4 * (6 * weights + input_grad_weights) / 1e6
    bandwidth = copy_bandwidth_gbs(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cores"
    emit(f"machine: {platform.machine()}, {where}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"device {device}, copy bandwidth {bandwidth:.1f} GB/s (bytes read + written); pretrain {steps} steps")
    emit()
    emit("| step | seed notebook (s) | this project (s) | ratio |")
    emit("|---|---:|---:|---:|")
    kernels = pretraining_kernels(device)
    labels = {key: label for key, (label, _) in kernels.items()} | {
        "test_base": "test set, base", "finetune_100": "100 LoRA steps", "test_lora_on": "test set, LoRA on",
        "test_lora_off": "test set, LoRA off"}
    for key, label in labels.items():
        seed_seconds = seed["seconds"][key if key in seed["seconds"] else "pretrain"]
        emit(f"| {label} | {seed_seconds:.2f} | {ours[key]:.3f} | {ours[key] / seed_seconds:.3f} |")
    if not args.kernels_only:
        emit(f"| end to end: notebook process vs `dvc repro` (data present) | {seed_wall:.1f} | {repro_wall:.1f} | "
              f"{repro_wall / seed_wall:.3f} |")
    emit()
    for key, (label, _) in kernels.items():
        fused = key == "pretrain" and device.type == "cpu"
        traffic_mb = fused_mb if fused else autograd_mb
        step_ms = 1e3 * ours[key] / steps
        floor_ms = traffic_mb / 1e3 / bandwidth * 1e3
        emit(f"{label}: {step_ms:.3f} ms/step, test accuracy {accuracy[key]:.4f}; a step moves {'at most' if fused else 'about'} "
              f"{traffic_mb:.0f} MB, {floor_ms:.3f} ms at the copy bandwidth ({step_ms / floor_ms:.1f}x that floor)")
    emit(f"seed notebook on {seed['device']}: test accuracy {seed['accuracy']:.4f}, "
          f"{1e3 * seed['seconds']['pretrain'] / steps:.3f} ms/step, peak RSS {seed_rss:.0f} MB")
    if not args.kernels_only:
        stage_tables(emit, per_stage, sweep)
    if args.write:
        emit.write_into(args.write, "bench.pipeline")


def stage_tables(emit: Output, per_stage: dict, sweep: dict) -> None:
    emit()
    emit("| stage (own process) | wall (s) | start-up: imports (s) | peak RSS (MB) |")
    emit("|---|---:|---:|---:|")
    for stage, (wall, startup, rss) in per_stage.items():
        emit(f"| {stage} | {wall:.1f} | {startup:.1f} | {rss:.0f} |")
    if sweep:
        emit()
        emit("| LoRA configurations (dvc exp run --temp) | seconds | per configuration |")
        emit("|---:|---:|---:|")
        for k, seconds in sweep.items():
            emit(f"| {k} | {seconds:.1f} | {seconds / k:.1f} |")


if __name__ == "__main__":
    main()

"""Benchmark: where a sweep point's wall time goes, from DVC's own timestamped log (`dvc exp run -v`).

    python -m bench.sweep_point                       # prints the breakdown
    python -m bench.sweep_point --write docs/performance.md

In a temporary git repo of this checkout (pretraining capped, as a sweep's points restore it from DVC's run cache
anyway), each point is `dvc exp run --temp -v dvc.yaml -S lora.rank=R`, the command flows.sweep runs per point.
Its log splits the wall time into phases: DVC starting and stashing the experiment, the temporary workspace,
each stage that runs (its process, imports included), and the rest (DVC checking the skipped stages, committing
the experiment, cleaning up). Then `python -m flows.sweep` runs four points with --jobs 2, for the time a point
costs through the flow (its temporary Prefect server included), and the same four with --batched (one experiment,
one process), whose table must give every point the same numbers; then --batched with twelve points, so that the
difference gives what each point adds to a batch beyond the fixed cost of the flow, its server and the experiment.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench import Output
from bench.pipeline import bench_env, pipeline_repo

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def phases(log: str) -> dict[str, float]:
    """Seconds per phase of one `dvc exp run -v` log."""
    last, marks, stages = None, {}, {}
    for line in log.splitlines():
        if found := STAMP.match(line):
            last = datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            marks.setdefault("start", last)
            if "Stashed experiment" in line:
                marks["stashed"] = last
            elif "Running repro in" in line:
                marks["workspace"] = last
            elif stage := re.search(r"stage: '([^']+)' was reproduced", line):
                stages[stage[1]] = (stages[stage[1]][0], last)
        elif stage := re.match(r"Running stage '([^']+)'", line):
            stages[stage[1]] = (last, last)
        marks["end"] = last
    found = {"DVC start, params set, experiment stashed": marks["stashed"] - marks["start"],
             "temporary workspace made": marks["workspace"] - marks["stashed"]}
    found.update({f"stage {name} (DVC checks it, runs its process, saves its outputs)": end - begin for name, (begin, end) in stages.items()})
    found["the rest: skipped stages checked, experiment committed, cleanup"] = (
        marks["end"] - marks["start"] - sum(found.values()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=3, help="points timed one by one (default 3)")
    parser.add_argument("--write", metavar="PAGE", help="also write the output into PAGE between its bench.sweep_point markers")
    args = parser.parse_args()
    env = bench_env(DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    emit = Output()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        repo = pipeline_repo(Path(tmp), 300, env)
        env["PREFECT_HOME"] = str(Path(tmp) / "prefect")
        for command in (["dvc", "repro"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
            subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
        runs, walls = [], []
        for rank in range(2, 2 + args.points):
            started = time.perf_counter()
            result = subprocess.run(["dvc", "exp", "run", "--temp", "-v", "dvc.yaml", "-S", f"lora.rank={rank}"], cwd=repo,
                                    env=env, capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - started)
            runs.append(phases(result.stdout + result.stderr))
        seconds, tables = {}, {}
        for mode, ranks in (("--jobs", range(11, 15)), ("--batched", range(11, 15)), ("--batched-12", range(31, 43))):
            started = time.perf_counter()
            flow = subprocess.run([sys.executable, "-m", "flows.sweep", "-S", f"lora.rank={','.join(map(str, ranks))}",
                                   "--prefix", mode[2:], *(["--jobs", "2"] if mode == "--jobs" else ["--batched"])],
                                  cwd=repo, env=env, capture_output=True, text=True, check=True)
            seconds[mode] = time.perf_counter() - started
            tables[mode] = [line.split()[1:] for line in flow.stdout.strip().splitlines()[-4:]]  # without the experiment
    if tables["--jobs"] != tables["--batched"]:  # the 12-point batch has ranks of its own
        sys.exit(f"the batched sweep's numbers differ from the per-point sweep's: {tables}")
    emit(f"{os.cpu_count()} cores; medians over {len(runs)} points, one at a time; the repo holds experiments/ too, "
         "whose dvc.lock every DVC command reads")
    emit()
    emit("| phase of one `dvc exp run --temp` point | seconds |")
    emit("|---|---:|")
    for phase in runs[0]:
        emit(f"| {phase} | {statistics.median(run.get(phase, 0.0) for run in runs):.1f} |")
    emit(f"| **wall, one point** | **{statistics.median(walls):.1f}** |")
    emit()
    for mode, flags in (("--jobs", "--jobs 2"), ("--batched", "--batched")):
        emit(f"- `python -m flows.sweep -S lora.rank=11,12,13,14 {flags}`: {seconds[mode]:.1f} s, {seconds[mode] / 4:.1f} s a "
             "point (its temporary Prefect server included)")
    emit(f"- the two give every point the same numbers; batched is {seconds['--jobs'] / seconds['--batched']:.1f} times as fast")
    added = (seconds["--batched-12"] - seconds["--batched"]) / 8
    emit(f"- `--batched` with 12 points (lora.rank=31,…,42): {seconds['--batched-12']:.1f} s; each point beyond the "
         f"first four added {added:.1f} s, the rest ({seconds['--batched'] - 4 * added:.1f} s) is fixed: the Prefect server, "
         "the flow, the experiment and the process's start")
    if args.write:
        emit.write_into(args.write, "bench.sweep_point")


if __name__ == "__main__":
    main()

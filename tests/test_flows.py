"""The Prefect flows over DVC's own commands: refusals before anything runs, the pipeline as `dvc repro` per stage
(or one `dvc exp run --temp`), sweeps on threads and on Dask, the registry, and what the GPU hand-off accepts."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import dvc.api
import pytest

from lora_mnist.params import ParamsError
from tests.helpers import ROOT, changed_params, free_port, run_env, sh

REFUSALS = {  # command-line arguments: the one line each prints
    ("flows.pipeline", "-S", "lora.rank=0"): "error: params.yaml with lora.rank=0: lora.rank=0 is invalid: an integer >= 1 is allowed",
    ("flows.pipeline", "-S", "lora.rnak=2"): "error: override lora.rnak=2: params.yaml has no key 'lora.rnak'",
    ("flows.pipeline", "--training", "gpu"): "error: argument --training: invalid choice: 'gpu' (choose from 'auto', 'local', 'gpu-pool')",
    ("flows.pipeline", "--name", "r4"): "error: experiment_name='r4' is given without overrides: only a run with overrides is "
                                        "saved as an experiment (add -S key=value)",
    ("flows.pipeline", "-S", "lora.rank=2", "--name", "a..b"): "error: experiment name 'a..b' is invalid: up to 100 letters, "
                                                               "digits, '_', '.' and '-', starting with a letter or digit, are allowed",
    ("flows.sweep", "-S", "lora.rank=1,2", "--jobs", "0"): "error: jobs=0 is invalid: an integer >= 1 is allowed",
    ("flows.sweep", "-S", "lora.rank=1", "-S", "lora.rank=2"): "error: lora.rank is swept twice: one list of values per key is allowed",
    ("flows.sweep", "-S", "seed=1,2", "--batched"): "error: ['seed'] cannot be swept in one process: only finetune.* and "
                                                    "lora.* keys keep the base model (sweep the others one experiment a point)",
    ("flows.sweep", "-S", "lora.rank=1,1"): "error: sweep 'lora.rank=1,1' repeats a value: each value once is allowed",
    ("flows.sweep", "-S", "download.source_dir=a b,a_b"): "error: the grid's points share experiment names "
                                                          "['sweep-source_dira_b']: a value is repeated, or two values write alike",
    ("flows.sweep", "-S", "lora.rank=1,2", "--prefix", "a/b"): "error: prefix='a/b' is invalid: up to 50 letters, digits, '_' "
                                                               "and '-', starting with a letter or digit",
    ("flows.sweep", "-S", "lora.rank=1,2", "--dask", "tcp://nohost"): "error: dask='tcp://nohost' is invalid: 'local' or a "
                                                                      "scheduler address tcp://host:port is allowed",
    ("flows.experiments", "--group", "sweeps"): "error: groups=['sweeps'] are invalid: ['rank_sweep', 'replay_sweep', "
                                                "'seeds', 'long_base', 'backends', 'digit_adapters', 'full_finetune', "
                                                "'learning_rates', 'compose', 'sweep'] (the stages of "
                                                "experiments/dvc.yaml) are allowed",
    ("flows.experiments", "--bogus"): "error: unrecognized arguments: --bogus",
    ("flows.pipeline", "-S", "lora.rank=4", "--name", "HEAD"): "error: experiment name 'HEAD' is a git revision here (a "
                                                              "branch, tag or commit), which `dvc exp apply HEAD` "
                                                              "would take instead: choose another",
    ("flows.pipeline", "--training", "gpu-pool"): "error: training='gpu-pool' is not possible: no default DVC remote",
}


def test_flow_commands_refuse_bad_arguments_in_one_line_before_prefect_starts_and_leave_params_as_they_were(
        capsys, monkeypatch):
    import importlib

    monkeypatch.chdir(ROOT)
    before = (ROOT / "params.yaml").read_bytes()
    for (module, *args), expected in REFUSALS.items():
        monkeypatch.setattr(sys, "argv", [module, *args])
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main()
        out, err = capsys.readouterr()
        assert exit_.value.code == 2, (args, err)
        assert len(err.splitlines()) == 1, (args, err)
        assert err.strip() == expected, err
        assert "temporary server" not in out + err  # refused before Prefect started one
    assert (ROOT / "params.yaml").read_bytes() == before


def test_flow_commands_name_an_unreachable_prefect_api_url_in_one_line(capsys, monkeypatch):
    import importlib

    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PREFECT_API_URL", url)
    for module, *args in (["flows.pipeline"], ["flows.sweep", "-S", "lora.rank=1,2"], ["flows.experiments"]):
        monkeypatch.setattr(sys, "argv", [module, *args])
        with pytest.raises(SystemExit) as exit_:
            importlib.import_module(module).main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: PREFECT_API_URL={url!r}: no Prefect server answers there"), err


# The rest runs DVC, a Prefect test server and training on real MNIST at a short schedule.


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.logging.configuration import setup_logging
    from prefect.testing.utilities import prefect_test_harness

    # Prefect's console handler keeps the sys.stderr it was made under; a capsys test's closes, and log_prints recurses.
    setup_logging(incremental=False)
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def flow_repo(pipeline_repo: Path, prefect_server, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A short-schedule git repo of the main pipeline as the working directory of in-process flow runs."""
    use_run_env(monkeypatch)
    monkeypatch.chdir(pipeline_repo)
    return pipeline_repo


def use_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's git identity, PATH and MNIST as run_env gives them to the commands of a test repo."""
    for key, value in run_env().items():
        if key.startswith("GIT_") or key in ("MNIST_SOURCE_DIR", "PATH"):
            monkeypatch.setenv(key, value)


def ran(result: dict) -> dict[str, str]:
    return {run["stage"]: run["ran"] for run in result["stages"]}


def commit_all(repo: Path, message: str) -> str:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", message)
    return sh(repo, "git", "rev-parse", "HEAD").strip()


@pytest.mark.slow
def test_pipeline_flow_reproduces_in_dvc_dags_order_skips_when_up_to_date_and_saves_overrides_as_an_experiment(flow_repo):
    from prefect.artifacts import Artifact

    from flows.dvc import stage_order
    from flows.pipeline import pipeline

    order = stage_order()
    assert sorted(order) == ["analyze", "check_params", "download", "evaluate", "finetune", "pretrain"]
    assert order[0] == "check_params" and order[-1] == "evaluate" and order.index("pretrain") < order.index("finetune")
    first = pipeline(training="local")
    assert list(ran(first)) == order and set(ran(first).values()) <= {"here", "run cache"}  # another test's run, in the shared cache
    assert "Data and pipelines are up to date" in sh(flow_repo, "dvc", "status", "dvc.yaml")
    metrics = json.loads((flow_repo / "metrics" / "evaluate.json").read_text())
    table = json.loads(Artifact.get("per-digit-errors").data)
    assert [row["base"] for row in table] == [metrics["base"]["errors_per_digit"][str(d)] for d in range(10)]
    assert table[metrics["digit"]]["digit"] == f"{metrics['digit']} (fine-tuned)"
    assert "## Integrity check: passed" in Artifact.get("lora-run-summary").data
    assert set(ran(pipeline(training="local")).values()) == {"skipped"}
    commit_all(flow_repo, "baseline")

    params_before = (flow_repo / "params.yaml").read_bytes()
    result = pipeline(overrides={"lora.rank": 2}, training="local", experiment_name="flow-rank2")
    assert result["experiment"] == "flow-rank2" and ran(result)["pretrain"] == "skipped"
    assert (flow_repo / "params.yaml").read_bytes() == params_before  # dvc exp run --temp: the workspace is untouched
    assert changed_params(flow_repo, "flow-rank2") == {"lora.rank": (1, 2)}
    diff = json.loads(sh(flow_repo, "dvc", "metrics", "diff", "HEAD", "flow-rank2", "--json"))
    assert diff["metrics/finetune.json"]["trainable_parameters"]["new"] == 2 * 6794
    assert result["metrics"] == json.loads(dvc.api.read("metrics/evaluate.json", repo=str(flow_repo), rev="flow-rank2"))
    with pytest.raises(ValueError, match="experiment name 'flow-rank2' is taken by an experiment of HEAD"):
        pipeline(overrides={"lora.rank": 3}, training="local", experiment_name="flow-rank2")

    # The committed models, by name from DVC's registry, through a DVC remote, into a directory outside any checkout.
    remote, elsewhere, config = flow_repo.parent / "dvc-remote", flow_repo.parent / "elsewhere", flow_repo.parent / "remote.conf"
    sh(flow_repo, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))
    sh(flow_repo, "dvc", "push", "dvc.yaml")
    config.write_text(f"[core]\n    remote = shared\n['remote \"shared\"']\n    url = {remote}\n")
    elsewhere.mkdir()
    for name in ("base-model", "lora-adapter"):
        sh(flow_repo, "gto", "register", name, "--version", "v1.0.0")
        sh(elsewhere, "dvc", "artifacts", "get", str(flow_repo), name, "--config", str(config))
    assert (elsewhere / "base.safetensors").read_bytes() == (flow_repo / "models/base.safetensors").read_bytes()
    for file in (flow_repo / "models" / "adapter").iterdir():
        assert (elsewhere / "adapter" / file.name).read_bytes() == file.read_bytes(), file.name


@pytest.mark.slow
def test_a_sweep_is_one_dvc_experiment_per_point_and_the_dask_command_gets_the_same_metrics(flow_repo, tmp_path):
    from prefect.artifacts import Artifact

    from flows.sweep import sweep

    sh(flow_repo, "dvc", "repro")
    commit_all(flow_repo, "baseline")
    before = {name: (flow_repo / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    on_threads = sweep(grid={"lora.rank": [2, 3]}, prefix="t", jobs=2)
    assert [(row["experiment"], row["lora.rank"]) for row in on_threads] == [("t-rank2", 2), ("t-rank3", 3)]
    assert json.loads(Artifact.get("sweep-results").data) == json.loads(json.dumps(on_threads))
    assert changed_params(flow_repo, "t-rank3") == {"lora.rank": (1, 3)}

    env = {key: value for key, value in run_env().items() if key != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # the command's own temporary server, its workers report to it
    on_dask = subprocess.run([sys.executable, "-m", "flows.sweep", "-S", "lora.rank=2,3", "--dask", "--jobs", "2",
                              "--prefix", "d"], cwd=flow_repo, env=env, capture_output=True, text=True, timeout=600)
    assert on_dask.returncode == 0, on_dask.stdout + on_dask.stderr
    assert [line.split()[0] for line in on_dask.stdout.strip().splitlines()[-2:]] == ["d-rank2", "d-rank3"]
    for rank in (2, 3):
        assert json.loads(sh(flow_repo, "dvc", "metrics", "diff", f"t-rank{rank}", f"d-rank{rank}", "--json")) == {}
    assert {name: (flow_repo / name).read_bytes() for name in before} == before

    with pytest.raises(ValueError, match=r"experiment name 't-rank3' is taken"):
        sweep(grid={"lora.rank": [4, 3]}, prefix="t")  # all or none: t-rank4 does not run either
    assert "t-rank4" not in sh(flow_repo, "dvc", "exp", "list", "--name-only")

    # --batched: the same points as one experiment of the sweep stage, trained in one process, the same numbers
    import yaml

    stages = yaml.safe_load((ROOT / "experiments/dvc.yaml").read_text())["stages"]
    (flow_repo / "experiments").mkdir()
    (flow_repo / "experiments/dvc.yaml").write_text(yaml.safe_dump({"stages": {"sweep": stages["sweep"]}}))
    shutil.copy(ROOT / "experiments/sweep.yaml", flow_repo / "experiments/sweep.yaml")
    commit_all(flow_repo, "the sweep stage")
    batched = sweep(grid={"lora.rank": [2, 3]}, prefix="b", jobs=2, batched=True)
    assert [row.pop("experiment") for row in batched] == ["b-rank2_3"] * 2
    assert batched == [{k: v for k, v in row.items() if k != "experiment"} for row in on_threads]
    assert sh(flow_repo, "dvc", "exp", "list", "--name-only").split().count("b-rank2_3") == 1
    with pytest.raises(ParamsError, match=r"\['seed'\] cannot be swept in one process"):
        sweep(grid={"seed": [1, 2]}, prefix="b2", batched=True)


@pytest.mark.slow
def test_a_sweep_runs_as_many_points_at_once_as_jobs_says(prefect_server, monkeypatch):
    import threading

    import flows.sweep

    monkeypatch.chdir(ROOT)
    jobs, running, peak, changed = 3, [0], [0], threading.Condition()

    def point_that_waits_for_company(*args):  # returns once `jobs` points have run together, or after 20 s
        with changed:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            changed.notify_all()
            changed.wait_for(lambda: peak[0] >= jobs, timeout=20)
            changed.wait(timeout=1)  # a point beyond `jobs` would start meanwhile
            running[0] -= 1
        return ""

    monkeypatch.setattr(flows.sweep, "dvc", point_that_waits_for_company)
    monkeypatch.setattr(flows.sweep, "experiment_metrics", lambda names, files: {name: {"metrics/evaluate.json": {
        "digit": 9, "digit_errors": {"base": 2, "lora_on": 1}, "lora_on": {"accuracy": 0.9}}} for name in names})
    rows = flows.sweep.sweep(grid={"lora.rank": [5, 6, 7, 8]}, prefix="jobs", jobs=jobs)
    assert [row["lora.rank"] for row in rows] == [5, 6, 7, 8] and peak[0] == jobs  # not the pool's 2, nor all 4


def craft_experiment(repo: Path, name: str, commit: str, lock_edit) -> None:
    """An experiment ref of ``commit`` whose dvc.lock ``lock_edit`` changed, as a GPU worker could push one."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock_edit(lock["stages"])
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    sh(repo, "git", "add", "dvc.lock")
    sh(repo, "git", "commit", "-qm", f"experiment {name}")
    sh(repo, "git", "update-ref", f"refs/exps/{commit[:2]}/{commit[2:]}/{name}", "HEAD")
    sh(repo, "git", "reset", "-q", "--hard", commit)


@pytest.mark.slow
def test_the_gpu_hand_off_refuses_a_file_returned_as_a_directory_and_a_listing_that_leaves_itself_touching_nothing(
        pipeline_repo, monkeypatch):
    from flows.gpu import HandoffRefused, check_experiment

    repo = pipeline_repo
    monkeypatch.chdir(repo)
    use_run_env(monkeypatch)
    commit = sh(repo, "git", "rev-parse", "HEAD").strip()
    (repo / "models" / "adapter").mkdir(parents=True)
    (repo / "models" / "adapter" / "keep.txt").write_text("the workspace's own")

    def out(stages, path):
        return next(o for stage in stages.values() for o in stage.get("outs", []) if o["path"] == path)

    craft_experiment(repo, "file-as-dir", commit, lambda stages: out(stages, "models/base.safetensors").update(md5="0" * 32 + ".dir"))
    with pytest.raises(HandoffRefused, match="returns .models/base.safetensors. as a directory"):
        check_experiment("file-as-dir", commit)

    cache = Path(sh(repo, "dvc", "cache", "dir").strip())
    for relpath in ("a\0b.safetensors", "../../escaped", "/etc/passwd"):
        listing = json.dumps([{"md5": "1" * 32, "relpath": relpath}]).encode()
        md5 = hashlib.md5(listing).hexdigest()
        (cache / "files" / "md5" / md5[:2]).mkdir(parents=True, exist_ok=True)
        (cache / "files" / "md5" / md5[:2] / f"{md5[2:]}.dir").write_bytes(listing)
        name = f"listing-{md5[:8]}"
        craft_experiment(repo, name, commit, lambda stages: out(stages, "models/adapter").update(md5=f"{md5}.dir"))
        with pytest.raises(HandoffRefused, match="models/adapter (lists .*, a path outside itself|cannot be listed)"):
            check_experiment(name, commit)
    assert [p.name for p in (repo / "models" / "adapter").iterdir()] == ["keep.txt"]
    assert sh(repo, "git", "status", "--porcelain", "--untracked-files=no") == ""


@pytest.mark.slow
def test_a_flows_dvc_command_waits_for_the_repository_lock_another_process_holds(tmp_path):
    import threading
    import time

    import zc.lockfile

    from flows.dvc import dvc

    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    held = zc.lockfile.LockFile(str(tmp_path / ".dvc" / "tmp" / "lock"))  # as a running `dvc repro` holds it
    plain = subprocess.run(["dvc", "status"], cwd=tmp_path, env=run_env(), capture_output=True, text=True)
    assert plain.returncode != 0 and "Unable to acquire lock" in plain.stderr  # DVC alone gives up after its retries
    threading.Timer(5, held.close).start()
    started = time.monotonic()
    assert "no data or pipelines tracked" in dvc("status", cwd=tmp_path)
    assert time.monotonic() - started >= 4

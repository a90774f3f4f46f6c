"""The packages' import graph runs one way (lora ← lora_mnist ← stages ← flows), and DVC's graph follows it:
each stage depends on the files it imports (tools/code_deps.py writes them), so a change re-runs only the stages
it touched, and every stage waits for check_params."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from lora_mnist.report import SECTIONS
from tests.helpers import ROOT, imported_modules, project_modules, run_env, set_params, sh
from tools import code_deps

LAYERS = ["lora", "lora_mnist", "stages", "flows"]  # each may import only those before it


def _stages(dvc_file: str):
    for name, stage in yaml.safe_load((ROOT / dvc_file).read_text())["stages"].items():
        yield name, stage


def test_the_code_deps_of_every_stage_are_what_the_resolver_writes():
    assert code_deps.main(["--check"]) == 0, "run `make deps`"


def test_the_resolver_follows_lazy_imports_and_writes_a_wholly_used_directory_as_one_dep():
    deps = code_deps.code_deps("stages.finetune")
    assert "lora/save_load.py" in deps and "lora/combine.py" not in deps  # `from lora import save_adapter`, lazily
    assert "lora_mnist/fast" in deps and "lora_mnist/fast/linear_adam.c" not in deps  # the C source, as a file of it
    assert not {"lora/layer.py", "lora/model.py"} & set(code_deps.code_deps("stages.check_params"))
    assert "stages/finetune.py" in deps and "stages/evaluate.py" not in deps  # a stage never imports another
    assert "lora_mnist/report.py" not in deps


def test_a_stage_whose_code_deps_are_out_of_date_is_named_and_rewritten(tmp_path):
    stale = tmp_path / "dvc.yaml"
    stale.write_text((ROOT / "dvc.yaml").read_text().replace("      - lora_mnist/stats.py\n", "", 1))
    before, after, changed = code_deps.update(stale)  # the sources are the project's; only the file is a copy
    assert changed == ["evaluate"] and "lora_mnist/stats.py" not in before
    assert after == (ROOT / "dvc.yaml").read_text()


@pytest.mark.parametrize("dvc_file", ["dvc.yaml", "experiments/dvc.yaml"])
def test_every_stage_after_check_params_depends_on_its_verdict_and_runs_a_stage_module(dvc_file):
    checked = 0
    for name, stage in _stages(dvc_file):
        assert code_deps.STAGE_MODULE.match(stage["cmd"]), name
        if name != "check_params":
            assert "params_checked.json" in stage["deps"], f"{dvc_file}:{name}"
            checked += 1
    assert checked >= 5


def test_import_lora_in_a_fresh_interpreter_loads_nothing_of_the_experiment():
    code = "import sys, lora; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout.replace("'", '"'))
    assert "lora" in loaded
    assert not {"lora_mnist", "stages", "flows", "dvc", "dvclive", "prefect", "matplotlib", "yaml", "ruamel"} & set(loaded)



def test_the_library_imports_only_torch_safetensors_and_the_standard_library():
    allowed = {"torch", "safetensors", "lora", *sys.stdlib_module_names}
    for module, path in project_modules().items():
        if module.split(".")[0] == "lora":
            outside = {name.split(".")[0] for name in imported_modules(path, module)} - allowed
            assert not outside, f"{module} imports {outside}"


def test_imports_run_one_way_between_the_packages_and_have_no_cycle():
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        graph[module] = {name for name in imported_modules(path, module) if name in modules and name != module}
        layer = LAYERS.index(module.split(".")[0])
        upward = {name for name in graph[module] if LAYERS.index(name.split(".")[0]) > layer}
        assert not upward, f"{module} imports {upward} from a later layer"
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for name in sorted(graph[module]):
            if state.get(name) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*trail, module, name]))
            if name not in state:
                visit(name, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_experiment_groups_are_the_stages_of_experiments_dvc_yaml_and_the_report_sections():
    groups = [name for name, _ in _stages("experiments/dvc.yaml") if name != "report"]
    assert sorted(groups) == sorted(SECTIONS)
    from flows.experiments import check_groups

    assert check_groups(None) == groups  # the flow's groups come from `dvc stage list`, in dvc.yaml's order


def test_the_registry_declares_the_models_and_its_meta_describes_the_committed_run():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        artifacts = repo.artifacts.read()
    main, digits = artifacts["dvc.yaml"], artifacts["experiments/dvc.yaml"]
    assert sorted(main) == ["base-model", "lora-adapter"]
    assert sorted(digits) == sorted(f"digit-{d}-adapter" for d in range(10))
    evaluation = json.loads((ROOT / "metrics/evaluate.json").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    base_sha = evaluation["integrity"]["base_weights_sha256"]
    outputs = {next(iter(o)) if isinstance(o, dict) else o for _, stage in _stages("dvc.yaml") for o in stage.get("outs", [])}
    for artifact in [*main.values(), *digits.values()]:
        assert artifact.type == "model" and artifact.desc and artifact.labels
    assert {main["base-model"].path, main["lora-adapter"].path} <= outputs
    assert main["base-model"].meta == {"hidden_1": params["model"]["hidden_1"], "hidden_2": params["model"]["hidden_2"],
                                       "sha256": base_sha}
    assert main["lora-adapter"].meta == {"digit": evaluation["digit"], "rank": params["lora"]["rank"],
                                         "alpha": params["lora"]["alpha"], "base_sha256": base_sha}
    # The per-digit adapters were trained on that same base (its file hash in both lock files) with these settings.
    main_lock, experiments_lock = (yaml.safe_load((ROOT / name).read_text())["stages"] for name in ("dvc.lock", "experiments/dvc.lock"))
    base_md5 = next(o["md5"] for o in main_lock["pretrain"]["outs"] if o["path"] == "models/base.safetensors")
    entry = experiments_lock["digit_adapters"]
    assert next(d["md5"] for d in entry["deps"] if d["path"] == "models/base.safetensors") == base_md5
    for digit in range(10):
        result = json.loads((ROOT / f"experiments/results/digit_adapters/digit-{digit}.json").read_text())
        assert digits[f"digit-{digit}-adapter"].meta == {"digit": digit, "rank": result["rank"], "alpha": result["alpha"],
                                                         "base_sha256": base_sha}
        assert digits[f"digit-{digit}-adapter"].path.startswith(next(o["path"] for o in entry["outs"]).removeprefix("experiments/"))


@pytest.mark.slow
def test_a_change_reruns_only_the_stages_that_import_it_and_forced_reruns_change_no_tracked_file(pipeline_repo):
    tiny = {"model.hidden_1": 64, "model.hidden_2": 32, "pretrain.max_steps": 200, "finetune.steps": 20}
    set_params(pipeline_repo / "params.yaml", **tiny)
    sh(pipeline_repo, "dvc", "repro")
    sh(pipeline_repo, "git", "add", "-A")
    sh(pipeline_repo, "git", "commit", "-qm", "tiny run")

    def changed_stages() -> set[str]:
        result = subprocess.run(["dvc", "status", "--json", "dvc.yaml"], cwd=pipeline_repo, env=run_env(), capture_output=True,
                                text=True, check=True)
        status = json.loads(result.stdout)
        return {name for name, changes in status.items()
                if any("changed deps" in change or "changed command" in change for change in changes if isinstance(change, dict))}

    layer = pipeline_repo / "lora" / "layer.py"
    original = layer.read_text()
    layer.write_text(original.replace('"""LoRALinear:', '"""LoRALinear (a docstring edit):', 1))
    assert changed_stages() == {"finetune", "evaluate"}  # check_params validates lora with lora.config alone
    layer.write_text(original)

    mlp = pipeline_repo / "lora_mnist" / "mlp.py"
    original = mlp.read_text()
    mlp.write_text(original + "\n# an edit of the MLP's module\n")
    assert changed_stages() == {"pretrain", "analyze", "finetune", "evaluate"}
    mlp.write_text(original)
    assert changed_stages() == set()

    sh(pipeline_repo, "dvc", "repro", "--force")  # a second run of every stage: the same bytes in every tracked file
    assert sh(pipeline_repo, "git", "status", "--porcelain") == ""


TINY = {"model.hidden_1": 64, "model.hidden_2": 32, "pretrain.max_steps": 200, "finetune.steps": 20}
BAD_VALUES = [  # one per section of params.yaml; `true` is what DVC's `==` would take for an unchanged 1
    "lora.rank=true", "finetune.lr=inf", "pretrain.lr=1e400", "model.hidden_1=0", "download.sources=[ftp]",
    "seed=18446744073709551616",
]


@pytest.mark.slow
def test_a_refused_param_through_dvc_exp_run_or_dvc_repro_leaves_every_output_byte_for_byte(pipeline_repo):
    set_params(pipeline_repo / "params.yaml", **TINY)
    sh(pipeline_repo, "dvc", "repro")
    sh(pipeline_repo, "git", "add", "-A")
    sh(pipeline_repo, "git", "commit", "-qm", "tiny run")
    outputs = ["data", "models", "metrics", "reports", "dvclive", "params_checked.json"]

    def snapshot() -> dict[str, bytes]:
        paths = [p for name in outputs for p in [pipeline_repo / name, *sorted((pipeline_repo / name).rglob("*"))]]
        return {str(path): path.read_bytes() for path in paths if path.is_file()}

    before = snapshot()
    for bad in BAD_VALUES:
        result = subprocess.run(["dvc", "exp", "run", "-S", bad], cwd=pipeline_repo, env=run_env(), capture_output=True, text=True)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error: params.yaml")]
        assert result.returncode != 0 and len(errors) == 1, (bad, result.stdout + result.stderr)
        assert snapshot() == before, bad
        sh(pipeline_repo, "git", "checkout", "params.yaml")
    (pipeline_repo / "params.yaml").write_text((pipeline_repo / "params.yaml").read_text() + "typo: 1\n")  # by hand, then `dvc repro`
    result = subprocess.run(["dvc", "repro"], cwd=pipeline_repo, env=run_env(), capture_output=True, text=True)
    assert result.returncode != 0 and "error: params.yaml: unknown key 'typo'" in result.stdout + result.stderr
    assert snapshot() == before


@pytest.mark.slow
def test_a_refused_sweep_grid_through_dvc_repro_keeps_the_previous_sweep_result(tmp_path):
    # The sweep's grid is in experiments/sweep.yaml, which check_params does not read, so DVC's deletion of outputs
    # before a stage runs must be turned off for its result (persist) and the stage must refuse before writing.
    stage = yaml.safe_load((ROOT / "experiments/dvc.yaml").read_text())["stages"]["sweep"]
    stage["deps"] = ["experiments/sweep.yaml"]  # the refusal comes before any data or model is read
    (tmp_path / "experiments/results").mkdir(parents=True)
    (tmp_path / "experiments/dvc.yaml").write_text(yaml.safe_dump({"stages": {"sweep": stage}}))
    (tmp_path / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    previous = b'{"grid": ["lora.rank=1"], "points": []}\n'
    (tmp_path / "experiments/results/sweep.json").write_bytes(previous)
    (tmp_path / "experiments/sweep.yaml").write_text("grid: ['lora.rank=1']\n")
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "dvc", "init", "-q")
    sh(tmp_path, "dvc", "commit", "-f", "-q", "experiments/dvc.yaml")  # the previous result, recorded as up to date
    for bad in ("grid: ['seed=1,2']\n", "grid: []\n", "grid: ['lora.rank=0']\n"):
        (tmp_path / "experiments/sweep.yaml").write_text(bad)
        result = subprocess.run(["dvc", "repro", "experiments/dvc.yaml"], cwd=tmp_path, env=run_env(),
                                capture_output=True, text=True, timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode != 0 and len(errors) == 1 and "Traceback" not in result.stderr, (bad, result.stderr)
        assert (tmp_path / "experiments/results/sweep.json").read_bytes() == previous, bad


@pytest.mark.slow
def test_a_fresh_clone_without_cache_or_remote_checks_out_and_pulls_with_allow_missing_as_the_readme_says(pipeline_repo, tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert "`dvc checkout --allow-missing`" in readme and "`dvc pull --allow-missing`" in readme
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(pipeline_repo), str(clone))  # no DVC cache, no remote
    plain = subprocess.run(["dvc", "checkout"], cwd=clone, env=run_env(), capture_output=True, text=True)
    assert plain.returncode != 0 and "Checkout failed" in plain.stdout + plain.stderr
    for command in (["dvc", "checkout", "--allow-missing"], ["dvc", "pull", "--allow-missing"]):
        sh(clone, *command)  # exits 0: what is missing stays missing, for dvc repro to rebuild
    assert sh(clone, "git", "status", "--porcelain") == ""


def test_every_benchmark_imports_what_the_packages_define():
    import importlib

    for path in sorted((ROOT / "bench").glob("*.py")):
        importlib.import_module(f"bench.{path.stem}")  # an ImportError names the missing name

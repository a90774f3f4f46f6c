"""What the flow commands refuse before anything runs, and how a sweep names and tables its points
(flows/sweep.py, flows/pipeline.py): no Prefect server, no DVC."""
from __future__ import annotations

import subprocess
import sys

import pytest

from flows.sweep import check_grid, dask_task_runner, experiment_name, format_table, grid_points, parse_grid, plan
from tasks.params import ParamsError
from tests.helpers import ROOT, free_port


def test_a_grid_is_every_combination_of_its_values_read_as_yaml():
    grid = parse_grid(["lora.rank=1,2", "finetune.lr=1e-3,0.01"])
    assert grid == {"lora.rank": [1, 2], "finetune.lr": [0.001, 0.01]}
    assert grid_points(grid) == [{"lora.rank": 1, "finetune.lr": 0.001}, {"lora.rank": 1, "finetune.lr": 0.01},
                                 {"lora.rank": 2, "finetune.lr": 0.001}, {"lora.rank": 2, "finetune.lr": 0.01}]


@pytest.mark.parametrize("items,message", [
    (["lora.rank=1,2", "lora.rank=4"], "-S lora.rank is given twice"),
    (["lora.rank"], "-S 'lora.rank' is invalid: key=value1,value2 is allowed"),
    (["=1"], "is invalid: key=value1,value2 is allowed"),
])
def test_a_repeated_or_malformed_grid_key_is_refused(items, message):
    with pytest.raises(ParamsError, match=message):
        parse_grid(items)


@pytest.mark.parametrize("grid,jobs,message", [
    ({}, 2, "grid={} is invalid"),
    ({"lora.rank": []}, 2, r"grid\['lora.rank'\]=\[\] is invalid: a non-empty list"),
    ({"lora.rank": 4}, 2, r"grid\['lora.rank'\]=4 is invalid"),
    ({"lora.rank": [2, 2]}, 2, "repeats a value"),
    ({"lora.rank": [2]}, 0, "jobs=0 is invalid: an integer >= 1 is allowed"),
    ({"lora.rank": [2]}, -1, "jobs=-1 is invalid"),
    ({"lora.rank": [2]}, True, "jobs=True is invalid"),
])
def test_an_empty_grid_a_repeated_value_or_fewer_than_one_job_is_refused(grid, jobs, message):
    with pytest.raises(ValueError, match=message):
        check_grid(grid, jobs)


@pytest.mark.parametrize("dask,message", [
    ("127.0.0.1:8786", "dask='127.0.0.1:8786' is invalid: 'local' or a scheduler address"),
    (True, "dask=True is invalid"),
    ("tcp://127.0.0.1", "is invalid: 'local' or a scheduler address tcp://host:port"),
    ("tls://127.0.0.1:8786", "is invalid"),  # no security settings to pass
    ("tcp://127.0.0.1:8786", "needs a Prefect server its workers reach"),  # no PREFECT_API_URL here
])
def test_a_malformed_dask_address_or_a_cluster_without_a_prefect_server_is_refused(dask, message):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(ValueError, match=message):
        dask_task_runner(dask, 2)


def test_a_dask_scheduler_address_where_nothing_listens_is_refused_before_anything_runs():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    address = f"tcp://127.0.0.1:{free_port()}"
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        with pytest.raises(ValueError, match=f"dask='{address}': no Dask scheduler answers there"):
            dask_task_runner(address, 2)


def test_dask_without_prefect_dask_installed_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match=r"dask='local' needs prefect-dask, which is not installed: pip install"):
        dask_task_runner("local", 2)


@pytest.mark.parametrize("prefix,training,message", [
    ("my.sweep", "auto", "prefix='my.sweep' is invalid: up to 50 letters, digits"),
    ("", "auto", "prefix='' is invalid"),
    ("s", "gpu", "training='gpu' is invalid: 'auto', 'local' or 'gpu-pool' is allowed"),
])
def test_a_prefix_that_would_be_rewritten_or_an_unknown_training_mode_is_refused(prefix, training, message):
    with pytest.raises(ValueError, match=message):
        plan({"lora.rank": [2]}, prefix, 2, training)


def test_a_grid_value_json_cannot_write_is_refused_by_the_params_check_not_by_a_traceback():
    grid = parse_grid(["seed=2020-01-01,3"])
    check_grid(grid, 2)
    with pytest.raises(ParamsError, match="seed"):
        plan(grid, "s", 2, "auto")


def test_a_points_experiment_name_is_a_git_ref_name_for_any_value():
    assert experiment_name("sweep", {"lora.rank": 4, "lora.alpha": 0.5}) == "sweep-rank4-alpha0_5"
    assert experiment_name("s", {"device": "cuda:1"}) == "s-devicecuda_1"
    assert experiment_name("s", {"lora.targets": ["fc1", "fc2"]}) == "s-targetsfc1_fc2"


def test_a_grid_of_list_values_keeps_the_commas_inside_brackets_and_quotes_as_dvc_sweeps_do():
    grid = parse_grid(["lora.targets=[linear1],[linear1,linear2]", "download.source_dir='a,b',c"])
    assert grid == {"lora.targets": [["linear1"], ["linear1", "linear2"]], "download.source_dir": ["a,b", "c"]}
    assert plan({"lora.targets": grid["lora.targets"]}, "s", 2, "auto")[1] == ["s-targetslinear1", "s-targetslinear1_linear2"]


def test_an_experiment_name_over_100_characters_is_refused_for_its_length():
    with pytest.raises(ValueError, match="experiment name 'p{50}-source_dirx{60}' is 121 characters long: at most 100 are allowed"):
        plan({"download.source_dir": ["x" * 60]}, "p" * 50, 2, "auto")


def test_the_results_table_aligns_every_column_to_its_widest_cell():
    text = format_table([{"experiment": "s-rank1", "accuracy": 0.9}, {"experiment": "s-rank16", "accuracy": None}])
    assert text.splitlines() == ["experiment  accuracy", "s-rank1     0.9     ", "s-rank16    None    "]


def test_the_pipeline_command_refuses_a_key_given_twice_in_one_line():
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "-S", "lora.rank=2", "-S", "lora.rank=4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: override lora.rank is given more than once: one value per key is allowed"]


def test_the_pipeline_command_refuses_a_bad_value_in_one_line_before_a_prefect_server_starts():
    result = subprocess.run([sys.executable, "-m", "flows.pipeline", "-S", "lora.alpha=-1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml with overrides {'lora.alpha': -1}: lora.alpha=-1 is invalid: a finite number > 0 is allowed"]

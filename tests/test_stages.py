"""Each stage on a small synthetic MNIST: outputs, the worst-digit choice, and the integrity check."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora.files import file_sha256
from lora.save_load import PROVENANCE_NAME
from lora_mnist import integrity, memory
from lora_mnist.batches import finetune_selection
from lora_mnist.errors import DataError, DeviceError, IntegrityError, ResourceError
from lora_mnist.fast import cpu_kernels
from lora_mnist.metrics import worst_digit
from lora_mnist.artifacts import load_data
from lora_mnist.params import load_params
from lora_mnist.stats import percentile_rank
from lora_mnist.paths import ANALYSIS, BASE_WEIGHTS
from stages import analyze, evaluate, finetune, pretrain
from tests.helpers import HARD_DIGIT, ROOT, one_line_error, set_params


def run_all(until: str = "evaluate") -> dict:
    results = {}
    for stage in (pretrain, analyze, finetune, evaluate):
        name = stage.__name__.rsplit(".", 1)[1]
        results[name] = stage.run(load_params())
        if name == until:
            break
    return results


def test_worst_digit_takes_the_most_errors_and_ties_go_to_the_lower_digit():
    assert worst_digit([3, 1, 7, 2, 7, 0, 0, 0, 0, 0]) == 2
    assert worst_digit([0] * 9 + [1]) == 9
    assert worst_digit([5] * 10) == 0


def test_replay_selection_keeps_every_target_image_and_draws_the_requested_share_of_others():
    labels = torch.arange(1000) % 10
    assert torch.equal(finetune_selection(labels, 3, 0.0, seed=0), (labels == 3).nonzero().flatten())
    selection = finetune_selection(labels, 3, 0.25, seed=0)
    assert len(set(selection.tolist())) == len(selection)
    assert int((labels[selection] == 3).sum()) == 100
    assert int((labels[selection] != 3).sum()) == round(100 * 0.25 / 0.75)
    assert torch.equal(selection, finetune_selection(labels, 3, 0.25, seed=0))
    assert not torch.equal(selection, finetune_selection(labels, 3, 0.25, seed=1))
    with pytest.raises(ValueError, match="replay_fraction=1 is invalid"):
        finetune_selection(labels, 3, 1, seed=0)


def test_pretrain_writes_weights_and_a_per_step_loss_curve_deterministically(project):
    first = pretrain.run(load_params())
    weights = BASE_WEIGHTS.read_bytes()
    curve = (project / "dvclive" / "pretrain" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()
    assert curve[0] == "step\tloss" and len(curve) == 1 + first["steps"] == 1 + 40  # 2 epochs of 200 images by 10
    assert first["losses"][-10:].mean() < first["losses"][:10].mean()
    second = pretrain.run(load_params())
    assert torch.equal(first["losses"], second["losses"]) and BASE_WEIGHTS.read_bytes() == weights


@pytest.mark.parametrize("backend, path", [("auto", "cpu-kernels"), ("torch", "eager")])
def test_pretrain_records_the_training_path_its_backend_took(project, backend, path):
    set_params(project / "params.yaml", backend=backend)
    assert pretrain.run(load_params())["training_path"] == path
    summary = json.loads((project / "dvclive" / "pretrain" / "metrics.json").read_text())
    assert summary["training_path"] == path


def test_pretrain_falls_back_to_autograd_without_a_compiler_and_a_bad_backend_is_one_line(project, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("LORA_KERNEL_CACHE", str(tmp_path / "empty-cache"))
    cpu_kernels._library.cache_clear()
    cpu_kernels.kernel_builds.cache_clear()
    try:
        assert pretrain.run(load_params())["training_path"] == "eager"
    finally:
        cpu_kernels._library.cache_clear()
        cpu_kernels.kernel_builds.cache_clear()
    weights = BASE_WEIGHTS.read_bytes()
    set_params(project / "params.yaml", backend="fused")
    assert one_line_error(pretrain.main, capsys) == "error: params.yaml: backend='fused' is invalid: one of 'auto', 'torch' is allowed"
    assert BASE_WEIGHTS.read_bytes() == weights


def test_analyze_picks_the_worst_digit_automatically_or_the_forced_one(project):
    pretrain.run(load_params())
    result = analyze.run(load_params())
    errors = [result["errors_per_digit"][str(d)] for d in range(10)]
    assert result["worst_digit"] == HARD_DIGIT == result["target_digit"]
    assert errors[HARD_DIGIT] >= 2 and errors[HARD_DIGIT] == max(errors)  # of the 10 validation images of the digit
    assert sum(errors) == result["errors"] and 0 <= result["accuracy"] <= 1
    set_params(project / "params.yaml", **{"finetune.digit": 3})
    assert analyze.run(load_params())["target_digit"] == 3
    assert json.loads(ANALYSIS.read_text())["target_digit"] == 3


def _train_images_of(digit: int) -> int:
    """How many images of ``digit`` the training part holds (the validation images are held out of it)."""
    _, labels = load_data("test", load_params(), "train", training=False)
    return int((labels == digit).sum())


def test_a_model_trains_on_the_training_part_and_the_validation_part_is_held_out_of_it(project):
    train, validation = (load_data("test", load_params(), split, training=False)[0] for split in ("train", "validation"))
    assert len(train) == 200 and len(validation) == 100
    assert not {tuple(x.tolist()) for x in validation[:20]} & {tuple(x.tolist()) for x in train}
    set_params(project / "params.yaml", **{"data.split_seed": 1})
    assert not torch.equal(load_data("test", load_params(), "validation", training=False)[0], validation)


def test_finetune_trains_only_the_adapter_and_records_the_unchanged_base_hash(project):
    set_params(project / "params.yaml", **{"finetune.digit": 4})
    results = run_all(until="finetune")
    result = results["finetune"]
    assert result["digit"] == 4 and result["train_images"] == _train_images_of(4) and result["replay_images"] == 0
    assert result["trainable_parameters"] == (784 + 64) + (64 + 32) + (32 + 10)
    assert result["base_weights_sha256_before"] == result["base_weights_sha256_after"]
    assert sorted(p.name for p in (project / "models" / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "adapter_provenance.json"
    ]


def test_finetune_with_replay_trains_on_the_digit_plus_other_digits(project):
    set_params(project / "params.yaml", **{"finetune.digit": 4, "finetune.replay_fraction": 0.5})
    result = run_all(until="finetune")["finetune"]
    fours = _train_images_of(4)
    assert result["train_images"] == 2 * fours and result["replay_images"] == fours


@pytest.mark.slow
def test_evaluate_reports_lora_on_and_off_and_off_equals_base(project):
    result = run_all()["evaluate"]
    assert result["lora_off"] == result["base"]
    assert result["integrity"]["base_weights_unchanged"] and result["integrity"]["lora_off_bit_identical"]
    digit = result["digit"]
    assert result["digit_errors"]["base"] == result["base"]["errors_per_digit"][str(digit)]
    csv_rows = (project / "reports" / "per_digit_errors.csv").read_text().splitlines()
    assert csv_rows[0] == "digit,base,lora_on,lora_off" and len(csv_rows) == 11
    assert len((project / "reports" / "predictions.csv").read_text().splitlines()) == 1 + 200
    assert (project / "reports" / "per_digit_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    confusion = json.loads((project / "reports" / "confusion.json").read_text())
    assert sum(map(sum, confusion["lora_on"])) == 200
    assert [row[d] for d, row in enumerate(confusion["base"])] == [
        20 - result["base"]["errors_per_digit"][str(d)] for d in range(10)
    ]


def _flip_one_bit(path) -> None:
    tensors = load_file(path)
    weight = tensors["linear2.weight"]
    weight.view(torch.int32)[0, 0] ^= 1
    save_file(tensors, path)


def test_a_finetune_that_diverges_stops_in_one_line_and_saves_nothing(project, capsys):
    run_all(until="analyze")
    set_params(project / "params.yaml", **{"finetune.lr": 1e30})  # an alpha that large is refused by the params check
    error = one_line_error(finetune.main, capsys)
    assert re.match(r"error: finetune digit \d diverged: the loss is nan at step \d+ of 20; ", error)
    assert "a smaller learning rate (or LoRA alpha) keeps training finite" in error
    assert not (project / "models" / "adapter").exists()


def test_a_finetune_digit_without_training_images_stops_in_one_line_and_saves_nothing(project, capsys):
    run_all(until="analyze")
    params = load_params()
    held_out = len(load_data("finetune", params, "train", training=True)[1]) + params.data.validation - 1
    set_params(project / "params.yaml", **{"data.validation": held_out})
    digit = (int(load_data("finetune", load_params(), "train", training=True)[1][0]) + 1) % 10  # not the one image left
    set_params(project / "params.yaml", **{"finetune.digit": digit})
    analyze.run(load_params())  # analyze passes the forced digit on
    assert one_line_error(finetune.main, capsys) == (
        f"error: digit {digit} has no training images to fine-tune on: data.validation={held_out} holds out all but 1 "
        "of the training images; a smaller data.validation is allowed")
    assert not (project / "models" / "adapter").exists()


@pytest.mark.parametrize("backend", ["auto", "torch"])  # the CPU kernels, autograd
def test_a_pretrain_that_diverges_stops_in_one_line_and_saves_no_weights(project, capsys, backend):
    set_params(project / "params.yaml", **{"pretrain.lr": 1e30, "backend": backend})
    error = one_line_error(pretrain.main, capsys)
    assert error.startswith("error: pretrain diverged: the loss is ")
    assert not BASE_WEIGHTS.exists()


def test_a_base_bit_flipped_after_pretrain_stops_finetune_in_one_line(project, capsys):
    run_all(until="analyze")
    _flip_one_bit(BASE_WEIGHTS)
    error = one_line_error(finetune.main, capsys)
    assert "integrity check failed: models/base.safetensors has sha256" in error
    assert "that pretrain wrote (dvclive/pretrain/metrics.json): the frozen weights changed" in error
    assert not (project / "models" / "adapter").exists()


@pytest.mark.slow
def test_the_integrity_check_compares_the_hashes_the_adapter_recorded(project):
    run_all(until="finetune")
    provenance = project / "models" / "adapter" / "adapter_provenance.json"
    data = json.loads(provenance.read_text())
    provenance.write_text(json.dumps({**data, "base_weights_sha256_before": "0" * 64}))
    with pytest.raises(IntegrityError, match="integrity check failed: base weights sha256 before fine-tuning 0000000000000000"):
        evaluate.run(load_params())


@pytest.mark.parametrize("digit", [None, "five", 12, True])
def test_an_adapter_provenance_without_a_valid_digit_stops_evaluate_in_one_line(project, capsys, digit):
    run_all(until="finetune")
    provenance = project / "models" / "adapter" / "adapter_provenance.json"
    data = json.loads(provenance.read_text())
    data.pop("digit") if digit is None else data.update(digit=digit)
    provenance.write_text(json.dumps(data))
    assert f"adapter_provenance.json: digit={digit!r} is invalid: a digit 0-9 is allowed" in one_line_error(evaluate.main, capsys)
    assert not (project / "metrics" / "evaluate.json").exists()


@pytest.mark.parametrize("content", [None, "{not json", '{"worst_digit": 3}', '{"target_digit": 11}'])
def test_a_missing_or_damaged_analysis_stops_finetune_in_one_line(project, capsys, content):
    run_all(until="analyze")
    ANALYSIS.unlink() if content is None else ANALYSIS.write_text(content)
    error = one_line_error(finetune.main, capsys)
    assert "metrics/analyze.json:" in error and "dvc repro analyze" in error


@pytest.mark.parametrize("damage, message", [
    (lambda t: t["linear2.bias"].__setitem__(3, float("nan")), "non-finite values in tensor linear2.bias"),
    (lambda t: t.update({"linear1.bias": t["linear1.bias"].double().fill_(1e300)}),  # finite in float64 only
     "non-finite values in tensor linear1.bias once cast to torch.float32 from torch.float64"),
    (lambda t: t.update({"linear3.bias": t["linear3.bias"].to(torch.int8)}),
     "tensor linear3.bias is torch.int8; weights are floating-point (an integer or bool tensor is refused, not cast)"),
])
def test_base_weights_that_are_not_finite_floats_in_the_models_dtype_are_refused_naming_the_tensor(project, capsys, damage, message):
    from lora.files import file_sha256
    from lora_mnist.paths import PRETRAIN_SUMMARY

    run_all(until="pretrain")
    tensors = load_file(BASE_WEIGHTS)
    damage(tensors)
    save_file(tensors, BASE_WEIGHTS)  # as if pretrain itself had written them
    summary = json.loads(PRETRAIN_SUMMARY.read_text())
    PRETRAIN_SUMMARY.write_text(json.dumps({**summary, "weights_sha256": file_sha256(BASE_WEIGHTS)}))
    assert one_line_error(analyze.main, capsys) == f"error: models/base.safetensors: {message}"


def test_an_adapter_too_large_for_the_base_is_refused_instead_of_scored(project, capsys):
    run_all(until="finetune")
    weights = project / "models" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    for name in tensors:
        tensors[name] = tensors[name].sign() * 1e18  # finite, and so is B·A (1e36), but the logits overflow
    save_file(tensors, weights)
    provenance = json.loads((weights.parent / PROVENANCE_NAME).read_text())  # as if saved so
    (weights.parent / PROVENANCE_NAME).write_text(json.dumps({**provenance, "weights_sha256": file_sha256(weights)}))
    error = one_line_error(evaluate.main, capsys)
    assert "with the adapter on, the logits of" in error and "are not finite" in error


@pytest.mark.slow
def test_integrity_check_fails_evaluate_when_one_base_bit_changed(project):
    run_all(until="finetune")
    _flip_one_bit(BASE_WEIGHTS)
    with pytest.raises(IntegrityError, match="integrity check failed: models/base.safetensors has sha256"):
        evaluate.run(load_params())
    assert not (project / "metrics" / "evaluate.json").exists()
    result = subprocess.run(
        [sys.executable, "-m", "stages.evaluate"], cwd=project, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "the frozen weights changed" in result.stderr


def test_integrity_check_fails_evaluate_when_lora_off_differs_from_base(project, monkeypatch):
    run_all(until="finetune")

    @contextmanager
    def adapter_left_on(model):
        yield model

    monkeypatch.setattr(integrity, "disable_adapter", adapter_left_on)
    with pytest.raises(IntegrityError, match="LoRA-off logits differ from the base model's on"):
        evaluate.run(load_params())


def test_an_absent_cuda_device_is_a_clear_error(project):
    if torch.cuda.is_available():
        pytest.skip("this check needs a machine without CUDA")
    set_params(project / "params.yaml", device="cuda")
    with pytest.raises(DeviceError, match="device='cuda' was requested but CUDA is not available"):
        pretrain.run(load_params())


def test_a_stage_that_would_not_fit_in_memory_says_so_before_loading(project, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 200 * 2**20)
    with pytest.raises(ResourceError, match=r"pretrain needs about \d+\.\d GiB of memory but 0\.2 GiB is available"):
        pretrain.run(load_params())
    assert not BASE_WEIGHTS.exists()


@pytest.mark.slow
def test_compose_scores_every_combination_routing_rule_and_control_against_the_base(project, monkeypatch):
    from lora_mnist.compose import COMBINATIONS
    from stages import compose, trial

    assert compose.DRAWS >= 20  # what the committed run draws; three here keep the test short
    monkeypatch.setattr(compose, "DRAWS", 3)
    pretrain.run(load_params())
    trial.run("digit_adapters", "digit-{digit}", ["finetune.digit=range(0,10)"], pretrain=False)
    trial.run("replay_sweep", "replay-{replay_fraction}", ["finetune.replay_fraction=0.5"], pretrain=False)
    result = compose.run(load_params())

    variants = {v["name"]: v for v in result["variants"]}
    per_pool = len(COMBINATIONS) * 3 + 2  # every combination at three weightings, two routing rules
    assert len(variants) == len(result["variants"]) == 3 + 2 * per_pool
    assert [v["family"] for v in result["variants"]].count("control: random adapters") == per_pool
    base = variants["base model"]
    assert base["errors_per_digit"] == result["base"]["errors_per_digit"] and base["digits_worse"] == 0
    for v in variants.values():
        worse = sum(v["errors_per_digit"][d] > base["errors_per_digit"][d] for d in map(str, range(10)))
        assert v["digits_worse"] == worse and 0 <= v["accuracy"] <= 1
    # a combined adapter is one file of rank 1 (linear) or 10 (cat); routing keeps the ten adapters' files
    assert variants["cat, each 1"]["stored_bytes"] > variants["linear, each 1"]["stored_bytes"] > 0
    alone = json.loads((project / "experiments/results/digit_adapters/digit-0.json").read_text())["adapter_file_bytes"]
    assert variants["route to the base's prediction"]["stored_bytes"] == 10 * alone
    assert variants["route by confidence, top 2"]["multiply_adds_per_image"] > variants["route to the base's prediction"]["multiply_adds_per_image"]
    assert json.loads((project / "experiments/results/compose.json").read_text()) == json.loads(json.dumps(result))
    # the controls are distributions: twenty random routings and weightings, and where the real ones fall among them
    controls = result["controls"]
    assert len(controls["random_routing_accuracy"]) == len(controls["random_weights_accuracy"]) == compose.DRAWS
    assert 0 <= controls["routing_percentile"] <= 100
    assert controls["routing_accuracy"] == variants["route to the base's prediction"]["accuracy"]
    assert len(controls["learned_weights"]) == 10 and 0 <= controls["learned_percentile"] <= 100
    assert controls["learned_validation_accuracy"] >= 0  # it started from equal weights and only kept improvements
    learned_errors = sum(controls["learned_errors_per_digit"].values())
    assert learned_errors == round((1 - controls["learned_accuracy"]) * sum(base["errors_per_digit"].values()) / (1 - base["accuracy"]))
    assert "replay adapter (replay-0.5, chosen on validation)" in variants
    # the random-adapter control is DRAWS draws per variant, the first of them the table's "random" rows
    drawn = controls["random_adapters"]
    assert set(drawn) == {name for name, v in variants.items() if v["family"] in ("combination", "routing")}
    for name, d in drawn.items():
        assert len(d["random_accuracy"]) == compose.DRAWS and d["random_accuracy"][0] == variants[f"random {name}"]["accuracy"]
        assert d["accuracy"] == variants[name]["accuracy"] and d["percentile"] == percentile_rank(d["accuracy"], d["random_accuracy"])


def test_the_compose_control_takes_the_replay_adapter_best_on_validation_not_on_test(project):
    from stages import compose

    found = project / "experiments/results/replay_sweep"
    found.mkdir(parents=True)
    for fraction, validation, test in ((0.0, 0.90, 0.99), (0.1, 0.95, 0.91), (0.2, 0.95, 0.92), (0.5, 0.93, 0.93)):
        curve = [{"scale": 0.0, "accuracy": 0.99}, {"scale": 1.0, "accuracy": validation}]
        (found / f"replay-{fraction}.json").write_text(json.dumps({
            "name": f"replay-{fraction}", "replay_fraction": fraction, "lora_on": {"scale": 1.0, "accuracy": test},
            "validation": {"scale_curve": curve}}))
    assert compose.best_replay_adapter() == Path("experiments/models/replay_sweep/replay-0.1")  # the tie: less replay
    (found / "replay-0.5.json").write_text("{")
    with pytest.raises(DataError, match=r"replay_sweep: a result cannot be read .*dvc repro experiments/dvc.yaml:replay_sweep"):
        compose.best_replay_adapter()


def test_routing_follows_the_base_models_ranking_and_each_row_runs_its_own_adapter(project):
    from lora import LoRAConfig, inject, lora_layers, set_adapter
    from lora_mnist.compose import predict_per_row, route_by_prediction
    from lora_mnist.metrics import predict
    from lora_mnist.mlp import OversizedMLP

    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 5.0]])
    names = {0: "zero", 1: "one", 2: "two"}
    assert route_by_prediction(logits, names) == ["one", "two"] and route_by_prediction(logits, names, 1) == ["two", "zero"]

    torch.manual_seed(0)
    model = OversizedMLP(64, 32)
    for name in ("a", "b"):
        inject(model, LoRAConfig(target_modules=("linear1", "linear2", "linear3")), name)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B[name].weight, std=0.5)
    images = torch.rand(7, 28, 28)
    rows = ["a", "b", "b", "a", "b", "a", "a"]
    mixed = predict_per_row(model, images, rows, "auto", batch_size=3)  # batches cut across the rows' adapters
    for name in ("a", "b"):
        set_adapter(model, name)
        alone = predict(model, images, "torch")
        chosen = [i for i, row in enumerate(rows) if row == name]
        torch.testing.assert_close(mixed[chosen], alone[chosen], rtol=1e-5, atol=1e-5)


EVALUATE_OUTPUTS = ("metrics/evaluate.json", "reports/per_digit_errors.csv", "reports/predictions.csv",
                    "reports/per_digit_errors.png", "reports/confusion.json")


def test_a_full_disk_during_evaluate_keeps_the_previous_outputs_as_a_whole_set(project, capsys, monkeypatch):
    import errno

    from lora import files

    run_all()
    before = {name: (project / name).read_bytes() for name in EVALUATE_OUTPUTS}
    set_params(project / "params.yaml", **{"backend": "torch"})  # a rerun would rewrite every output
    real_sync, synced = files.sync, []

    def sync_until_full(tmp):
        if len(synced) == 3:  # three outputs staged and flushed, the fourth finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        synced.append(tmp)
        real_sync(tmp)

    monkeypatch.setattr(files, "sync", sync_until_full)
    error = one_line_error(evaluate.main, capsys)
    assert "No space left on device; the previous outputs are kept" in error
    assert {name: (project / name).read_bytes() for name in EVALUATE_OUTPUTS} == before
    assert not [p for p in project.rglob(".*.tmp")]


def test_an_output_directory_that_cannot_be_made_is_one_line_naming_it(project, capsys):
    run_all(until="finetune")
    (project / "reports").write_text("a file where evaluate writes a directory")  # as a read-only disk, even for root
    error = one_line_error(evaluate.main, capsys)
    assert error.startswith("error: reports") and "the previous outputs are kept" in error
    assert not (project / "metrics" / "evaluate.json").exists()


def test_random_routings_draw_every_adapter_and_differ_from_draw_to_draw():
    from lora_mnist.compose import route_at_random

    generator, pool = torch.Generator().manual_seed(0), {d: f"digit-{d}" for d in range(10)}
    first, second = route_at_random(1000, pool, generator), route_at_random(1000, pool, generator)
    assert set(first) == set(pool.values()) and first != second


def test_the_learned_weighting_never_scores_below_its_equal_weights_start_and_finds_a_better_one():
    from lora_mnist.compose import search_weights

    target = [0.5] + [0.0] * 9
    score = lambda w: -sum((a - b) ** 2 for a, b in zip(w, target))  # noqa: E731
    learned, best = search_weights(score, 10, torch.Generator().manual_seed(0), steps=200)
    assert best == score(learned) > score([0.1] * 10)


def test_mcnemar_is_the_exact_two_sided_binomial_test_of_the_discordant_images():
    from lora_mnist.stats import mcnemar, mean_interval, percentile_rank

    test = mcnemar([True] * 30 + [False] * 10 + [True] * 5, [False] * 30 + [True] * 10 + [True] * 5)
    assert (test["only_first_right"], test["only_second_right"]) == (30, 10)
    assert abs(test["p_value"] - 0.0022214337732293643) < 1e-12  # scipy.stats.binomtest(10, 40).pvalue
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval["mean"] == 2.0 and abs(interval["ci95_high"] - (2 + 4.303 / 3 ** 0.5)) < 1e-9
    assert percentile_rank(2, [1, 2, 3, 4]) == 37.5


def test_the_sweep_stage_gives_each_point_the_numbers_finetune_and_evaluate_give_it_bit_for_bit(project):
    from stages import sweep

    rank = load_params().lora.r
    pipeline = run_all()
    (project / "experiments").mkdir()
    (project / "experiments/sweep.yaml").write_text(f"grid:\n  - lora.rank={rank},{rank + 1}\n  - finetune.lr=0.01\n")
    result = sweep.run(load_params())

    assert [p["overrides"] for p in result["points"]] == [{"lora.rank": rank, "finetune.lr": 0.01},
                                                         {"lora.rank": rank + 1, "finetune.lr": 0.01}]
    assert json.loads((project / "experiments/results/sweep.json").read_text()) == json.loads(json.dumps(result))
    set_params(project / "params.yaml", **{"finetune.lr": 0.01})  # the first point, as the pipeline runs it
    tuned, evaluated = finetune.run(load_params()), evaluate.run(load_params())
    point = result["points"][0]
    for key in ("digit", "digit_errors", "accuracy_change", "mcnemar_on_vs_off", "validation"):
        assert point[key] == evaluated[key], key
    assert point["lora_on"]["accuracy"] == evaluated["lora_on"]["accuracy"] != pipeline["evaluate"]["lora_on"]["accuracy"]
    assert (point["loss_last_10"], point["trainable_parameters"]) == (tuned["loss_last_10"], tuned["trainable_parameters"])
    assert result["points"][1]["trainable_parameters"] > point["trainable_parameters"]


@pytest.mark.parametrize("grid, message", [
    ("grid:\n  - seed=1,2\n", r"\['seed'\] cannot be swept in one process: only finetune.\* and lora.\* keys"),
    ("grid: lora.rank=1\n", "grid='lora.rank=1' is invalid: a non-empty list of sweeps"),
    ("grid:\n  - lora.rank=0,1\n", "lora.rank=0 is invalid"),
])
def test_the_sweep_stage_refuses_a_bad_grid_in_one_line_before_any_training(project, capsys, grid, message):
    from stages import sweep

    run_all(until="pretrain")
    (project / "experiments").mkdir()
    (project / "experiments/sweep.yaml").write_text(grid)
    assert re.search(message, one_line_error(sweep.main, capsys))
    assert not (project / "experiments/results").exists()

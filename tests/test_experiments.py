"""The experiments of experiments/dvc.yaml: trials, LoRA against full fine-tuning, the report, and how DVC expands them."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_mnist.download import MNIST_SHA256
from lora_mnist.errors import DataError, IntegrityError
from lora.files import file_sha256
from lora_mnist.metrics import per_digit
from lora_mnist.mlp import OversizedMLP
from lora_mnist import report
from lora_mnist.params import load_params
from lora_mnist.paths import BASE_WEIGHTS
from stages import full_finetune, learning_rates, pretrain, trial
from tests.helpers import HARD_DIGIT, init_repo, run_env, set_params, sh


def test_trial_records_the_base_and_the_adapter_at_every_inference_scale_on_validation_and_test(project):
    pretrain.run(load_params())
    base_hash = file_sha256(BASE_WEIGHTS)
    results = trial.run("rank_sweep", "r{rank}-a{alpha}", ["lora.rank=2,1", "lora.alpha=4"], pretrain=False)

    assert list(results) == ["r2-a4", "r1-a4"]
    result = results["r2-a4"]
    saved = json.loads((project / "experiments/results/rank_sweep/r2-a4.json").read_text())
    assert saved == json.loads(json.dumps(result)) and result["overrides"] == {"lora.rank": 2, "lora.alpha": 4}
    assert result["digit"] == HARD_DIGIT and (result["rank"], result["alpha"], result["scaling"]) == (2, 4, 2.0)
    for curve, base in ((result["scale_curve"], result["base"]), (result["validation"]["scale_curve"], result["validation"]["base"])):
        assert [p["scale"] for p in curve] == trial.SCALES
        assert curve[0]["errors_per_digit"] == base["errors_per_digit"]  # scale 0 is the base
    assert result["scale_curve"][-1] == result["lora_on"]
    assert result["loss_last_10"] < result["loss_first_10"]
    adapter = project / "experiments/models/rank_sweep/r2-a4/adapter_model.safetensors"
    assert result["adapter_file_bytes"] == adapter.stat().st_size
    assert result["trainable_parameters"] == 2 * (784 + 64 + 64 + 32 + 32 + 10)
    on_right, off_right = result["mcnemar_on_vs_off"]["only_on_right"], result["mcnemar_on_vs_off"]["only_off_right"]
    change = sum(result["base"]["errors_per_digit"].values()) - sum(result["lora_on"]["errors_per_digit"].values())
    assert on_right - off_right == change and 0 < result["mcnemar_on_vs_off"]["p_value"] <= 1
    assert file_sha256(BASE_WEIGHTS) == base_hash


def test_trial_with_pretrain_trains_each_points_own_base_for_the_seed_it_is_given(project):
    trial.main(["seeds", "seed-{seed}", "--pretrain", "seed=3,4"])  # as experiments/dvc.yaml's seeds stage runs it
    first = json.loads((project / "experiments/results/seeds/seed-3.json").read_text())
    assert not BASE_WEIGHTS.exists()  # the main pipeline's base is neither needed nor written
    bases = [project / f"experiments/models/seeds/seed-{seed}.base.safetensors" for seed in (3, 4)]
    assert first["seed"] == 3 and first["pretrained_here"] and file_sha256(bases[0]) != file_sha256(bases[1])


def test_a_trial_killed_or_failing_midway_leaves_the_groups_previous_results_whole(project, capsys):
    pretrain.run(load_params())
    trial.run("replay_sweep", "replay-{replay_fraction}", ["finetune.replay_fraction=0.0"], pretrain=False)
    before = sorted(p.name for p in (project / "experiments/results/replay_sweep").iterdir())
    set_params(project / "params.yaml", **{"finetune.lr": 1e30})  # diverges: the first point fails in training
    with pytest.raises(SystemExit):
        trial.main(["replay_sweep", "replay-{replay_fraction}", "finetune.replay_fraction=0.0,0.5"])
    assert sorted(p.name for p in (project / "experiments/results/replay_sweep").iterdir()) == before == ["replay-0.0.json"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["g", "x{rnak}", "lora.rnak=2"], "error: override lora.rnak=2: params.yaml has no key 'lora.rnak'"),
        (["g", "x{rank}", "lora.rank=0,1"], "lora.rank=0 is invalid: an integer >= 1 is allowed"),
        (["g", "x{rank}", "lora.rank"], "error: override 'lora.rank' is invalid: key=value is allowed"),
        (["..", "x{rank}", "lora.rank=1"], "error: group '..' is invalid"),
        (["g", "../x{rank}", "lora.rank=1"], "gives '../x1': one plain file name per point is allowed"),
        (["g", "same", "lora.rank=1,2"], "gives 'same': one plain file name per point is allowed"),
        (["g", "x{alpha}", "lora.rank=1"], "template 'x{alpha}' is invalid for keys ['lora.rank']"),
    ],
)
def test_trial_refuses_a_bad_override_group_or_template_in_one_line_and_writes_nothing(project, capsys, args, message):
    with pytest.raises(SystemExit) as exit_status:
        trial.main(args)  # as `python -m stages.trial` runs it
    assert exit_status.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (project / "experiments").exists()


def test_full_finetune_trains_every_weight_while_lora_keeps_optimizer_and_file_small(project):
    pretrain.run(load_params())
    base_hash = file_sha256(BASE_WEIGHTS)
    result = full_finetune.run(load_params())

    total = sum(p.numel() for p in OversizedMLP(hidden_1=64, hidden_2=32).parameters())
    assert result["full"]["trainable_parameters"] == total
    assert result["lora"]["trainable_parameters"] == 784 + 64 + 64 + 32 + 32 + 10
    for name in ("lora", "full"):  # Adam: two float32 moments per trainable parameter, plus a step count each
        moments = 2 * 4 * result[name]["trainable_parameters"]
        assert moments <= result[name]["optimizer_state_bytes"] <= moments + 64 * 8
        # step times are printed, never written: they change from run to run
        assert set(result[name]) == {"trainable_parameters", "optimizer_state_bytes", "file_bytes", "loss_last_10",
                                     "accuracy", "errors_per_digit"}
    assert result["full"]["file_bytes"] == (project / "experiments/models/full_finetune/full.safetensors").stat().st_size
    assert result["lora"]["file_bytes"] * 10 < result["full"]["file_bytes"]
    assert result["digit"] == HARD_DIGIT and file_sha256(BASE_WEIGHTS) == base_hash


def test_full_finetune_fails_when_the_lora_models_frozen_base_changes_and_writes_no_result(project, monkeypatch):
    pretrain.run(load_params())
    train = full_finetune.train_on_digit

    def train_and_touch_the_base(params, model, *args, **kwargs):
        losses = train(params, model, *args, **kwargs)
        if any(p.requires_grad for p in model.parameters()) and not all(p.requires_grad for p in model.parameters()):
            with torch.no_grad():
                model.linear1.base_layer.weight[0, 0] += 1  # the LoRA model's base: frozen, so changed only here
        return losses

    monkeypatch.setattr(full_finetune, "train_on_digit", train_and_touch_the_base)
    with pytest.raises(IntegrityError, match="integrity check failed: base weights sha256 before fine-tuning"):
        full_finetune.run(load_params())
    assert not full_finetune.RESULT.exists()


def test_learning_rates_trains_every_method_at_every_rate_from_the_same_base_and_scores_both_splits(project):
    pretrain.run(load_params())
    set_params(project / "params.yaml", **{"lora.rank": 2, "lora.alpha": 4})  # alpha fixed at 4, alpha/rank at 2
    result = learning_rates.run(load_params(), ["finetune.lr=0.001,0.01", "lora.rank=1,2"])

    assert json.loads((project / "experiments/results/learning_rates.json").read_text()) == json.loads(json.dumps(result))
    grid = [(p["method"], p["rank"], p["alpha"], p["lr"]) for p in result["points"]]
    assert grid == [(method, rank, alpha, lr) for lr in (0.001, 0.01) for method, rank, alpha in
                    [("lora_alpha_fixed", 1, 4), ("lora_alpha_fixed", 2, 4), ("lora_alpha_over_rank", 1, 2),
                     ("lora_alpha_over_rank", 2, 4), ("full", None, None)]]
    assert (result["alpha_fixed"], result["alpha_over_rank"]) == (4, 2)
    total = sum(p.numel() for p in OversizedMLP(hidden_1=64, hidden_2=32).parameters())
    assert [p["trainable_parameters"] for p in result["points"][:5]] == [986, 2 * 986, 986, 2 * 986, total]
    assert result["digit"] == HARD_DIGIT
    same_config = [p for p in result["points"] if p["rank"] == 2 and p["lr"] == 0.01]  # alpha 4 at rank 2, both ways
    assert same_config[0]["validation"] == same_config[1]["validation"] and same_config[0]["test"] == same_config[1]["test"]
    assert sum(p["validation"] != p["test"] for p in result["points"]) > 0  # the splits are scored apart
    for point in result["points"]:
        for split in ("validation", "test"):
            assert point[split].keys() == result["base"][split].keys() == {"digit_errors", "other_errors", "accuracy"}
    learned = [result["base"]["validation"]["digit_errors"] - p["validation"]["digit_errors"] for p in result["points"]]
    assert max(learned) > 0


@pytest.mark.parametrize("args, message", [
    (["finetune.lr=0.001"], "['finetune.lr'] are swept: finetune.lr and lora.rank, each once, are allowed"),
    (["finetune.lr=0.001", "lora.rank=1", "lora.alpha=2"], "['finetune.lr', 'lora.alpha', 'lora.rank'] are swept"),
    (["finetune.lr=-1", "lora.rank=1"], "finetune.lr=-1"),
    (["finetune.lr=0.001", "lora.rank=4,4"], "sweep 'lora.rank=4,4' repeats a value"),
])
def test_learning_rates_refuses_a_bad_grid_in_one_line_and_writes_nothing(project, capsys, monkeypatch, args, message):
    pretrain.run(load_params())  # everything a run needs is there: the refusal comes first
    monkeypatch.setattr(sys, "argv", ["stages.learning_rates", *args])
    with pytest.raises(SystemExit) as exit_status:
        learning_rates.main()
    stderr = capsys.readouterr().err
    assert exit_status.value.code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (project / "experiments").exists()


def test_pareto_front_keeps_only_points_no_other_point_beats_on_both_axes():
    def point(errors, accuracy, scale):
        return {"digit_errors": errors, "accuracy": accuracy, "scale": scale, "replay_fraction": 0.0, "other_errors": 0}

    points = [point(100, 0.90, 0.0), point(20, 0.95, 0.5), point(10, 0.94, 1.0), point(20, 0.93, 0.7), point(30, 0.95, 0.3)]
    assert [(p["digit_errors"], p["accuracy"]) for p in report.pareto_front(points)] == [(10, 0.94), (20, 0.95)]
    tied = [point(10, 0.94, 0.9), point(10, 0.94, 0.8), {**point(10, 0.94, 0.1), "replay_fraction": 0.2}]
    assert [p["scale"] for p in report.pareto_front(tied)] == [0.8]  # the lowest replay fraction, then scale
    runs = [{"forgot": 5, "learned": 10, "lr": 0.01, "rank_or_0": 1}, {"forgot": 5, "learned": 10, "lr": 0.001, "rank_or_0": 4},
            {"forgot": 5, "learned": 10, "lr": 0.001, "rank_or_0": 2}, {"forgot": 6, "learned": 9, "lr": 0.1, "rank_or_0": 1},
            {"forgot": 9, "learned": 12, "lr": 0.1, "rank_or_0": 1}]  # less forgetting is better here, more learning too
    assert report.pareto_front(runs, prefer=("lr", "rank_or_0"), lower="forgot", higher="learned") == [runs[2], runs[4]]


def trial_result(digit: int, base: list[int], on: list[int], **fields) -> dict:
    """A result file shaped like stages.trial's, with a straight-line scale curve from base to on."""
    curve = []
    for scale in (0.0, 0.5, 1.0):
        errors = [round(b + scale * (o - b)) for b, o in zip(base, on)]
        curve.append({"scale": scale, "accuracy": 1 - sum(errors) / 1000, "errors_per_digit": per_digit(errors)})
    fewer = sum(base) - sum(on)  # errors LoRA on removes overall; a fixture's McNemar counts only those
    defaults = {"seed": 0, "rank": 1, "alpha": 1, "scaling": 1.0, "replay_fraction": 0.0, "steps": 100, "pretrain_epochs": 1,
                "trainable_parameters": 6794, "adapter_file_bytes": 27792, "base_file_bytes": 11228536,
                "mcnemar_on_vs_off": {"only_on_right": max(fewer, 0), "only_off_right": max(-fewer, 0), "p_value": 0.01}}
    return {**defaults, **fields, "digit": digit, "base": {"accuracy": curve[0]["accuracy"], "errors_per_digit": per_digit(base)},
            "lora_on": curve[-1], "scale_curve": curve}


def write_fixture_results(root: Path) -> None:
    results = root / "experiments" / "results"
    base = [5] * 10
    base[1] = 50
    files = {}
    for rank in (1, 4):
        for alpha in (1, 4):
            on = [6] * 10
            on[1] = 10 // rank
            files[f"rank_sweep/r{rank}-a{alpha}"] = trial_result(1, base, on, rank=rank, alpha=alpha, scaling=alpha / rank)
    for seed, (base_1, on_1) in enumerate([(50, 10), (40, 6)]):
        files[f"seeds/seed-{seed}"] = trial_result(1, base[:1] + [base_1] + base[2:], [5, on_1] + [7] * 8, seed=seed)
    files["long_base/epochs3-seed0"] = trial_result(1, base, [5, 10] + [7] * 8, pretrain_epochs=3)
    for seed, (auto_1, torch_1) in enumerate([(50, 40), (44, 30)]):  # torch's bases 10 and 14 errors better
        for backend, base_1 in (("auto", auto_1), ("torch", torch_1)):
            files[f"backends/{backend}-seed{seed}"] = trial_result(1, base[:1] + [base_1] + base[2:], [5, 6] + [7] * 8, seed=seed,
                                                                  overrides={"backend": backend, "seed": seed})
    files["replay_sweep/replay-0.0"] = trial_result(1, base, [5, 10] + [8] * 8)
    files["replay_sweep/replay-0.1"] = trial_result(1, base, [5, 12] + [6] * 8, replay_fraction=0.1)
    for digit in range(3):
        on = list(base)
        on[digit] = 1
        files[f"digit_adapters/digit-{digit}"] = trial_result(digit, base, on)
    for name, data in files.items():
        (results / name).parent.mkdir(parents=True, exist_ok=True)
        (results / f"{name}.json").write_text(json.dumps(data))
    row = {"trainable_parameters": 10, "optimizer_state_bytes": 88, "file_bytes": 100, "accuracy": 0.9}
    (results / "full_finetune.json").write_text(json.dumps({
        "digit": 1, "steps": 100, "base": {"accuracy": 0.9, "errors_per_digit": per_digit(base)},
        "lora": {**row, "errors_per_digit": per_digit([5, 10] + [6] * 8)},
        "full": {**row, "trainable_parameters": 1000, "errors_per_digit": per_digit([9, 0] + [20] * 8)},
    }))
    (results / "compose.json").write_text(json.dumps(compose_result(base, {"cat, each 1": [4, 20, 6] + [4] * 7})))
    (results / "learning_rates.json").write_text(json.dumps(learning_rates_result()))
    (results / "sweep.json").write_text(json.dumps({"grid": ["lora.rank=1,4"], "points": [{
        "overrides": {"lora.rank": rank}, "digit": 1, "trainable_parameters": 10 * rank, "loss_last_10": 0.1,
        "base": {"accuracy": 0.905, "errors": 95}, "lora_on": {"accuracy": accuracy, "errors": round((1 - accuracy) * 1000)},
        "digit_errors": {"base": 50, "lora_on": on}, "accuracy_change": round(accuracy - 0.905, 6),
        "mcnemar_on_vs_off": {"only_on_right": 40, "only_off_right": 2, "p_value": 1e-9},
        "validation": {"lora_off": {"accuracy": 0.9, "errors": 100, "digit_errors": 50},
                       "lora_on": {"accuracy": accuracy - 0.001, "errors": 0, "digit_errors": on}}}
        for rank, on, accuracy in ((1, 10, 0.93), (4, 5, 0.94))]}))


def learning_rates_result() -> dict:
    """A learning_rates stage result: base 50 target and 45 other errors (of 1000) on both splits; test = validation + 1."""
    def point(method, rank, alpha, lr, digit_errors, other_errors):
        scores = {"digit_errors": digit_errors, "other_errors": other_errors, "accuracy": 1 - (digit_errors + other_errors) / 1000}
        test = {"digit_errors": digit_errors + 1, "other_errors": other_errors + 1, "accuracy": scores["accuracy"] - 0.002}
        return {"method": method, "rank": rank, "alpha": alpha, "lr": lr, "trainable_parameters": 1, "loss_last_10": 0.1,
                "validation": scores, "test": test}
    base = {"digit_errors": 50, "other_errors": 45, "accuracy": 0.905}
    return {"digit": 1, "steps": 100, "seed": 0, "alpha_fixed": 1, "alpha_over_rank": 1, "base": {"validation": base, "test": base},
            "points": [point("lora_alpha_fixed", 1, 1, 0.001, 30, 46), point("lora_alpha_fixed", 4, 1, 0.001, 20, 50),
                       point("lora_alpha_fixed", 4, 1, 0.01, 25, 60),  # beaten by rank 4 at 0.001 on both
                       point("lora_alpha_over_rank", 4, 4, 0.001, 10, 70),
                       point("full", None, None, 0.001, 5, 100), point("full", None, None, 0.01, 5, 100)]}  # a tie


def compose_result(base: list[int], combined: dict[str, list[int]]) -> dict:
    """A compose stage result: the base, a random control and the given combinations' errors per digit."""
    def variant(name: str, family: str, errors: list[int], stored: int) -> dict:
        return {"name": name, "family": family, "accuracy": round(1 - sum(errors) / 1000, 6), "errors_per_digit": per_digit(errors),
                "digits_worse": sum(e > b for e, b in zip(errors, base)), "digits_better": sum(e < b for e, b in zip(errors, base)),
                "selection_accuracy": 0.9, "stored_bytes": stored, "multiply_adds_per_image": 200 if stored else 100}
    return {"name": "compose", "selection": "the last 10 training images",
            "base": {"accuracy": round(1 - sum(base) / 1000, 6), "errors_per_digit": per_digit(base)},
            "variants": [variant("base model", "control", base, 0), variant("random cat, each 1", "control: random adapters", [9] * 10, 2048),
                         *(variant(name, "combination", errors, 1024) for name, errors in combined.items())]}


def test_report_builds_every_section_from_small_fixture_results(tmp_path, monkeypatch):
    write_fixture_results(tmp_path)
    monkeypatch.chdir(tmp_path)
    summary = report.write_report()

    text = (tmp_path / "experiments/report.md").read_text()
    for heading in ("## Rank sweep", "## The headline over seeds", "## A longer-trained base",
                    "## Does the fast path train the same model?", "## Forgetting and how to trade it",
                    "## LoRA against full fine-tuning", "## Learning against forgetting, across learning rates",
                    "## One adapter per digit", "## Ten adapters, one base", "## The batched sweep"):
        assert heading in text
    assert "| lora.rank=4 | 1 | 40 | 50 → 5 | 0.9050 → 0.9400 | 0.9390 | 1e-09 |" in text
    assert "Not run" not in text
    # seeds: base accuracy 1 - 95/1000 and 1 - 85/1000; target errors 50 and 40 -> 10 and 6
    # the interval is the mean's 95% t interval: t(1 degree of freedom) = 12.706
    assert summary["seeds"]["base_accuracy"] == {"mean": 0.91, "sd": 0.0071, "ci95_low": 0.8465, "ci95_high": 0.9735}
    assert summary["seeds"]["target_errors_base"]["mean"] == 45.0 and summary["seeds"]["target_errors_base"]["sd"] == 7.0711
    assert summary["seeds"]["overall"] == {"helps": 2} and "LoRA on helps on 2 of the 2 bases." in text
    assert "| **mean (95% interval)** | | | 0.9100 (0.8465 to 0.9735) |" in text
    assert summary["long_base"] == [{"seed": 0, "epochs": 3, "base_accuracy": 0.905, "lora_on_accuracy": 0.929,
                                     "mcnemar_p": 0.01, "overall": "helps"}]
    # backends: auto minus torch per seed -0.010 and -0.014; t(1) = 12.706 makes the interval span 0
    assert summary["backends"]["difference"] == {"mean": -0.012, "sd": 0.0028, "ci95_low": -0.0374, "ci95_high": 0.0134}
    assert summary["backends"]["verdict"] == "no significant difference" and summary["backends"]["seeds"] == 2
    assert "| 1 | 0.9110 | helps (0.01) | 0.9250 | helps (0.01) |" in text  # seed 1: 89 and 75 errors of 1000; fixtures' p = 0.01
    assert summary["backends"]["overall"] == {"auto": {"helps": 2}, "torch": {"helps": 2}} and len(summary["backends"]["helps"]) == 4
    # frontier: replay 0 at scale 1 has the fewest target errors, replay 0.1 at scale 1 the best accuracy
    assert "| 0 | 1 | 10 | 69 | 0.9210 |\n| 0.1 | 1 | 12 | 53 | 0.9350 |\n\n" in text
    assert summary["replay_sweep"]["frontier"] == {"points": 2, "max_accuracy": 0.935}
    assert summary["replay_sweep"]["points"]["replay-0.1"] == {"digit_errors": 12, "other_errors": 53, "accuracy": 0.935}
    assert summary["full_finetune"]["full"] == {"digit_errors": 0, "accuracy": 0.9}
    # learning rates: each method's validation frontier; test numbers are validation's plus one error each
    assert ("| LoRA, alpha fixed | 4 | 1 | 0.001 | 30 | 5 | 29 | 6 |\n| LoRA, alpha fixed | 1 | 1 | 0.001 | 20 | 1 | 19 | 2 |\n"
            "| LoRA, alpha/rank fixed | 4 | 4 | 0.001 | 40 | 25 | 39 | 26 |\n| full fine-tuning | – | – | 0.001 | 45 | 55 | 44 | 56 |\n") in text
    assert summary["learning_rates"]["full"] == {"frontier_points": 1, "most_learned_validation": 45,
                                                 "its_forgetting_validation": 55, "its_lr": 0.001, "its_rank": None}
    assert summary["learning_rates"]["lora_alpha_fixed"]["frontier_points"] == 2
    # least forgetting among runs removing >= 50% (25), 80% (40) and 90% (45) of the 50 target errors
    assert "| 50% (25) | 5 | 25 | 55 |\n| 80% (40) | – | 25 | 55 |\n| 90% (45) | – | – | 55 |\n" in text
    assert summary["rank_sweep"]["r4-a1"] == {"digit_errors": 2, "accuracy": 0.944}
    assert summary["digit_adapters"]["digit-1"] == {"digit_errors_change": -49, "accuracy": 0.954}
    assert "| 4 | 4 | 1 | 6,794 | 27.1 KiB | 2 | 54 | 0.9440 |" in text
    assert "| 1 | 0 | **-49** | 0 |" in text  # the digit-1 adapter's row: 50 -> 1 errors on 1, others unchanged
    # compose: the cat combination is worse only on digit 2 (6 > 5); base 95 errors of 1000
    assert "**No.** None of the 1 combinations and routing rules beats the base on every digit. The closest on the test set " \
           "(picked there after the fact, so an optimistic pick), cat, each 1, is worse on 1, equal on 0 and better on 9 of " \
           "the ten digits, at accuracy 0.9420 against the base's 0.9050." in text
    assert "| cat, each 1 | combination | 0.9420 | 1 | 9 | 4 | 20 | 6 | 4 | 4 | 4 | 4 | 4 | 4 | 4 | 1.0 KiB | 2.00 |" in text
    assert summary["compose"]["random cat, each 1"] == {"accuracy": 0.91, "digits_worse": 9}
    for name in ("rank_sweep", "frontier", "learning_rates", "digit_adapters", "compose"):
        assert (tmp_path / f"experiments/plots/{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "experiments/plots/rank_sweep.csv").read_text().splitlines()[0] == (
        "rank,digit_errors_alpha1,digit_errors_alpha4,accuracy_alpha1,accuracy_alpha4"
    )
    assert json.loads((tmp_path / "experiments/metrics.json").read_text()) == json.loads(json.dumps(summary))


def test_the_compose_section_says_yes_when_a_variant_beats_the_base_on_every_digit(tmp_path, monkeypatch):
    base = [5] * 10
    result = compose_result(base, {"svd, each 1/10": [4] * 10, "ties, each 1": [3] * 9 + [5]})
    (tmp_path / "experiments/results").mkdir(parents=True)
    (tmp_path / "experiments/results/compose.json").write_text(json.dumps(result))
    monkeypatch.chdir(tmp_path)
    report.write_report()
    text = (tmp_path / "experiments/report.md").read_text()
    assert "**Yes.** 1 of the 2 combinations and routing rules have fewer test errors than the base on all ten digits; " \
           "the most accurate on the test set, svd, each 1/10, reaches 0.9600 against the base's 0.9500." in text


def test_report_names_the_experiments_without_results(tmp_path, monkeypatch):
    write_fixture_results(tmp_path)
    for path in (tmp_path / "experiments/results/seeds").iterdir():
        path.unlink()
    monkeypatch.chdir(tmp_path)
    report.write_report()
    text = (tmp_path / "experiments/report.md").read_text()
    assert "## Variance over seeds" not in text and "No results yet for: seeds." in text


@pytest.mark.parametrize("damage, problem", [("{\"digit\": 1, \"base\"", "not valid JSON"), ("[1, 2]", "not an experiment result")])
def test_a_damaged_result_file_stops_the_report_in_one_line_before_writing(tmp_path, monkeypatch, damage, problem):
    write_fixture_results(tmp_path)
    (tmp_path / "experiments/results/seeds/seed-1.json").write_text(damage)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"^experiments/results/seeds/seed-1.json: {problem}.*dvc repro experiments/dvc.yaml") as error:
        report.write_report()
    assert "\n" not in str(error.value)
    assert not (tmp_path / "experiments/report.md").exists()


@pytest.mark.slow
def test_each_experiment_group_is_one_stage_running_its_whole_grid_in_dvcs_dry_run(git_repo):
    # A dry run hashes the dependencies, so they must exist; nothing runs, so placeholders do.
    for path in ["models/base.safetensors", "dvclive/pretrain/metrics.json", "metrics/analyze.json",
                 "models/adapter/adapter_config.json", "metrics/finetune.json", "params_checked.json",
                 "experiments/models/digit_adapters/digit-0/adapter_config.json",  # compose's inputs
                 "experiments/models/replay_sweep/replay-0.5/adapter_config.json",
                 *(f"data/mnist/raw/{name}" for name in MNIST_SHA256)]:
        (git_repo / path).parent.mkdir(parents=True, exist_ok=True)
        (git_repo / path).write_bytes(b"placeholder")
    output = sh(git_repo, "dvc", "repro", "--dry", "experiments/dvc.yaml")
    stages = dict(re.findall(r"Running stage 'experiments/dvc.yaml:([^']+)':\n> (.+)", output))
    assert stages["rank_sweep"] == "python -m stages.trial rank_sweep r{rank}-a{alpha} lora.rank=1,2,4,8,16 lora.alpha=1,4,16"
    assert stages["seeds"] == 'python -m stages.trial seeds seed-{seed} --pretrain "seed=range(0,10)"'
    assert list(trial.points("seed-{seed}", ["seed=range(0,10)"])) == [f"seed-{s}" for s in range(10)]
    assert len(trial.points("r{rank}-a{alpha}", ["lora.rank=1,2,4,8,16", "lora.alpha=1,4,16"])) == 15
    assert stages["backends"] == 'python -m stages.trial backends {backend}-seed{seed} --pretrain backend=auto,torch "seed=range(0,10)"'
    assert {"compose", "full_finetune", "long_base", "digit_adapters", "replay_sweep"} <= set(stages)
    assert "'experiments/dvc.yaml:report'" in output
    # The root pipeline alone is what a plain `dvc repro` runs.
    assert "experiments/dvc.yaml" not in sh(git_repo, "dvc", "repro", "--dry")


@pytest.mark.slow
def test_the_experiments_flows_report_in_a_clone_without_models_builds_from_the_committed_results(repo_copy):
    from flows.experiments import REPORT

    repo = init_repo(repo_copy)  # no DVC cache: neither the main pipeline's data and models nor any group's
    target, options = REPORT
    plain = subprocess.run(["dvc", "repro", "--dry", target], cwd=repo, env=run_env(), capture_output=True, text=True)
    assert "Running stage 'download'" in plain.stdout + plain.stderr  # plain repro would re-run what is missing
    output = sh(repo, "dvc", "repro", "--dry", *options, target)
    assert "Running stage" not in output and "Stage 'experiments/dvc.yaml:report' didn't change" in output


@pytest.mark.slow
def test_a_queued_rank_sweep_holds_one_experiment_per_rank(git_repo):
    sh(git_repo, "dvc", "exp", "run", "--queue", "-S", "lora.rank=1,2,4,8,16")
    try:
        assert sh(git_repo, "dvc", "queue", "status").count(" Queued") == 5
        shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json", "--no-fetch"], cwd=git_repo, env=run_env(),
                                          capture_output=True, text=True, check=True).stdout)
        ranks = [
            experiment["revs"][0]["data"]["params"]["params.yaml"]["data"]["lora"]["rank"]
            for commit in shown for experiment in commit.get("experiments") or []
        ]
        assert sorted(ranks) == [1, 2, 4, 8, 16]
    finally:
        sh(git_repo, "dvc", "queue", "remove", "--all")


@pytest.mark.slow
def test_experiment_stages_run_on_real_mnist_and_the_report_builds_from_them(git_repo):
    shutil.rmtree(git_repo / "experiments" / "results")  # the committed real results; only these stages' will be there
    stages = ["long_base", "full_finetune"]
    set_params(git_repo / "params.yaml", **{"pretrain.max_steps": 300})  # long_base's three epochs, cut short
    sh(git_repo, "dvc", "repro", *(f"experiments/dvc.yaml:{stage}" for stage in stages))
    # report depends on all of experiments/results: --single-item keeps the other groups' stages from running
    sh(git_repo, "dvc", "repro", "--single-item", "experiments/dvc.yaml:report")
    results = git_repo / "experiments" / "results"
    long = json.loads((results / "long_base/epochs3-seed0.json").read_text())
    assert long["pretrain_epochs"] == 3 and long["pretrained_here"] and long["base"]["accuracy"] > 0.85
    assert long["adapter_file_bytes"] < 30_000 and long["mcnemar_on_vs_off"]["p_value"] <= 1
    text = (git_repo / "experiments/report.md").read_text()
    assert "## A longer-trained base" in text and "## LoRA against full fine-tuning" in text
    assert "No results yet for: rank_sweep, seeds, backends, replay_sweep, learning_rates, digit_adapters, compose, sweep." in text
    status = sh(git_repo, "dvc", "status", *(f"experiments/dvc.yaml:{stage}" for stage in stages))
    assert "up to date" in status

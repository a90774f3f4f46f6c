"""LoRA math and the library's contract, the checks PEFT's suite holds for every tuner."""
from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from lora import (
    LoRAConfig,
    LoRAConfigError,
    LoRALinear,
    LoRAMergeError,
    base_state_dict,
    disable_adapter,
    inject,
    lora_layers,
    mark_only_lora_trainable,
    merge,
    set_adapter,
    set_inference_scale,
    trainable_parameters,
    unmerge,
)
from tests.helpers import TARGETS, TinyMLP


def model_and_input(seed: int = 0, **config) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    base = TinyMLP(hidden_1=40, hidden_2=30)
    model = TinyMLP(hidden_1=40, hidden_2=30)
    model.load_state_dict(base.state_dict())
    inject(model, LoRAConfig(**config, target_modules=TARGETS))
    return base, model, torch.randn(16, 784)


def randomize_b(model: nn.Module) -> None:
    """Give every B non-zero values so that the adapter has an effect."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for b in layer.lora_B.values():
                b.weight.normal_(0, 0.1)


def test_adapter_output_equals_base_at_init_because_b_starts_at_zero():
    base, model, x = model_and_input()
    for layer in lora_layers(model).values():
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
        assert torch.count_nonzero(layer.delta_weight("default")) == 0
    assert torch.equal(model(x), base(x))


def test_disabled_adapter_gives_base_outputs_exactly_and_restores_after():
    base, model, x = model_and_input()
    randomize_b(model)
    with_lora = model(x)
    assert not torch.allclose(with_lora, base(x))
    with disable_adapter(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), with_lora)


def test_unmerged_forward_is_base_plus_scaled_low_rank_path():
    base, model, x = model_and_input(r=3, alpha=6)
    randomize_b(model)
    layer = model.linear1
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = base.linear1(x) + (x @ a.T @ b.T) * 2.0
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_trainable_count_is_rank_times_sum_of_in_and_out(rank):
    model = TinyMLP()
    inject(model, LoRAConfig(r=rank, target_modules=TARGETS))
    mark_only_lora_trainable(model)
    trainable, total = trainable_parameters(model)
    assert trainable == rank * ((784 + 1000) + (1000 + 2000) + (2000 + 10))
    assert total - trainable == 2_807_010
    if rank == 1:
        assert trainable == 6794 and round(100 * trainable / 2_807_010, 3) == 0.242


def test_real_optimisation_steps_change_lora_and_leave_base_tensors_bit_identical():
    _, model, x = model_and_input()
    before = {k: v.clone() for k, v in base_state_dict(model).items()}
    a_before = model.linear2.lora_A["default"].weight.clone()
    mark_only_lora_trainable(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.randint(0, 10, (16,))
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = base_state_dict(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert not torch.equal(model.linear2.lora_A["default"].weight, a_before)
    assert torch.count_nonzero(model.linear2.lora_B["default"].weight) > 0


def test_wrapping_keeps_the_original_linear_object_and_its_storage():
    linear = nn.Linear(8, 4)
    pointer = linear.weight.data_ptr()
    layer = LoRALinear(linear, "default", LoRAConfig(r=2, target_modules=("x",)))
    assert layer.base_layer is linear and linear.weight.data_ptr() == pointer


def test_merge_matches_unmerged_output_within_float_tolerance():
    _, model, x = model_and_input(r=2, alpha=4)
    randomize_b(model)
    unmerged = model(x)
    merge(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merged_model_has_no_extra_work_in_forward():
    base, model, x = model_and_input()
    randomize_b(model)
    merge(model)
    calls = []
    for layer in lora_layers(model).values():
        layer.lora_A["default"].register_forward_hook(lambda *args: calls.append(1))
    model(x)
    assert calls == []


def test_merge_then_unmerge_restores_base_within_rounding():
    # Subtraction undoes the addition only up to float32 rounding, so equality is within tolerance.
    base, model, x = model_and_input()
    randomize_b(model)
    merge(model)
    unmerge(model)
    for name, tensor in base_state_dict(model).items():
        torch.testing.assert_close(tensor, base.state_dict()[name], rtol=0, atol=1e-6)
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_merging_twice_is_refused_and_changes_nothing():
    _, model, x = model_and_input()
    randomize_b(model)
    merge(model)
    once = model(x)
    with pytest.raises(LoRAMergeError, match="already merged"):
        merge(model)
    assert torch.equal(model(x), once)


def test_safe_merge_refuses_non_finite_result_and_leaves_every_base_layer_intact():
    base, model, x = model_and_input()
    randomize_b(model)
    with torch.no_grad():
        model.linear3.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(LoRAMergeError, match="non-finite"):
        merge(model)
    for name, tensor in base_state_dict(model).items():
        torch.testing.assert_close(tensor, base.state_dict()[name], rtol=0, atol=1e-6)
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_disable_adapter_refuses_a_merged_model():
    _, model, _ = model_and_input()
    merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with disable_adapter(model):
            pass


def test_named_adapters_switch_without_touching_the_base():
    base, model, x = model_and_input()
    randomize_b(model)
    inject(model, LoRAConfig(r=2, target_modules=TARGETS), adapter_name="digit7")
    randomize_b(model)
    base_before = {k: v.clone() for k, v in base_state_dict(model).items()}
    set_adapter(model, "default")
    out_default = model(x)
    set_adapter(model, "digit7")
    out_seven = model(x)
    assert not torch.allclose(out_default, out_seven)
    set_adapter(model, "default")
    assert torch.equal(model(x), out_default)
    for name, tensor in base_state_dict(model).items():
        assert torch.equal(tensor, base_before[name])
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        set_adapter(model, "nope")


@pytest.mark.parametrize(
    "init, rank, check",
    [
        ("normal", 4, lambda a, fan_in, r: abs(a.std().item() - 1.0) < 0.02 and abs(a.mean().item()) < 0.02),
        ("gaussian", 4, lambda a, fan_in, r: abs(a.std().item() - 1 / r) < 0.01),
        (
            "kaiming",
            4,
            lambda a, fan_in, r: a.abs().max().item() <= 1 / math.sqrt(fan_in)
            and abs(a.std().item() - 1 / math.sqrt(3 * fan_in)) < 0.001,
        ),
    ],
)
def test_init_distribution_of_a_matches_its_documentation(init, rank, check):
    torch.manual_seed(1234)
    linear = nn.Linear(2000, 1000)
    layer = LoRALinear(linear, "default", LoRAConfig(r=rank, init=init, target_modules=("x",)))
    a = layer.lora_A["default"].weight.detach()
    assert a.shape == (rank, 2000)
    assert check(a, 2000, rank)


def test_rslora_scales_by_alpha_over_sqrt_rank():
    assert LoRAConfig(r=4, alpha=8, target_modules=TARGETS).scaling == 2.0
    assert LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=TARGETS).scaling == 4.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r=0 is invalid: an integer >= 1"),
        ({"r": 1.5}, "r=1.5 is invalid"),
        ({"r": True}, "r=True is invalid"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"alpha": float("inf")}, "alpha=inf is invalid: a finite number > 0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"init": "xavier"}, "init='xavier'"),
        ({"target_modules": ()}, "target_modules=[] is invalid"),
        ({"rank_pattern": {"linear2": 0}}, "rank_pattern={'linear2': 0} is invalid: a mapping of module-name patterns"),
        ({"rank_pattern": {"linear2": 2.5}}, "rank_pattern={'linear2': 2.5} is invalid"),
        ({"rank_pattern": {"": 2}}, "rank_pattern={'': 2} is invalid"),
        ({"rank_pattern": {"linear[": 2}}, "rank_pattern={'linear[': 2} is invalid"),
        ({"rank_pattern": ["linear2"]}, "rank_pattern=['linear2'] is invalid"),
        ({"alpha_pattern": {"linear1": -1}}, "alpha_pattern={'linear1': -1} is invalid: a mapping of module-name patterns (regular expressions) to finite numbers > 0"),
        ({"alpha_pattern": {"linear1": True}}, "alpha_pattern={'linear1': True} is invalid"),
    ],
)
def test_bad_configs_are_rejected_with_the_value_named(kwargs, message):
    with pytest.raises(LoRAConfigError, match=re.escape(message)):
        LoRAConfig(**{"target_modules": TARGETS, **kwargs})


def test_a_pattern_key_matches_a_whole_module_name_or_its_dotted_tail_and_the_first_match_wins():
    config = LoRAConfig(r=2, alpha=4, target_modules=("x",), rank_pattern={"fc1": 8, "block\\.\\d\\.fc.": 3},
                        alpha_pattern={"fc2": 1})
    assert [config.rank_for(name) for name in ("fc1", "encoder.fc1", "fc10", "xfc1", "block.0.fc2", "fc2")] == [8, 8, 2, 2, 3, 2]
    assert config.scaling_for("fc2") == 0.5 and config.scaling_for("fc1") == 0.5 and config.scaling_for("other") == 2.0
    pattern = {"fc1": 8}
    frozen = LoRAConfig(target_modules=("fc1",), rank_pattern=pattern)
    pattern["fc1"] = 1
    assert frozen.rank_for("fc1") == 8 and hash(frozen) == hash(LoRAConfig(target_modules=("fc1",), rank_pattern={"fc1": 8}))
    with pytest.raises(TypeError, match="pattern cannot change"):
        frozen.rank_pattern["fc1"] = 2
    in_order, reversed_order = ({"fc.": 2, "fc1": 8}, {"fc1": 8, "fc.": 2})  # the first match wins, so order matters
    assert LoRAConfig(target_modules=("fc1",), rank_pattern=in_order) != LoRAConfig(target_modules=("fc1",), rank_pattern=reversed_order)


def test_target_modules_have_no_default_so_a_config_names_the_layers_of_its_own_model():
    with pytest.raises(LoRAConfigError, match=r"target_modules=\[\] is invalid"):
        LoRAConfig(r=2)


def test_a_rank_above_a_layers_smaller_side_trains_but_its_update_stays_capped_by_that_side():
    torch.manual_seed(0)
    model = inject(TinyMLP(), LoRAConfig(r=16, target_modules=TARGETS))
    layer = lora_layers(model)["linear3"]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    assert layer.lora_A["default"].weight.shape == (16, 2000) and layer.lora_B["default"].weight.shape == (10, 16)
    assert torch.linalg.matrix_rank(layer.delta_weight("default")) == 10
    model(torch.randn(3, 784)).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_unknown_target_module_is_rejected_by_name():
    with pytest.raises(LoRAConfigError, match=r"target_modules='linear9' is invalid: the name of an nn.Linear of the model \(linear1, linear2, linear3\)"):
        inject(TinyMLP(), LoRAConfig(target_modules=("linear9",)))


def test_dropout_applies_only_in_training_mode():
    _, model, x = model_and_input(dropout=0.5)
    randomize_b(model)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_inference_scale_zero_gives_base_exactly_one_gives_the_adapter_and_between_interpolates():
    base, model, x = model_and_input()
    randomize_b(model)
    with_lora = model(x)
    set_inference_scale(model, 0)
    assert torch.equal(model(x), base(x))
    set_inference_scale(model, 1)
    assert torch.equal(model(x), with_lora)
    layer = model.linear1
    full_delta = layer.delta_weight("default")
    set_inference_scale(model, 0.5)
    half = base.linear1(x) + 0.5 * (x @ full_delta.T)
    torch.testing.assert_close(layer(x), half, rtol=1e-5, atol=1e-5)
    merge(model)
    torch.testing.assert_close(layer(x), half, rtol=1e-5, atol=1e-5)
    with pytest.raises(LoRAMergeError, match="unmerge it before changing the inference scale"):
        set_inference_scale(model, 1)
    unmerge(model)
    with pytest.raises(ValueError, match="inference scale=-1 is invalid"):
        set_inference_scale(model, -1)
    assert all(layer.inference_scale == 0.5 for layer in lora_layers(model).values())

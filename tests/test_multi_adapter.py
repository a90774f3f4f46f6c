"""Many adapters on one base, with PEFT as the oracle: combined adapters give PEFT's ΔW per layer and load in PEFT,
a batch with an adapter per row equals each row alone and PEFT's adapter_names forward, and merge_and_unload and
unload give PEFT's plain models."""
from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lora import (
    BASE,
    LoRAConfig,
    LoRAMergeError,
    adapter_per_row,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    inject,
    load_adapter,
    lora_layers,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unload,
    unmerge,
)
from tests.helpers import TARGETS, TinyMLP, small_base


def _both(tmp_path, configs: dict[str, LoRAConfig]) -> tuple[nn.Module, peft.PeftModel]:
    """The same trained-looking adapters in our model and, loaded from the files we save, in PEFT's."""
    ours = small_base()
    for name, config in configs.items():
        inject(ours, config, name)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            for name in layer.lora_A:
                layer.lora_A[name].weight.normal_(0, 0.3)
                layer.lora_B[name].weight.normal_(0, 0.3)
    theirs = None
    for name in configs:
        save_adapter(ours, tmp_path / name, name)
        if theirs is None:
            theirs = peft.PeftModel.from_pretrained(small_base(), str(tmp_path / name), adapter_name=name)
        else:
            theirs.load_adapter(str(tmp_path / name), adapter_name=name)
    return ours.eval(), theirs.eval()


def _peft_deltas(theirs: peft.PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {target: getattr(theirs.base_model.model, target).get_delta_weight(name) for target in TARGETS
            if name in getattr(theirs.base_model.model, target).lora_A}


def _our_deltas(ours: nn.Module, name: str) -> dict[str, torch.Tensor]:
    return {target: layer.delta_weight(name) for target, layer in lora_layers(ours).items() if name in layer.lora_A}


SAME_RANK = {"a": LoRAConfig(r=2, alpha=4, target_modules=TARGETS),
             "b": LoRAConfig(r=2, alpha=1, target_modules=TARGETS),
             "c": LoRAConfig(r=2, alpha=2, target_modules=("linear1", "linear2"))}
MIXED_RANKS = {"a": LoRAConfig(r=1, alpha=1, target_modules=TARGETS),
               "b": LoRAConfig(r=3, alpha=6, target_modules=("linear2", "linear3"), rank_pattern={"linear3": 2}),
               "c": LoRAConfig(r=2, alpha=8, target_modules=TARGETS, alpha_pattern={"linear1": 2})}
# rank patterns that lower every layer below r: PEFT sizes the combination from r, not from the layers
LOWERED = {"a": LoRAConfig(r=4, alpha=4, use_rslora=True, target_modules=TARGETS, rank_pattern={"linear[123]": 2}),
           "b": LoRAConfig(r=4, alpha=8, use_rslora=True, target_modules=TARGETS, rank_pattern={"linear[123]": 1}),
           "c": LoRAConfig(r=3, alpha=2, use_rslora=True, target_modules=TARGETS, rank_pattern={"linear[12]": 2})}
COMBINATIONS = {
    "linear": ({}, SAME_RANK),
    "cat": ({}, MIXED_RANKS),
    "svd": ({}, MIXED_RANKS),
    "svd at rank 3": ({"svd_rank": 3}, MIXED_RANKS),
    "ties": ({"density": 0.5}, SAME_RANK),
    "ties by frequency": ({"density": 0.3, "majority_sign_method": "frequency"}, SAME_RANK),
    "dare_linear": ({"density": 0.5}, SAME_RANK),
    "dare_ties": ({"density": 0.7}, SAME_RANK),
    "magnitude_prune": ({"density": 0.4}, SAME_RANK),
    "ties_svd": ({"density": 0.5}, MIXED_RANKS),
    "dare_linear_svd": ({"density": 0.6}, MIXED_RANKS),
    "dare_ties_svd": ({"density": 0.6}, MIXED_RANKS),
    "magnitude_prune_svd": ({"density": 0.5}, MIXED_RANKS),
    "cat with rsLoRA and lowering rank patterns": ({}, LOWERED),
    "svd with rsLoRA and lowering rank patterns": ({}, LOWERED),
}


@pytest.mark.parametrize("case", COMBINATIONS, ids=COMBINATIONS.keys())
def test_a_weighted_combination_gives_peft_delta_per_layer_and_loads_in_peft(tmp_path, monkeypatch, case):
    options, configs = COMBINATIONS[case]
    kind = case.split(" ")[0]
    ours, theirs = _both(tmp_path, configs)
    weights = [0.7, -0.4, 1.3]
    # PEFT's DARE masks come from torch's global generator, which its init of the new adapter also draws from;
    # here they come from a generator seeded as ours is, so both prune the same entries.
    draws, bernoulli = torch.Generator().manual_seed(5), torch.bernoulli
    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", lambda p, **_: bernoulli(p, generator=draws))
        theirs.add_weighted_adapter(list(configs), weights, "mix", combination_type=kind, **options)
    add_weighted_adapter(ours, list(configs), weights, "mix", combination_type=kind, seed=5, **options)
    expected, actual = _peft_deltas(theirs, "mix"), _our_deltas(ours, "mix")
    assert actual.keys() == expected.keys() == set(TARGETS)
    for target in TARGETS:
        torch.testing.assert_close(actual[target], expected[target], rtol=1e-4, atol=1e-5)

    save_adapter(ours, tmp_path / "mix", "mix")
    again = peft.PeftModel.from_pretrained(small_base(), str(tmp_path / "mix")).eval()
    set_adapter(ours, "mix")
    x = torch.randn(6, 784)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ours(x), rtol=1e-5, atol=1e-5)
    reloaded = small_base()
    load_adapter(reloaded, tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), ours(x), rtol=0, atol=0)


def test_cat_is_exactly_the_weighted_sum_of_the_deltas(tmp_path):
    ours, _ = _both(tmp_path, MIXED_RANKS)
    add_weighted_adapter(ours, list(MIXED_RANKS), [0.5, 2.0, -1.0], "mix", combination_type="cat")
    for target, layer in lora_layers(ours).items():
        expected = sum(w * layer.delta_weight(a) for a, w in zip(MIXED_RANKS, [0.5, 2.0, -1.0]) if a in layer.lora_A)
        torch.testing.assert_close(layer.delta_weight("mix"), expected, rtol=1e-5, atol=1e-6)
        assert layer.lora_A["mix"].out_features == 1 + 3 + 2  # the adapters' ranks summed, zero-padded, as in PEFT


def test_dare_with_the_same_seed_gives_the_same_adapter_and_another_seed_another(tmp_path):
    ours, _ = _both(tmp_path, SAME_RANK)
    for name, seed in (("x", 3), ("y", 3), ("z", 4)):
        add_weighted_adapter(ours, list(SAME_RANK), [1, 1, 1], name, combination_type="dare_linear", density=0.5, seed=seed)
    layer = lora_layers(ours)["linear1"]
    assert torch.equal(layer.delta_weight("x"), layer.delta_weight("y"))
    assert not torch.equal(layer.delta_weight("x"), layer.delta_weight("z"))


@pytest.mark.parametrize("call, error, message", [
    ({"adapters": ["a", "nope"]}, KeyError, "adapters=\\['a', 'nope'\\] is invalid"),
    ({"adapter_name": "b"}, ValueError, "adapter_name='b' is invalid"),
    ({"weights": [1.0]}, ValueError, "one finite number per adapter"),
    ({"weights": [1.0, float("nan")]}, ValueError, "one finite number per adapter"),
    ({"combination_type": "average"}, ValueError, "combination_type='average' is invalid"),
    ({"combination_type": "ties"}, ValueError, "density=None is invalid: ties needs a number in \\[0, 1\\]"),
    ({"combination_type": "dare_linear", "density": 1.5}, ValueError, "density=1.5 is invalid"),
    ({"combination_type": "dare_ties", "density": 0}, ValueError, "density=0 is invalid: dare_ties needs a number in \\(0, 1\\]"),
    ({"combination_type": "ties", "density": 0.5, "majority_sign_method": "vote"}, ValueError, "majority_sign_method"),
    ({"combination_type": "linear"}, ValueError, "ranks .* differ; cat or svd is allowed"),
    ({"combination_type": "svd", "svd_rank": 0}, ValueError, "svd_rank=0 is invalid"),
])
def test_a_combination_that_cannot_be_made_is_refused_and_changes_nothing(tmp_path, call, error, message):
    ours, _ = _both(tmp_path, {"a": MIXED_RANKS["a"], "b": MIXED_RANKS["b"]})
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    arguments = {"adapters": ["a", "b"], "weights": [1.0, 1.0], "adapter_name": "mix", "combination_type": "svd", **call}
    with pytest.raises(error, match=message):
        add_weighted_adapter(ours, **arguments)
    after = ours.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_combined_rank_a_layer_cannot_hold_is_refused_before_any_layer_changes():
    model = inject(TinyMLP(40, 30), LoRAConfig(r=30, target_modules=TARGETS), "a")
    inject(model, LoRAConfig(r=30, target_modules=TARGETS), "b")
    with pytest.raises(ValueError, match="r=60 is invalid: at most 40 for a 40 -> 30 layer"):
        add_weighted_adapter(model, ["a", "b"], [1, 1], "mix", combination_type="cat")
    assert all("mix" not in layer.lora_A for layer in lora_layers(model).values())


def test_a_batch_with_an_adapter_per_row_equals_each_row_alone_and_peft(tmp_path):
    ours, theirs = _both(tmp_path, MIXED_RANKS)
    names = ["a", BASE, "b", "c", "b", BASE, "a", "c"]
    x = torch.randn(len(names), 784)
    with torch.no_grad():
        with adapter_per_row(ours, names):
            mixed = ours(x)
        expected = theirs(x, adapter_names=names)
        torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-6)
        for row, name in enumerate(names):
            if name == BASE:
                with disable_adapter(ours):
                    alone = ours(x[row:row + 1])
            else:
                set_adapter(ours, name)
                alone = ours(x[row:row + 1])
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-6)
    assert all(layer.row_adapters is None for layer in lora_layers(ours).values())


@pytest.mark.parametrize("names, error, message", [
    (["a", "nope"], KeyError, "no adapter named \\['nope'\\]"),
    ("a", TypeError, "a list of adapter names"),
])
def test_a_batch_naming_an_unknown_adapter_is_refused(tmp_path, names, error, message):
    ours, _ = _both(tmp_path, {"a": SAME_RANK["a"]})
    with pytest.raises(error, match=message):
        with adapter_per_row(ours, names):
            pass


def test_a_batch_with_an_adapter_per_row_needs_one_name_per_row_eval_mode_and_nothing_merged(tmp_path):
    ours, _ = _both(tmp_path, {"a": SAME_RANK["a"], "b": SAME_RANK["b"]})
    with adapter_per_row(ours, ["a", "b"]), pytest.raises(ValueError, match="2 given for a batch of 3 rows"):
        ours(torch.randn(3, 784))
    ours.train()
    with pytest.raises(RuntimeError, match="call model.eval\\(\\) first"), adapter_per_row(ours, ["a"]):
        pass
    ours.eval()
    merge(ours, "a")
    with pytest.raises(LoRAMergeError, match="unmerge it before"), adapter_per_row(ours, ["a"]):
        pass


def test_merge_and_unload_gives_pefts_plain_model_and_unload_the_untouched_base(tmp_path):
    ours, theirs = _both(tmp_path, MIXED_RANKS)
    x = torch.randn(5, 784)
    set_adapter(ours, "b")
    theirs.set_adapter("b")
    with torch.no_grad():
        plain, peft_plain = merge_and_unload(ours), theirs.merge_and_unload()
        torch.testing.assert_close(plain(x), peft_plain(x), rtol=1e-5, atol=1e-5)
    assert plain is ours and not lora_layers(plain)
    assert all(type(getattr(plain, t)) is nn.Linear for t in TARGETS)

    ours, theirs = _both(tmp_path / "two", MIXED_RANKS)
    with torch.no_grad():
        torch.testing.assert_close(merge_and_unload(ours, ["a", "c"])(x),
                                   theirs.merge_and_unload(adapter_names=["a", "c"])(x), rtol=1e-5, atol=1e-5)

    ours, theirs = _both(tmp_path / "three", MIXED_RANKS)
    base = small_base()
    with torch.no_grad():
        assert torch.equal(unload(ours)(x), base(x)) and torch.equal(theirs.unload()(x), base(x))
    assert all(type(getattr(ours, t)) is nn.Linear for t in TARGETS)


def test_an_adapter_merged_before_merge_and_unload_is_folded_in_once(tmp_path):
    ours, theirs = _both(tmp_path, SAME_RANK)
    merge(ours, "a")
    x = torch.randn(4, 784)
    with torch.no_grad():
        torch.testing.assert_close(merge_and_unload(ours, ["a"])(x), theirs.merge_and_unload(adapter_names=["a"])(x),
                                   rtol=1e-5, atol=1e-5)


def test_unload_while_merged_and_a_non_finite_merge_are_refused_leaving_the_model_as_it_was(tmp_path):
    ours, _ = _both(tmp_path, SAME_RANK)
    merge(ours, "a")
    with pytest.raises(LoRAMergeError, match="'a' is merged: unmerge it first, or call merge_and_unload"):
        unload(ours)
    with pytest.raises(LoRAMergeError, match="'a' is merged into linear1, but not among \\['b'\\]"):
        merge_and_unload(ours, ["b"])
    assert len(lora_layers(ours)) == 3
    ours, _ = _both(tmp_path / "two", SAME_RANK)
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    with torch.no_grad():
        lora_layers(ours)["linear3"].lora_A["b"].weight.fill_(3e38)  # B·A overflows float32
        lora_layers(ours)["linear3"].lora_B["b"].weight.fill_(3e38)
    with pytest.raises(LoRAMergeError, match="non-finite"):
        merge_and_unload(ours, ["b"])
    assert len(lora_layers(ours)) == 3
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in before.items() if ".b." not in k)



def test_a_batch_with_an_adapter_per_row_takes_a_sparse_input_as_the_base_layer_does(tmp_path):
    ours, _ = _both(tmp_path, SAME_RANK)
    names = ["a", "b", BASE, "c"]
    x = torch.relu(torch.randn(4, 784) - 1)
    with torch.no_grad(), adapter_per_row(ours, names):
        layer = lora_layers(ours)["linear1"]
        torch.testing.assert_close(layer(x.to_sparse_csr()), layer(x), rtol=1e-5, atol=1e-6)


def test_one_adapter_with_a_rank_pattern_rescaled_linearly_gives_pefts_delta(tmp_path):
    config = LoRAConfig(r=3, alpha=3, target_modules=TARGETS, rank_pattern={"linear3": 1})
    ours, theirs = _both(tmp_path, {"a": config})
    theirs.add_weighted_adapter(["a"], [0.5], "scaled", combination_type="linear")
    add_weighted_adapter(ours, ["a"], [0.5], "scaled", combination_type="linear")
    expected, actual = _peft_deltas(theirs, "scaled"), _our_deltas(ours, "scaled")
    for target in TARGETS:
        torch.testing.assert_close(actual[target], expected[target], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(actual[target], 0.5 * lora_layers(ours)[target].delta_weight("a"), rtol=1e-5, atol=1e-6)


def test_a_linear_combination_of_adapters_whose_ranks_differ_on_a_layer_is_refused_naming_it(tmp_path):
    ours, _ = _both(tmp_path, {"a": LoRAConfig(r=2, target_modules=TARGETS),
                               "b": LoRAConfig(r=2, target_modules=TARGETS, rank_pattern={"linear2": 1})})
    with pytest.raises(ValueError, match="on linear2 the adapters' ranks are \\[1, 2\\]; cat or svd is allowed"):
        add_weighted_adapter(ours, ["a", "b"], [1, 1], "mix", combination_type="ties", density=0.5)
    assert all("mix" not in layer.lora_A for layer in lora_layers(ours).values())


def test_a_batch_with_an_adapter_per_row_is_checked_at_every_forward_and_nests(tmp_path):
    ours, _ = _both(tmp_path, SAME_RANK)
    x = torch.randn(2, 784)
    with adapter_per_row(ours, ["a", "b"]):
        with adapter_per_row(ours, ["c", BASE]):
            assert all(layer.row_adapters == ["c", BASE] for layer in lora_layers(ours).values())
        assert all(layer.row_adapters == ["a", "b"] for layer in lora_layers(ours).values())
        merge(ours, "a")
        with pytest.raises(LoRAMergeError, match="eval mode with nothing merged"):
            ours(x)
        unmerge(ours)
        ours.train()
        with pytest.raises(LoRAMergeError, match="eval mode with nothing merged"):
            ours(x)
        ours.eval()
        ours(x)


def test_merge_and_unload_merges_each_layers_own_active_adapter_as_peft_does(tmp_path):
    ours, theirs = _both(tmp_path, SAME_RANK)
    for model in (ours, theirs):
        (set_adapter if model is ours else lambda m, n: m.set_adapter(n))(model, "c")
    delete_adapter(ours, "c")
    theirs.delete_adapter("c")  # linear3 had no c: each layer falls back to its own first adapter
    x = torch.randn(3, 784)
    with torch.no_grad():
        torch.testing.assert_close(merge_and_unload(ours)(x), theirs.merge_and_unload()(x), rtol=1e-5, atol=1e-5)

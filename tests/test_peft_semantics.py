"""Where PEFT has a rule, the library follows it (PEFT is the oracle): target names select a module or a dotted
tail of one, a float16 or bfloat16 base gets float32 adapters, merging another adapter keeps the active one, and
an adapter name is taken once."""
from __future__ import annotations

from collections import OrderedDict

import peft
import pytest
import torch
from torch import nn

from lora import (
    AdapterLoadError,
    LoRAConfig,
    LoRAConfigError,
    active_adapter,
    add_weighted_adapter,
    inject,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    unmerge,
)
from tests.helpers import TARGETS, small_base


class Nested(nn.Module):
    """Someone's model with repeated layer names: enc.fc1, enc.fc2 and dec.fc1 (no bias), and enc.act."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(OrderedDict(fc1=nn.Linear(8, 6), act=nn.ReLU(), fc2=nn.Linear(6, 6)))
        self.dec = nn.ModuleDict({"fc1": nn.Linear(6, 5, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec["fc1"](self.enc(x))


def nested(seed: int = 0) -> Nested:
    torch.manual_seed(seed)
    return Nested().eval()


def _randomize(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in layer.lora_B:
                layer.lora_B[name].weight.normal_(0, 0.5)
    return model


def _peft_wrapped(model: peft.PeftModel) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("targets", [["fc1"], ["enc.fc1"], ["fc1", "fc2"], {"fc2", "dec.fc1"}])
def test_target_names_select_a_module_or_a_dotted_tail_as_peft_and_adapters_travel_both_ways(tmp_path, targets):
    ours = _randomize(inject(nested(), LoRAConfig(r=2, alpha=4, target_modules=targets)))
    theirs = peft.get_peft_model(nested(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    assert set(lora_layers(ours)) == _peft_wrapped(theirs)
    x = torch.randn(5, 8)
    save_adapter(ours, tmp_path / "ours")
    from_ours = peft.PeftModel.from_pretrained(nested(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(from_ours(x), ours(x), rtol=1e-6, atol=1e-6)
    _randomize(theirs.base_model.model)
    theirs.save_pretrained(str(tmp_path / "peft"))
    load_adapter(from_peft := nested(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(from_peft(x), theirs.eval()(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("targets, message", [
    (["act"], r"target_modules='act' is invalid: the name of nn.Linear modules only \(it selects enc.act, a ReLU\)"),
    (["fc9"], r"target_modules='fc9' is invalid: the name of an nn.Linear of the model \(dec.fc1, enc.fc1, enc.fc2\)"),
    (["fc1.base_layer"], "target_modules='fc1.base_layer' is invalid"),  # inside a LoRA layer: PEFT refuses it too
    (["lora_A.default"], "target_modules='lora_A.default' is invalid"),
])
def test_a_target_that_selects_no_linear_outside_lora_layers_is_refused_and_nothing_changes(targets, message):
    model = inject(nested(), LoRAConfig(target_modules=["enc.fc1"]), "first")
    before = dict(model.named_modules())
    with pytest.raises(LoRAConfigError, match=message):
        inject(model, LoRAConfig(target_modules=targets), "second")
    assert dict(model.named_modules()) == before


def test_targets_given_as_a_set_are_kept_in_order_and_a_generator_is_refused(tmp_path):
    config = LoRAConfig(target_modules={"fc2", "fc1"})
    assert config.target_modules == ("fc1", "fc2") and hash(config) == hash(LoRAConfig(target_modules=["fc1", "fc2"]))
    save_adapter(inject(nested(), config), tmp_path / "adapter")
    with pytest.raises(LoRAConfigError, match="target_modules=<generator .* is invalid: a non-empty list"):
        LoRAConfig(target_modules=(name for name in ["fc1"]))


def test_an_adapter_name_is_taken_once_even_on_other_targets():
    model = inject(nested(), LoRAConfig(target_modules=["enc.fc1"]), "a")
    with pytest.raises(ValueError, match="adapter 'a' already exists in the model"):  # PEFT: "already exists"
        inject(model, LoRAConfig(target_modules=["enc.fc2"]), "a")
    assert set(lora_layers(model)) == {"enc.fc1"}


def test_merging_another_adapter_keeps_the_active_one_as_peft_does(tmp_path):
    ours = small_base()
    for name in ("a", "b"):
        inject(ours, LoRAConfig(r=2, alpha=2, target_modules=TARGETS), name)
    _randomize(ours)
    for name in ("a", "b"):
        save_adapter(ours, tmp_path / name, name)
    theirs = peft.PeftModel.from_pretrained(small_base(), str(tmp_path / "a"), adapter_name="a").eval()
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    x = torch.randn(4, 784)
    with torch.no_grad():
        before = ours(x)
        merge(ours, "b")
        theirs.base_model.merge_adapter(["b"])
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        unmerge(ours)
        theirs.base_model.unmerge_adapter()
        assert active_adapter(ours) == theirs.active_adapter == "a"
        torch.testing.assert_close(ours(x), before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_base_gets_float32_adapters_with_pefts_outputs_merge_and_svd(dtype):
    ours = inject(small_base().to(dtype), LoRAConfig(r=2, alpha=4, target_modules=TARGETS))
    theirs = peft.get_peft_model(small_base().to(dtype), peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(TARGETS)))
    inject(ours, LoRAConfig(r=2, alpha=4, target_modules=TARGETS), "other")
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(TARGETS)))
    torch.manual_seed(4)
    with torch.no_grad():
        for target, layer in lora_layers(ours).items():
            peft_layer = getattr(theirs.base_model.model, target)
            for name in ("default", "other"):
                assert layer.lora_A[name].weight.dtype == peft_layer.lora_A[name].weight.dtype == torch.float32
                for table, peft_table in ((layer.lora_A, peft_layer.lora_A), (layer.lora_B, peft_layer.lora_B)):
                    table[name].weight.normal_(0, 0.01)  # updates below one bfloat16 step survive in float32
                    peft_table[name].weight.copy_(table[name].weight)
    x = torch.randn(3, 784, dtype=dtype)
    with torch.no_grad():
        out = ours(x)
        assert out.dtype == dtype and torch.equal(out, theirs(x))
        merge(ours)
        theirs.base_model.merge_adapter()
        for target, layer in lora_layers(ours).items():
            assert torch.equal(layer.base_layer.weight, getattr(theirs.base_model.model, target).base_layer.weight)
        unmerge(ours)
        theirs.base_model.unmerge_adapter()
    add_weighted_adapter(ours, ["default", "other"], [0.5, 0.5], "mix")  # svd, on float32 deltas
    theirs.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    for target, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.delta_weight("mix"), getattr(theirs.base_model.model, target).get_delta_weight("mix"),
                                   rtol=1e-4, atol=1e-6)


def test_an_adapter_is_not_loaded_into_weights_on_the_meta_device(tmp_path):
    save_adapter(_randomize(inject(nested(), LoRAConfig(target_modules=["fc1"]))), tmp_path / "adapter")
    with torch.device("meta"):
        model = Nested()
    with pytest.raises(AdapterLoadError, match="the model's weights are on the 'meta' device"):
        load_adapter(model, tmp_path / "adapter", allow_base_mismatch=True)
    assert lora_layers(model) == {}

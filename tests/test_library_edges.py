"""The library at its edges: refusals change nothing (merge, inject, inference scale, huge ranks), adapter
switching and deletion follow PEFT's semantics (PEFT is the oracle), and adapter directories survive killed
or misdirected saves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import peft
import pytest
import torch

from lora import (
    LoRAConfig,
    LoRAConfigError,
    LoRAMergeError,
    active_adapter,
    base_state_dict,
    delete_adapter,
    inject,
    load_adapter,
    lora_layers,
    merge,
    save_adapter,
    set_adapter,
    set_inference_scale,
)
from tests.helpers import ROOT, TARGETS, TinyMLP


def _model(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(40, 30).eval()


def _randomize_b(model: torch.nn.Module, adapter: str, std: float = 0.1) -> None:
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if adapter in layer.lora_B:
                layer.lora_B[adapter].weight.normal_(0, std)


def test_a_refused_merge_leaves_every_base_weight_bit_for_bit_as_it_was():
    model = inject(_model(), LoRAConfig(r=2, target_modules=TARGETS))
    _randomize_b(model, "default")
    before = {name: tensor.clone() for name, tensor in base_state_dict(model).items()}
    with torch.no_grad():
        last = lora_layers(model)["linear3"]  # only the last layer's merged weight overflows float32
        last.lora_B["default"].weight[0, 0], last.lora_A["default"].weight[0] = 3e38, 10.0
    with pytest.raises(LoRAMergeError, match="non-finite"):
        merge(model)
    for name, tensor in base_state_dict(model).items():
        assert torch.equal(tensor, before[name]), name
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_inject_with_one_bad_target_wraps_nothing():
    model = _model()
    with pytest.raises(LoRAConfigError, match="target_modules='linear9' is invalid"):
        inject(model, LoRAConfig(target_modules=("linear1", "linear2", "linear9")))
    assert lora_layers(model) == {}
    inject(model, LoRAConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="already exists"):
        inject(model, LoRAConfig(target_modules=("linear1", "linear2")))  # same name again: nothing changes
    assert all(list(layer.lora_A) == ["default"] for layer in lora_layers(model).values())


def test_an_inference_scale_that_overflows_float32_and_a_huge_rank_are_refused_with_their_limits():
    model = inject(_model(), LoRAConfig(r=2, alpha=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"inference scale=1e\+39 is invalid: a number >= 0 whose product .* is at most 3.4e\+38"):
        set_inference_scale(model, 1e39)
    with pytest.raises(ValueError, match="inference scale=-1 is invalid"):
        set_inference_scale(model, -1)
    assert all(layer.inference_scale == 1.0 for layer in lora_layers(model).values())
    with pytest.raises(LoRAConfigError, match="r=1000000000 is invalid: an integer up to 65536 is allowed"):
        LoRAConfig(r=10**9, target_modules=TARGETS)
    with pytest.raises(LoRAConfigError, match=r"r=1000 is invalid: at most 784 for linear1 \(784 -> 40\)"):
        inject(_model(), LoRAConfig(r=1000, target_modules=TARGETS))


def test_an_integer_too_large_for_a_float_is_refused_as_a_value_not_a_traceback():
    model = inject(_model(), LoRAConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="inference scale=10{400} is invalid"):
        set_inference_scale(model, 10**400)
    for field in ("alpha", "dropout"):
        with pytest.raises(LoRAConfigError, match=f"{field}=10{{400}} is invalid"):
            LoRAConfig(r=2, target_modules=TARGETS, **{field: 10**400})


def _peft_pair(first_targets: list[str], second_targets: list[str]):
    """The same two adapters (a: ``first_targets``, b: ``second_targets``) in PEFT and here, with equal weights."""
    theirs = peft.get_peft_model(_model(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=first_targets), adapter_name="first")
    theirs.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=2, target_modules=second_targets))
    ours = _model()
    inject(ours, LoRAConfig(r=2, alpha=2, target_modules=tuple(first_targets)), adapter_name="first")
    inject(ours, LoRAConfig(r=2, alpha=2, target_modules=tuple(second_targets)), adapter_name="second")
    torch.manual_seed(5)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            module = theirs.base_model.model.get_submodule(name)
            for adapter in layer.lora_A:
                for kind in ("lora_A", "lora_B"):
                    value = torch.randn_like(getattr(layer, kind)[adapter].weight) * 0.2
                    getattr(layer, kind)[adapter].weight.copy_(value)
                    getattr(module, kind)[adapter].weight.copy_(value)
    return theirs, ours


def test_switching_deleting_and_adding_adapters_follows_peft():
    x = torch.randn(6, 784)
    theirs, ours = _peft_pair(["linear1", "linear3"], ["linear2"])
    # PEFT: first second adapter is not made active by adding it.
    assert theirs.active_adapter == active_adapter(ours) == "first"
    torch.testing.assert_close(ours(x), theirs(x))
    # PEFT switches every layer: where second is absent (linear1, linear3) no adapter applies.
    theirs.set_adapter("second")
    set_adapter(ours, "second")
    torch.testing.assert_close(ours(x), theirs(x))
    # Deleting the active adapter: each layer falls back to its first remaining adapter by name.
    theirs.delete_adapter("second")
    delete_adapter(ours, "second")
    assert active_adapter(ours) == "first" and all(list(layer.lora_A) == (["first"] if name != "linear2" else [])
                                                 for name, layer in lora_layers(ours).items())
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(KeyError, match="no adapter named 'second'"):
        delete_adapter(ours, "second")


def test_loading_a_second_adapter_keeps_the_active_one_as_peft_does(tmp_path):
    x = torch.randn(6, 784)
    for name, seed in (("first", 1), ("second", 2)):
        model = inject(_model(), LoRAConfig(r=2, target_modules=TARGETS))
        torch.manual_seed(seed)
        _randomize_b(model, "default")
        save_adapter(model, tmp_path / name)
    theirs = peft.PeftModel.from_pretrained(_model(), str(tmp_path / "first"), adapter_name="first")
    theirs.load_adapter(str(tmp_path / "second"), adapter_name="second")
    ours = _model()
    load_adapter(ours, tmp_path / "first", adapter_name="first")
    load_adapter(ours, tmp_path / "second", adapter_name="second")
    assert theirs.active_adapter == active_adapter(ours) == "first"
    torch.testing.assert_close(ours(x), theirs(x))


def test_a_merged_adapter_can_be_neither_deleted_nor_switched_away():
    _, ours = _peft_pair(list(TARGETS), list(TARGETS))
    merge(ours, "first")
    with pytest.raises(LoRAMergeError, match="'first' is merged"):
        delete_adapter(ours, "first")
    with pytest.raises(LoRAMergeError, match="'first' is merged"):
        set_adapter(ours, "second")


def test_an_adapter_injected_after_the_last_one_was_deleted_is_active_on_no_layer_until_set_as_in_peft():
    model = inject(_model(), LoRAConfig(r=2, target_modules=["linear1"]), "a")
    delete_adapter(model, "a")
    inject(model, LoRAConfig(r=2, target_modules=list(TARGETS)), "b")  # linear1 is an emptied LoRA layer, the rest new
    assert {name: layer.active_adapter for name, layer in lora_layers(model).items()} == dict.fromkeys(TARGETS)
    set_adapter(model, "b")
    assert {layer.active_adapter for layer in lora_layers(model).values()} == {"b"}


def test_saving_while_an_adapter_is_merged_is_refused_and_writes_nothing(tmp_path):
    model = inject(_model(), LoRAConfig(r=2, target_modules=TARGETS))
    _randomize_b(model, "default")
    save_adapter(model, tmp_path / "before")
    merge(model)
    with pytest.raises(LoRAMergeError, match=r"linear1, linear2, linear3: an adapter is merged .*: save before merging"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    load_adapter(_model(), tmp_path / "before")  # saved before the merge, it names the base it was trained on


KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from lora import LoRAConfig, files, inject, save_adapter
    from tests.helpers import TARGETS, TinyMLP
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)  # the new provenance in place, the weights and config not yet
    files.os.replace = replace
    torch.manual_seed(1)
    save_adapter(inject(TinyMLP(40, 30), LoRAConfig(r=2, target_modules=TARGETS)), Path(sys.argv[1]))
""")


@pytest.mark.parametrize("made_by", ["this library", "PEFT (no provenance file)"])
def test_a_save_killed_between_its_renames_is_refused_on_load_and_the_next_save_cleans_up(tmp_path, made_by):
    target = tmp_path / "adapter"
    model = inject(_model(), LoRAConfig(r=2, target_modules=TARGETS))
    _randomize_b(model, "default")
    save_adapter(model, target)
    if made_by != "this library":
        (target / "adapter_provenance.json").unlink()
    result = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(target)], cwd=ROOT,
                            env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]})
    assert result.returncode == -signal.SIGKILL
    assert len([p for p in target.iterdir() if p.name.endswith(".tmp")]) == 2  # the killed writer's weights, config
    with pytest.raises(ValueError, match="the files are from different saves"):
        load_adapter(_model(), target)
    save_adapter(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                        "adapter_provenance.json"]
    load_adapter(_model(), target)


def test_saving_into_a_directory_of_other_files_or_the_current_one_keeps_those_files(tmp_path, monkeypatch):
    model = inject(_model(), LoRAConfig(r=2, target_modules=TARGETS))
    _randomize_b(model, "default")
    (tmp_path / "checkpoint.pt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    save_adapter(model, ".")
    save_adapter(model, tmp_path)  # the same directory again: the adapter's files are replaced, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "adapter_provenance.json", "checkpoint.pt"]
    assert (tmp_path / "checkpoint.pt").read_text() == "mine"
    load_adapter(loaded := _model(), tmp_path)
    x = torch.randn(3, 784)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"info keys \['weights_sha256'\] are recorded by save_adapter itself"):
        save_adapter(model, tmp_path / "other", info={"weights_sha256": "mine"})
    assert not (tmp_path / "other").exists()


def test_saving_an_adapter_onto_a_regular_file_is_refused_and_keeps_the_file(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("my notes")
    model = inject(_model(), LoRAConfig(r=2, target_modules=TARGETS))
    with pytest.raises(ValueError, match="is a file; an adapter is saved as a directory"):
        save_adapter(model, target)
    assert target.read_text() == "my notes"


@pytest.mark.parametrize("name, allowed", [("v1.0", "a non-empty string without '.'"), ("", "a non-empty string"), (3, "a non"),
                                           ("half", "a name that is not an attribute of torch's nn.ModuleDict")])
def test_an_adapter_name_torch_cannot_hold_is_refused_before_any_layer_changes(name, allowed):
    model = TinyMLP(40, 30)
    with pytest.raises(ValueError, match=f"adapter name {name!r} is invalid: {allowed}"):
        inject(model, LoRAConfig(target_modules=TARGETS), name)
    assert not lora_layers(model)

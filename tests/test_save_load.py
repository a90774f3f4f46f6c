"""Adapter files: round trips, provenance, and refusal (by name) of anything that does not fit."""
from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora import AdapterLoadError, LoRAConfig, LoRAConfigError, base_weights_sha256, inject, load_adapter, lora_layers, save_adapter
from tests.helpers import TARGETS, TinyMLP
from lora.save_load import CONFIG_NAME, PROVENANCE_NAME, WEIGHTS_NAME


def trained_model(seed: int = 0, **config) -> TinyMLP:
    torch.manual_seed(seed)
    model = TinyMLP(hidden_1=40, hidden_2=30)
    inject(model, LoRAConfig(**config, target_modules=TARGETS))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    return model


def fresh_base(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(hidden_1=40, hidden_2=30)


def test_save_then_load_gives_equal_logits(tmp_path):
    model = trained_model(r=2, alpha=3, init="gaussian")
    x = torch.randn(8, 784)
    save_adapter(model, tmp_path / "adapter", info={"digit": 9})
    loaded = fresh_base()
    provenance = load_adapter(loaded, tmp_path / "adapter")
    assert torch.equal(loaded(x), model(x))
    assert provenance["digit"] == 9
    assert provenance["lora_config"]["init"] == "gaussian"
    assert provenance["base_weights_sha256"] == base_weights_sha256(loaded)


def test_saved_files_hold_only_the_adapter_in_peft_layout(tmp_path):
    save_adapter(trained_model(), tmp_path / "adapter", info={"digit": 4})
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([CONFIG_NAME, PROVENANCE_NAME, WEIGHTS_NAME])
    provenance = json.loads((tmp_path / "adapter" / PROVENANCE_NAME).read_text())
    assert provenance["digit"] == 4 and len(provenance["base_weights_sha256"]) == 64
    assert provenance["lora_config"] == LoRAConfig(target_modules=TARGETS).to_dict()
    tensors = load_file(tmp_path / "adapter" / WEIGHTS_NAME)
    assert sorted(tensors) == sorted(
        f"base_model.model.linear{i}.lora_{m}.weight" for i in (1, 2, 3) for m in ("A", "B")
    )
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 1 and config["lora_alpha"] == 1
    assert sorted(config["target_modules"]) == ["linear1", "linear2", "linear3"]


def test_loading_onto_a_different_base_is_refused_unless_overridden(tmp_path):
    save_adapter(trained_model(seed=0), tmp_path / "adapter")
    other = fresh_base(seed=1)
    with pytest.raises(AdapterLoadError, match="trained on base weights sha256"):
        load_adapter(other, tmp_path / "adapter")
    assert not lora_layers(other), "a refused load must leave the model unchanged"
    load_adapter(other, tmp_path / "adapter", allow_base_mismatch=True)
    assert lora_layers(other)


def _rewrite(tmp_path, change, record: bool = True) -> None:
    """Change the saved tensors; with ``record`` the provenance records the new file's sha256, as if saved so."""
    path = tmp_path / "adapter" / WEIGHTS_NAME
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)
    if record:
        provenance_path = tmp_path / "adapter" / PROVENANCE_NAME
        provenance = json.loads(provenance_path.read_text())
        provenance["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        provenance_path.write_text(json.dumps(provenance))


def test_weights_changed_after_the_save_are_refused_as_not_the_saved_ones(tmp_path):
    save_adapter(trained_model(), tmp_path / "adapter")
    _rewrite(tmp_path, lambda t: t["base_model.model.linear1.lora_B.weight"].mul_(2), record=False)
    with pytest.raises(AdapterLoadError, match="that adapter_provenance.json records: the files are from different saves"):
        load_adapter(fresh_base(), tmp_path / "adapter")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("base_model.model.linear2.lora_B.weight"), r"missing \['linear2.lora_B.weight'\]"),
        (lambda t: t.update({"base_model.model.linear4.lora_A.weight": torch.zeros(1, 3)}), r"unexpected \['linear4"),
        (lambda t: t.update({"base_model.model.linear1.lora_A.weight": torch.zeros(2, 784)}), r"linear1.lora_A.weight has shape \(2, 784\)"),
        (lambda t: t.update({"base_model.model.linear1.lora_B.weight": torch.full((40, 1), float("nan"))}), "non-finite"),
        (lambda t: t.update({"linear1.lora_A.weight": t.pop("base_model.model.linear1.lora_A.weight")}), "lacks the 'base_model.model.' prefix"),
    ],
)
def test_damaged_adapter_is_refused_by_name(tmp_path, change, message):
    save_adapter(trained_model(), tmp_path / "adapter")
    _rewrite(tmp_path, change)
    model = fresh_base()
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(model, tmp_path / "adapter")
    assert not lora_layers(model)


def test_config_that_disagrees_with_its_tensors_is_refused(tmp_path):
    save_adapter(trained_model(), tmp_path / "adapter")
    config_path = tmp_path / "adapter" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["r"] = 2
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match=r"disagrees with adapter_config.json on \['r'\]"):
        load_adapter(fresh_base(), tmp_path / "adapter")
    (tmp_path / "adapter" / PROVENANCE_NAME).unlink()  # as in a PEFT-saved adapter: the tensors still tell
    with pytest.raises(AdapterLoadError, match=r"linear1.lora_A.weight has shape \(1, 784\), expected \(2, 784\)"):
        load_adapter(fresh_base(), tmp_path / "adapter")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"lora_config": {**LoRAConfig(target_modules=TARGETS).to_dict(), "r": 3}}), r"disagrees with adapter_config.json on \['r'\]"),
    ],
)
def test_damaged_or_disagreeing_provenance_is_refused(tmp_path, content, message):
    save_adapter(trained_model(), tmp_path / "adapter")
    (tmp_path / "adapter" / PROVENANCE_NAME).write_text(content)
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(fresh_base(), tmp_path / "adapter")


def test_a_pickle_is_never_loaded(tmp_path):
    save_adapter(trained_model(), tmp_path / "adapter")
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (marker.write_text, ("ran",))

    (tmp_path / "adapter" / WEIGHTS_NAME).write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        load_adapter(fresh_base(), tmp_path / "adapter")
    assert not marker.exists()


def test_saving_non_finite_values_is_refused_and_keeps_the_old_adapter(tmp_path):
    good = trained_model()
    save_adapter(good, tmp_path / "adapter")
    before = (tmp_path / "adapter" / WEIGHTS_NAME).read_bytes()
    bad = trained_model()
    with torch.no_grad():
        bad.linear1.lora_A["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_adapter(bad, tmp_path / "adapter")
    assert (tmp_path / "adapter" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_missing_adapter_directory_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterLoadError, match="missing"):
        load_adapter(fresh_base(), tmp_path / "nowhere")


def test_adapter_files_load_into_named_slots_and_switch_on_one_base(tmp_path):
    x = torch.randn(8, 784)
    expected = {}
    for digit, seed in (("digit3", 3), ("digit8", 8)):
        model = fresh_base()
        inject(model, LoRAConfig(r=2, target_modules=TARGETS))
        torch.manual_seed(seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B["default"].weight.normal_(0, 0.1)
        save_adapter(model, tmp_path / digit)
        expected[digit] = model(x)

    shared = fresh_base()
    base_logits = shared(x)
    for digit in expected:
        load_adapter(shared, tmp_path / digit, adapter_name=digit)
    from lora import disable_adapter, set_adapter

    for digit, logits in expected.items():
        set_adapter(shared, digit)
        assert torch.equal(shared(x), logits)
    with disable_adapter(shared):
        assert torch.equal(shared(x), base_logits)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_an_integer_or_bool_adapter_tensor_is_refused_not_cast(tmp_path, dtype):
    save_adapter(trained_model(), tmp_path / "adapter")
    _rewrite(tmp_path, lambda t: t.update({k: v.to(dtype) for k, v in t.items() if k.endswith("linear2.lora_B.weight")}))
    model = fresh_base()
    with pytest.raises(AdapterLoadError, match=f"linear2.lora_B.weight is {dtype}; weights are floating-point"):
        load_adapter(model, tmp_path / "adapter")
    assert not lora_layers(model)


def test_a_float64_value_that_overflows_the_float32_layer_is_refused(tmp_path):
    save_adapter(trained_model(), tmp_path / "adapter")
    key = "base_model.model.linear1.lora_B.weight"
    _rewrite(tmp_path, lambda t: t.update({key: t[key].double().fill_(1e300)}))
    model = fresh_base()
    with pytest.raises(AdapterLoadError, match=r"linear1: lora_B is not finite in torch.float32"):
        load_adapter(model, tmp_path / "adapter")
    assert not lora_layers(model)


def test_a_scaled_delta_that_overflows_float32_is_refused(tmp_path):
    save_adapter(trained_model(r=1, alpha=1e4), tmp_path / "adapter")
    key = "base_model.model.linear1.lora_B.weight"
    _rewrite(tmp_path, lambda t: t[key].fill_(1e36))  # every value finite in float32; B·A·1e4 is not
    model = fresh_base()
    with pytest.raises(AdapterLoadError, match=r"the scaled delta B·A is not finite in torch.float32"):
        load_adapter(model, tmp_path / "adapter")
    assert not lora_layers(model)


@pytest.mark.parametrize("field, value", [("lora_alpha", 1e38), ("alpha_pattern", {"linear2": 3e4}),
                                          ("rank_pattern", {"linear1": 1})])
def test_an_adapter_config_whose_scale_is_above_the_bound_is_refused(tmp_path, field, value):
    save_adapter(trained_model(r=2, alpha=2e4 if field == "rank_pattern" else 1.0), tmp_path / "adapter")
    config_path = tmp_path / "adapter" / CONFIG_NAME
    config = json.loads(config_path.read_text())
    config[field] = value
    config_path.write_text(json.dumps(config))
    (tmp_path / "adapter" / PROVENANCE_NAME).unlink()  # as PEFT would save it: only the config tells
    model = fresh_base()
    with pytest.raises(AdapterLoadError, match=r"scaling=\S+ is invalid: alpha/r of at most 1e\+04"):
        load_adapter(model, tmp_path / "adapter")
    assert not lora_layers(model)


def test_a_config_scale_above_the_bound_is_refused_on_creation():
    with pytest.raises(LoRAConfigError, match=r"scaling=.* is invalid: alpha/sqrt\(r\) of at most 1e\+04"):
        LoRAConfig(r=4, alpha=3e4, use_rslora=True, target_modules=TARGETS)
    assert LoRAConfig(r=4, alpha=2e4, use_rslora=True, target_modules=TARGETS).scaling == 1e4  # the bound itself is allowed


@pytest.mark.parametrize("name", [CONFIG_NAME, PROVENANCE_NAME])
def test_an_integer_of_5000_digits_in_a_json_file_is_refused_in_one_error(tmp_path, name):
    save_adapter(trained_model(), tmp_path / "adapter")
    path = tmp_path / "adapter" / name
    path.write_text(path.read_text().replace('"r": 1', '"r": ' + "9" * 5000, 1))
    with pytest.raises(AdapterLoadError, match=f"{name}: not valid JSON"):
        load_adapter(fresh_base(), tmp_path / "adapter")


@pytest.mark.parametrize("name", [CONFIG_NAME, PROVENANCE_NAME])
def test_a_deeply_nested_json_file_is_refused_in_one_error(tmp_path, name):
    save_adapter(trained_model(), tmp_path / "adapter")
    (tmp_path / "adapter" / name).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        load_adapter(fresh_base(), tmp_path / "adapter")

"""PEFT as the oracle: every PEFT LoRA adapter either loads here with PEFT's logits (adapter on, disabled and
merged) or is refused in one line naming the field, and every adapter saved here loads in PEFT with ours."""
from __future__ import annotations

import json

import peft
import pytest
import torch

from lora import AdapterLoadError, LoRAConfig, disable_adapter, inject, load_adapter, lora_layers, merge, save_adapter
from lora.save_load import CONFIG_NAME
from tests.helpers import TARGETS, TinyMLP, small_base

SUPPORTED = {
    "rank 1, alpha 1": {"r": 1, "lora_alpha": 1},
    "rank 4, alpha 8": {"r": 4, "lora_alpha": 8},
    "rsLoRA": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "one target": {"r": 2, "lora_alpha": 4, "target_modules": ["linear2"]},
    "two targets": {"r": 2, "lora_alpha": 4, "target_modules": ["linear1", "linear3"]},
    "dropout": {"r": 2, "lora_alpha": 2, "lora_dropout": 0.1},
    "gaussian init": {"r": 3, "lora_alpha": 6, "init_lora_weights": "gaussian"},
    "no init": {"r": 2, "lora_alpha": 2, "init_lora_weights": False},
    "empty patterns": {"r": 2, "lora_alpha": 2, "rank_pattern": {}, "alpha_pattern": {}},
    "rank pattern": {"r": 2, "lora_alpha": 2, "rank_pattern": {"linear2": 4}},
    "alpha pattern": {"r": 2, "lora_alpha": 2, "alpha_pattern": {"linear1": 8, "linear3": 0.5}},
    "both patterns, by regular expression": {"r": 3, "lora_alpha": 6, "rank_pattern": {"linear[23]": 1, "linear1": 5},
                                             "alpha_pattern": {"linear[12]": 2}},
    "rank pattern with rsLoRA": {"r": 4, "lora_alpha": 4, "use_rslora": True, "rank_pattern": {"linear3": 9}},
}
REFUSED = {
    "PiSSA init": ({"r": 2, "lora_alpha": 2, "init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported"),
    "OLoRA init": ({"r": 2, "lora_alpha": 2, "init_lora_weights": "olora"}, "init_lora_weights='olora' is not supported"),
    "DoRA": ({"r": 2, "lora_alpha": 2, "use_dora": True}, "use_dora=True is not supported"),
    "bias": ({"r": 2, "lora_alpha": 2, "bias": "all"}, "bias='all' is not supported"),
    "modules to save": ({"r": 2, "lora_alpha": 2, "target_modules": ["linear1"], "modules_to_save": ["linear3"]},
                        "modules_to_save=\\['linear3'\\] is not supported"),
}


def _peft_adapter(tmp_path, options: dict) -> tuple[peft.PeftModel, str]:
    config = peft.LoraConfig(**{"target_modules": list(TARGETS), **options})
    theirs = peft.get_peft_model(small_base(), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.2)  # trained-looking A and B
    theirs.save_pretrained(str(tmp_path / "peft"))
    return theirs.eval(), str(tmp_path / "peft")


@pytest.mark.parametrize("options", SUPPORTED.values(), ids=SUPPORTED.keys())
def test_a_peft_adapter_loads_with_peft_logits_on_disabled_and_merged(tmp_path, options):
    theirs, directory = _peft_adapter(tmp_path, options)
    ours = small_base()
    load_adapter(ours, directory)
    x = torch.randn(7, 784)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
        with disable_adapter(ours), theirs.disable_adapter():
            torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        merge(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", SUPPORTED.values(), ids=SUPPORTED.keys())
def test_an_adapter_saved_here_loads_in_peft_with_our_logits(tmp_path, options):
    init = {True: "kaiming", False: "kaiming", "gaussian": "gaussian"}[options.get("init_lora_weights", True)]
    ours = small_base()
    inject(ours, LoRAConfig(r=options["r"], alpha=options["lora_alpha"], dropout=options.get("lora_dropout", 0.0),
                            use_rslora=options.get("use_rslora", False), init=init,
                            target_modules=tuple(options.get("target_modules", TARGETS)),
                            rank_pattern=options.get("rank_pattern", {}), alpha_pattern=options.get("alpha_pattern", {})))
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B["default"].weight.normal_(0, 0.2)
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(small_base(), str(tmp_path / "ours")).eval()
    x = torch.randn(7, 784)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours.eval()(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, message", REFUSED.values(), ids=REFUSED.keys())
def test_a_peft_adapter_we_cannot_compute_as_peft_does_is_refused_in_one_line(tmp_path, options, message):
    _, directory = _peft_adapter(tmp_path, options)
    ours = small_base()
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    with pytest.raises(AdapterLoadError, match=message) as error:
        load_adapter(ours, directory)
    assert "\n" not in str(error.value) and CONFIG_NAME in str(error.value)
    assert not lora_layers(ours)
    assert all(torch.equal(tensor, before[name]) for name, tensor in ours.state_dict().items())


# LoRA variants whose files hold plain-looking tensors, or which PEFT builds only with more options
VARIANT_FIELDS = {"layer_replication": [[0, 2]], "use_bdlora": {"nblocks": 2}, "velora_config": {"r": 1},
                  "monteclora_config": {"n": 2}, "kasa_config": {"r": 1}, "arrow_config": {"top_k": 1}}


@pytest.mark.parametrize("field", VARIANT_FIELDS)
def test_a_peft_lora_variant_is_refused_in_one_line_naming_its_field(tmp_path, field):
    _, directory = _peft_adapter(tmp_path, {"r": 2, "lora_alpha": 2})
    config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    (tmp_path / "peft" / CONFIG_NAME).write_text(json.dumps({**config, field: VARIANT_FIELDS[field]}))
    with pytest.raises(AdapterLoadError, match=f"{field}=.* is not supported") as error:
        load_adapter(ours := small_base(), directory)
    assert "\n" not in str(error.value) and not lora_layers(ours)


def test_a_regular_expression_for_target_modules_is_refused(tmp_path):
    _, directory = _peft_adapter(tmp_path, {"r": 2, "lora_alpha": 2})
    config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    (tmp_path / "peft" / CONFIG_NAME).write_text(json.dumps({**config, "target_modules": "linear[12]"}))
    with pytest.raises(AdapterLoadError, match="is a regular expression, which is not supported"):
        load_adapter(small_base(), directory)


@pytest.mark.parametrize("init, rank, expected", [("normal", 1, "gaussian"), ("gaussian", 3, "gaussian"),
                                                  ("kaiming", 2, True), ("normal", 2, True)])
def test_the_init_is_written_as_peft_names_it_where_peft_can_represent_it(tmp_path, init, rank, expected):
    model = inject(small_base(), LoRAConfig(r=rank, init=init, target_modules=TARGETS))
    provenance = save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["init_lora_weights"] == expected
    assert provenance["lora_config"]["init"] == init
    if expected == "gaussian":  # PEFT's draw for A, N(0, 1/r^2), is exactly ours
        a = lora_layers(inject(TinyMLP(784, 2000), LoRAConfig(r=rank, init=init, target_modules=("linear2",))))["linear2"]
        assert abs(float(a.lora_A["default"].weight.std()) * rank - 1) < 0.15  # 784 x r draws

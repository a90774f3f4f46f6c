"""An adapter trained here loads in PEFT with equal logits, and a PEFT-saved adapter loads here."""
from __future__ import annotations

import peft
import torch

from lora import LoRAConfig, inject, load_adapter, lora_layers, save_adapter
from tests.helpers import TARGETS, TinyMLP


def base_model(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(hidden_1=40, hidden_2=30).eval()


def test_our_adapter_loads_in_peft_with_equal_logits(tmp_path):
    ours = base_model()
    inject(ours, LoRAConfig(r=2, alpha=4, init="kaiming", target_modules=TARGETS))
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B["default"].weight.normal_(0, 0.1)
    save_adapter(ours, tmp_path / "adapter")
    x = torch.randn(8, 784)
    base_logits = base_model()(x)

    theirs = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "adapter"))
    peft_logits = theirs(x)
    # A wrong key prefix would load nothing and leave PEFT's zero B: outputs would equal the base's.
    assert not torch.allclose(peft_logits, base_logits)
    torch.testing.assert_close(peft_logits, ours(x), rtol=1e-5, atol=1e-6)


def test_peft_saved_adapter_imports_here_with_equal_logits(tmp_path):
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["linear1", "linear3"], init_lora_weights="gaussian")
    theirs = peft.get_peft_model(base_model(), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    x = torch.randn(8, 784)

    ours = base_model()
    load_adapter(ours, tmp_path / "peft")
    assert sorted(lora_layers(ours)) == ["linear1", "linear3"]
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)

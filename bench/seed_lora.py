"""The seed notebook's LoRA, kept as written (translated comments): a weight parametrization that
rebuilds W + B·A·scale on every forward. The baseline our unmerged layer is measured against."""
from __future__ import annotations

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn


class LoRAParametrization(nn.Module):
    def __init__(self, features_in: int, features_out: int, rank: int = 1, alpha: float = 1,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        # Section 4.1 of the paper: Gaussian init for A, zero for B, so ΔW = BA is zero at the start.
        self.lora_A = nn.Parameter(torch.zeros((rank, features_out)).to(device))
        self.lora_B = nn.Parameter(torch.zeros((features_in, rank)).to(device))
        nn.init.normal_(self.lora_A, mean=0, std=1)
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, original_weights: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            return original_weights + torch.matmul(self.lora_B, self.lora_A).view(original_weights.shape) * self.scale
        return original_weights


def apply_seed_lora(net: nn.Module, rank: int = 1, alpha: float = 1, device: torch.device | str = "cpu") -> nn.Module:
    """register_parametrization on linear1..3 and freeze every non-LoRA parameter, as the notebook does."""
    for layer in (net.linear1, net.linear2, net.linear3):
        features_in, features_out = layer.weight.shape
        parametrize.register_parametrization(
            layer, "weight", LoRAParametrization(features_in, features_out, rank=rank, alpha=alpha, device=device)
        )
    for name, param in net.named_parameters():
        if "lora" not in name:
            param.requires_grad = False
    return net


def enable_disable_lora(net: nn.Module, enabled: bool = True) -> None:
    for layer in (net.linear1, net.linear2, net.linear3):
        layer.parametrizations["weight"][0].enabled = enabled

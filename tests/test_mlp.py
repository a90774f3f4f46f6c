"""The oversized MLP's evaluation on CPU: a mostly-zero hidden layer is multiplied as a sparse matrix, with the
dense product's results (to float rounding), deterministically, with or without a LoRA adapter."""
from __future__ import annotations

import pytest
import torch

from lora import LoRAConfig, disable_adapter, inject
from lora import mlp as mlp_module
from lora.metrics import predict
from lora.mlp import OversizedMLP, sparse_if_mostly_zero


def _mostly_zero(density: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(300, 400, generator=generator) * (torch.rand(300, 400, generator=generator) < density)


def test_mostly_zero_activations_turn_sparse_only_when_evaluating_on_cpu() -> None:
    with torch.inference_mode():
        assert sparse_if_mostly_zero(_mostly_zero(0.04)).layout == torch.sparse_csr
        assert sparse_if_mostly_zero(_mostly_zero(0.5)).layout == torch.strided
    with torch.no_grad():
        assert sparse_if_mostly_zero(_mostly_zero(0.04)).layout == torch.sparse_csr
    assert sparse_if_mostly_zero(_mostly_zero(0.04)).layout == torch.strided  # gradients need the dense tensor


def test_the_density_limit_can_be_raised_for_one_call() -> None:
    with torch.inference_mode():
        assert sparse_if_mostly_zero(_mostly_zero(0.5), max_density=1.0).layout == torch.sparse_csr
        assert sparse_if_mostly_zero(_mostly_zero(0.04), max_density=0.01).layout == torch.strided


def _sparse_model() -> tuple[OversizedMLP, torch.Tensor]:
    """A model whose first hidden layer is ~95% zeros on its inputs, as a trained base model's is."""
    torch.manual_seed(0)
    model = OversizedMLP(hidden_1=200, hidden_2=120).eval()
    with torch.no_grad():
        model.linear1.bias.sub_(1.0)
    images = torch.randn(700, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden = model.relu(model.linear1(images.flatten(1)))
    assert 0.01 < float(torch.count_nonzero(hidden)) / hidden.numel() < mlp_module.SPARSE_DENSITY
    return model, images


def _dense_predict(model: OversizedMLP, images: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(mlp_module, "SPARSE_DENSITY", -1.0)  # no tensor has fewer than -1 non-zeros: always dense
        return predict(model, images, batch_size=256)


def test_sparse_evaluation_gives_the_dense_logits_to_float_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = _sparse_model()
    converted = []

    def spy(activations: torch.Tensor) -> torch.Tensor:
        converted.append(sparse_if_mostly_zero(activations))
        return converted[-1]

    monkeypatch.setattr(mlp_module, "sparse_if_mostly_zero", spy)
    sparse = predict(model, images, batch_size=256)
    assert [t.layout for t in converted] == [torch.sparse_csr] * 3  # one per batch of 256, 256 and 188 images
    dense = _dense_predict(model, images, monkeypatch)
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-5)
    assert torch.equal(sparse.argmax(dim=1), dense.argmax(dim=1))


def test_sparse_evaluation_with_a_lora_adapter_on_and_off_follows_the_dense_one(monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = _sparse_model()
    base = predict(model, images)
    inject(model, LoRAConfig(r=2, alpha=2))
    with torch.no_grad():
        for name, layer in model.named_modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B["default"].weight.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    on, dense_on = predict(model, images), _dense_predict(model, images, monkeypatch)
    torch.testing.assert_close(on, dense_on, rtol=0, atol=1e-5)
    assert not torch.allclose(on, base, atol=1e-3)
    with disable_adapter(model):
        assert torch.equal(predict(model, images), base)


def test_sparse_evaluation_is_deterministic_across_runs_and_thread_counts() -> None:
    model, images = _sparse_model()
    first = predict(model, images)
    assert torch.equal(first, predict(model, images))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(first, predict(model, images))
    finally:
        torch.set_num_threads(threads)


def test_training_sees_dense_activations_and_gets_gradients_for_every_layer() -> None:
    model, images = _sparse_model()
    model.train()
    loss = model(images[:32]).logsumexp(dim=1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

"""The backend boundary: which loop trains what, Adam through torch's private kernel (and its fallback),
sparse evaluation, and that only lora_mnist/backend.py reaches into lora_mnist/fast/."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest
import torch
from torch import nn

from lora import LoRAConfig, disable_adapter, inject, mark_only_lora_trainable
from lora_mnist import backend
from lora_mnist.errors import BackendError
from lora_mnist.fast import adam, cpu_kernels, sparse
from lora_mnist.metrics import predict
from lora_mnist.mlp import OversizedMLP
from lora_mnist.params import LAYERS
from lora_mnist.train import train
from tests.helpers import ROOT, TinyMLP


def _data(samples: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.rand(samples, 784, generator=generator), torch.randint(0, 10, (samples,), generator=generator)


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return names


def test_only_the_backend_module_imports_the_fast_paths() -> None:
    importers = set()
    for package in ("lora", "lora_mnist", "stages", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.parent.name == "fast":
                continue
            if any("fast" in name.replace(".", " ").split() for name in _imported_modules(ast.parse(path.read_text()))):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == {"lora_mnist/backend.py"}


def test_an_unknown_backend_is_refused_in_one_line_naming_what_is_allowed() -> None:
    with pytest.raises(BackendError, match="backend='gpu' is invalid: one of 'auto', 'torch' is allowed"):
        train(OversizedMLP(8, 8), *_data(), steps=1, batch_size=10, lr=1e-3, seed=0, backend="gpu")


def test_auto_pretrains_the_mlp_with_the_cpu_kernels_and_everything_else_eagerly() -> None:
    images, _ = _data()
    assert backend.training_path(OversizedMLP(8, 8), images, None, "auto") == "cpu-kernels"
    assert backend.training_path(OversizedMLP(8, 8), images, None, "torch") == "eager"
    assert backend.training_path(TinyMLP(8, 8), images, None, "auto") == "eager"  # another model: another forward
    lora_model = inject(OversizedMLP(8, 8), LoRAConfig(target_modules=LAYERS))
    mark_only_lora_trainable(lora_model)
    assert backend.training_path(lora_model, images, None, "auto") == "eager"
    optimizer = backend.make_optimizer(list(OversizedMLP(8, 8).parameters()), 1e-3)
    assert backend.training_path(OversizedMLP(8, 8), images, optimizer, "auto") == "eager"  # the kernels keep their own Adam


def test_the_kernels_are_used_only_for_float32_cpu_models_and_images() -> None:
    assert cpu_kernels.trains_with_kernels(OversizedMLP(8, 8), _data()[0])
    assert not cpu_kernels.trains_with_kernels(OversizedMLP(8, 8), _data()[0].double())
    assert not cpu_kernels.trains_with_kernels(OversizedMLP(8, 8).double(), _data()[0])


def test_the_torch_backend_follows_the_fast_one_to_float_rounding() -> None:
    images, labels = _data(200)
    runs = []
    for name in ("auto", "torch"):
        torch.manual_seed(0)
        model = OversizedMLP(37, 50)
        runs.append((model, train(model, images, labels, steps=25, batch_size=10, lr=1e-3, seed=0, backend=name)))
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=1e-5)
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_torch_still_has_the_private_fused_adam_kernel_and_it_equals_torch_optim_adam_bit_for_bit() -> None:
    assert adam.private_kernel_available(), "torch._fused_adam_ is gone: lora_mnist/fast/adam.py falls back to torch.optim"
    torch.manual_seed(0)
    ours, reference = OversizedMLP(hidden_1=30, hidden_2=20), OversizedMLP(hidden_1=30, hidden_2=20)
    reference.load_state_dict(ours.state_dict())
    for model in (ours, reference):
        model.linear1.bias.requires_grad_(False)  # a frozen parameter is skipped by both
    optimizers = [adam.FusedAdam([p for p in ours.parameters() if p.requires_grad], lr=1e-2),
                  torch.optim.Adam([p for p in reference.parameters() if p.requires_grad], lr=1e-2, fused=True)]
    images, labels = _data()
    for step in range(30):
        batch = slice(step % 4 * 10, step % 4 * 10 + 10)
        for model, optimizer in zip((ours, reference), optimizers):
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), reference.parameters()))
    state_bytes = [sum(t.numel() * t.element_size() for s in o.state.values() for t in s.values()) for o in optimizers]
    assert state_bytes[0] == state_bytes[1]


def test_without_the_private_kernel_adam_falls_back_to_torch_optim_with_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _data()
    runs = []
    for available in (True, False):
        if not available:  # as if torch had renamed it; torch.optim's own fused Adam then stands in
            monkeypatch.setattr(adam, "private_kernel_available", lambda: False)
        torch.manual_seed(0)
        model = TinyMLP(16, 12)
        optimizer = backend.make_optimizer(list(model.parameters()), 1e-2)
        assert isinstance(optimizer, adam.FusedAdam) == available
        runs.append(train(model, images, labels, steps=12, batch_size=10, lr=1e-2, seed=0, optimizer=optimizer))
    assert torch.equal(runs[0], runs[1])


def test_training_does_not_import_torch_dynamo() -> None:
    code = ("import sys, torch; from lora_mnist.mlp import OversizedMLP; from lora_mnist.train import train; "
            "train(OversizedMLP(8, 8), torch.rand(20, 784), torch.zeros(20, dtype=torch.long), steps=3, batch_size=10, "
            "lr=1e-3, seed=0, backend='auto'); print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "False"


def _mostly_zero(density: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(300, 400, generator=generator) * (torch.rand(300, 400, generator=generator) < density)


def test_mostly_zero_activations_turn_sparse_below_the_density_limit() -> None:
    assert sparse.sparse_if_mostly_zero(_mostly_zero(0.04)).layout == torch.sparse_csr
    assert sparse.sparse_if_mostly_zero(_mostly_zero(0.5)).layout == torch.strided
    assert sparse.sparse_if_mostly_zero(_mostly_zero(0.5), max_density=1.0).layout == torch.sparse_csr


def _sparse_model() -> tuple[OversizedMLP, torch.Tensor]:
    """A model whose first hidden layer is ~95% zeros on its inputs, as a trained base model's is."""
    torch.manual_seed(0)
    model = OversizedMLP(hidden_1=200, hidden_2=120).eval()
    with torch.no_grad():
        model.linear1.bias.sub_(1.0)
    images = torch.randn(700, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden = model.relu(model.linear1(images.flatten(1)))
    assert 0.01 < float(torch.count_nonzero(hidden)) / hidden.numel() < sparse.SPARSE_DENSITY
    return model, images


def test_sparse_evaluation_gives_the_dense_logits_to_float_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = _sparse_model()
    converted, original = [], sparse.sparse_if_mostly_zero

    def spy(activations: torch.Tensor) -> torch.Tensor:
        converted.append(original(activations))
        return converted[-1]

    monkeypatch.setattr(sparse, "sparse_if_mostly_zero", spy)
    fast = predict(model, images, "auto", batch_size=256)
    assert [t.layout for t in converted] == [torch.sparse_csr] * 3  # one per batch of 256, 256 and 188 images
    dense = predict(model, images, "torch", batch_size=256)
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-5)
    assert torch.equal(fast.argmax(dim=1), dense.argmax(dim=1))


def test_sparse_evaluation_with_a_lora_adapter_on_and_off_follows_the_dense_one() -> None:
    model, images = _sparse_model()
    base = predict(model, images)
    inject(model, LoRAConfig(r=2, alpha=2, target_modules=LAYERS))
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B["default"].weight.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    on, dense_on = predict(model, images), predict(model, images, "torch")
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
    model(images[:32]).logsumexp(dim=1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

"""Training kernels: the fused CPU kernel (lora/fused.py) follows torch's Adam, is deterministic, is built once and
refused clearly; frozen layers of LoRA fine-tuning through the kernels follow torch's product; lora.train.Adam is
torch.optim.Adam(fused=True) bit for bit."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from lora import LoRAConfig, fused, inject, mark_only_lora_trainable
from lora.fused import KernelUnavailable, frozen_linear, resolve_kernel, train_fused
from lora.mlp import OversizedMLP
from lora.train import Adam, train

CPU = torch.device("cpu")


def _mostly_zero_hidden_layers(model: OversizedMLP) -> OversizedMLP:
    """Biases that cut most ReLU outputs, as training does: the kernel then packs each batch's non-zero columns."""
    with torch.no_grad():
        model.linear1.bias.sub_(0.45)
        model.linear2.bias.sub_(0.12)
    return model


def _train_both(batch_size: int, samples: int, steps: int = 25, sparse: bool = False) -> tuple[tuple[OversizedMLP, torch.Tensor], ...]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(samples, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (samples,), generator=generator)
    runs = []
    for trainer in (train_fused, train):
        torch.manual_seed(0)
        model = OversizedMLP(hidden_1=37, hidden_2=50)  # sizes off the kernel's vector width: its tails run too
        if sparse:
            _mostly_zero_hidden_layers(model)
        losses = trainer(model, images, labels, steps=steps, batch_size=batch_size, lr=1e-3, seed=0, desc="test")
        runs.append((model, losses))
    return tuple(runs)


def test_the_sparse_setting_leaves_under_half_of_a_batchs_hidden_columns_non_zero() -> None:
    torch.manual_seed(0)
    model = _mostly_zero_hidden_layers(OversizedMLP(hidden_1=37, hidden_2=50))
    images = torch.rand(10, 784, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden_1 = model.relu(model.linear1(images))
        hidden_2 = model.relu(model.linear2(hidden_1))
    for hidden in (hidden_1, hidden_2):
        assert 0 < (hidden != 0).any(dim=0).float().mean() < 0.5


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "mostly-zero-hidden-layers"])
@pytest.mark.parametrize("batch_size,samples", [(10, 200), (1, 37), (17, 203), (3, 50)])
def test_fused_training_follows_autograd_and_torch_adam_to_float_rounding(batch_size: int, samples: int, sparse: bool) -> None:
    (fused_model, fused_losses), (torch_model, torch_losses) = _train_both(batch_size, samples, sparse=sparse)
    assert fused_losses.shape == torch_losses.shape == (25,)
    torch.testing.assert_close(fused_losses, torch_losses, rtol=0, atol=1e-5)
    for name, parameter in fused_model.named_parameters():
        torch.testing.assert_close(parameter, dict(torch_model.named_parameters())[name], rtol=0, atol=1e-4, msg=name)
    assert not torch.equal(fused_model.linear2.weight, OversizedMLP(37, 50).linear2.weight)  # it did train


def test_fused_training_is_deterministic() -> None:
    first, second = _train_both(10, 200)[0], _train_both(10, 200)[0]
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[0].parameters(), second[0].parameters()))


def test_fused_training_refuses_a_model_with_frozen_parameters() -> None:
    model = OversizedMLP(hidden_1=8, hidden_2=8)
    model.linear1.weight.requires_grad_(False)
    with pytest.raises(KernelUnavailable, match="every parameter trainable"):
        train_fused(model, torch.rand(4, 784), torch.zeros(4, dtype=torch.long), steps=1, batch_size=2, lr=1e-3, seed=0)


def test_fused_training_refuses_images_that_are_not_float32() -> None:
    with pytest.raises(ValueError, match="needs float32 CPU images, not torch.float64 on cpu"):
        train_fused(OversizedMLP(hidden_1=8, hidden_2=8), torch.rand(4, 784, dtype=torch.float64),
                    torch.zeros(4, dtype=torch.long), steps=1, batch_size=2, lr=1e-3, seed=0)


def test_auto_picks_the_fused_kernel_on_cpu_and_torch_elsewhere() -> None:
    assert resolve_kernel("auto", CPU) == "fused"
    assert resolve_kernel("torch", CPU) == "torch"
    assert resolve_kernel("auto", torch.device("cuda")) == "torch"
    with pytest.raises(KernelUnavailable, match="kernel='fused' runs on CPU only"):
        resolve_kernel("fused", torch.device("cuda"))
    with pytest.raises(ValueError, match="kernel='gpu' is invalid: one of auto, fused, torch is allowed"):
        resolve_kernel("gpu", CPU)


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """An empty kernel cache and no library loaded in this process; restored afterwards."""
    monkeypatch.setenv("LORA_KERNEL_CACHE", str(tmp_path / "cache"))
    fused._library.cache_clear()
    fused._kernel_builds.cache_clear()
    yield tmp_path / "cache"
    fused._library.cache_clear()
    fused._kernel_builds.cache_clear()


def test_the_kernel_is_built_once_into_the_cache(fresh_build) -> None:
    first = fused._build()
    assert first.parent == fresh_build and first.suffix == ".so"
    built_at = first.stat().st_mtime_ns
    assert fused._build() == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in fresh_build.iterdir()] == [first.name]  # no temporary left behind


def test_without_a_compiler_auto_falls_back_and_fused_says_why(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    assert resolve_kernel("auto", CPU) == "torch"
    with pytest.raises(KernelUnavailable, match="needs a C compiler: 'no-such-compiler' is not on PATH"):
        resolve_kernel("fused", CPU)


def test_a_failing_compiler_is_one_line_and_leaves_no_library(fresh_build, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'cc: error: unrecognized option -fopenmp' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.raises(KernelUnavailable) as error:
        resolve_kernel("fused", CPU)
    assert str(error.value) == f"kernel='fused' could not be compiled with {compiler}: cc: error: unrecognized option -fopenmp"
    assert not any(fresh_build.rglob("*"))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "mostly-zero-hidden-layers"])
def test_fused_results_do_not_depend_on_the_thread_count(sparse: bool) -> None:
    generator = torch.Generator().manual_seed(2)
    images, labels = torch.rand(300, 784, generator=generator), torch.randint(0, 10, (300,), generator=generator)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            torch.manual_seed(0)
            model = OversizedMLP(hidden_1=100, hidden_2=200)
            if sparse:
                _mostly_zero_hidden_layers(model)
            losses = train_fused(model, images, labels, steps=40, batch_size=10, lr=1e-3, seed=0)
            runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    for losses, parameters in runs[1:]:
        assert torch.equal(losses, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(parameters, runs[0][1]))


def _frozen(layer: nn.Linear) -> nn.Linear:
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows,zero_columns", [(10, 0.0), (10, 0.9), (1, 0.5), (7, 0.9)])
def test_frozen_linear_follows_torch_forward_and_input_gradient_to_float_rounding(rows: int, zero_columns: float, bias: bool) -> None:
    torch.manual_seed(0)
    layer = _frozen(nn.Linear(37, 50, bias=bias))  # sizes off the kernel's vector width
    x = torch.randn(rows, 37) * (torch.rand(37) >= zero_columns)  # zero columns: the packed forward
    x_torch, x_kernel = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(rows, 50) * (torch.rand(50) < 0.5)  # zero output gradients: rows the backward skips
    (expected := layer(x_torch)).backward(grad_out)
    (actual := frozen_linear(layer, x_kernel)).backward(grad_out)
    assert actual.grad_fn is not None and "FrozenLinear" in type(actual.grad_fn).__name__
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_kernel.grad, x_torch.grad, rtol=0, atol=1e-5)


def test_frozen_linear_leaves_trainable_layers_large_batches_and_evaluation_to_torch() -> None:
    layer, x = nn.Linear(20, 30), torch.randn(10, 20)
    frozen_linear(layer, x).sum().backward()
    assert layer.weight.grad is not None  # the weights still receive their gradient
    rows = fused.FROZEN_KERNEL_MAX_ROWS + 1
    assert "FrozenLinear" not in type(frozen_linear(_frozen(layer), torch.randn(rows, 20, requires_grad=True)).grad_fn).__name__
    with torch.no_grad():
        assert torch.equal(frozen_linear(layer, x), layer(x))


def test_frozen_linear_does_not_depend_on_the_thread_count() -> None:
    torch.manual_seed(0)
    layer, x = _frozen(nn.Linear(300, 200)), torch.randn(10, 300).relu().requires_grad_()
    threads, runs = torch.get_num_threads(), []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            x.grad = None
            (out := frozen_linear(layer, x)).backward(torch.ones_like(out))
            runs.append((out.detach(), x.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1]) for out, grad in runs[1:])


def test_lora_fine_tuning_through_the_kernels_follows_torch_to_float_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(4)
    images, labels = torch.rand(60, 784, generator=generator), torch.randint(0, 10, (60,), generator=generator)
    adapters = []
    for route in ("kernels", "torch"):
        if route == "torch":
            monkeypatch.setattr("lora.layer.frozen_linear", lambda layer, x: layer(x))
        torch.manual_seed(0)
        model = _mostly_zero_hidden_layers(OversizedMLP(hidden_1=37, hidden_2=50))
        inject(model, LoRAConfig(r=2))
        mark_only_lora_trainable(model)
        train(model, images, labels, steps=30, batch_size=10, lr=1e-2, seed=0)
        adapters.append({name: p.detach() for name, p in model.named_parameters() if "lora_" in name})
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) == 6
    for name, value in adapters[0].items():
        torch.testing.assert_close(value, adapters[1][name], rtol=0, atol=1e-4, msg=name)
    assert any(value.abs().sum() > 0 for name, value in adapters[0].items() if "lora_B" in name)  # it did train


def _adam_step_without_gradient(exp_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, first moment) after one fused Adam step of a 4 x 2 layer whose gradient is zero."""
    weight, bias = torch.tensor([[0.5, -0.25], [1e-3, 2.0], [-3.0, 0.125], [7.0, -1e-4]]), torch.zeros(4)
    exp_avg, exp_avg_sq = exp_avg.clone(), torch.full((4, 2), 1e-12)
    tensors = [weight, bias, exp_avg, exp_avg_sq, torch.zeros(4), torch.zeros(4), torch.ones(1, 2), torch.zeros(1, 4),
               torch.empty(1, 2), None, None]
    fused._library().linear_adam_step(*fused._ptrs(*tensors), 1, 0, 2, 4, 0, 1, 1e-3, 0.9, 0.999, 1e-8, 100)
    return weight, exp_avg


def test_the_adam_kernel_flushes_subnormal_moments_without_moving_a_weight() -> None:
    subnormal = torch.tensor([1e-40, -1e-39, 5e-45, 1e-38]).repeat(2).reshape(4, 2)  # all under 2**-126
    assert (subnormal != 0).all() and (subnormal.abs() < torch.finfo(torch.float32).tiny).all()
    weight, exp_avg = _adam_step_without_gradient(subnormal)
    zero_weight, zero_exp_avg = _adam_step_without_gradient(torch.zeros(4, 2))
    assert torch.equal(exp_avg, torch.zeros(4, 2)) and torch.equal(zero_exp_avg, torch.zeros(4, 2))
    assert torch.equal(weight, zero_weight)
    # the caller's thread keeps subnormals after the kernel returns
    assert (torch.tensor([2e-38]) / 4).item() != 0


def test_adam_equals_torch_optim_adam_fused_bit_for_bit() -> None:
    torch.manual_seed(0)
    ours, reference = OversizedMLP(hidden_1=30, hidden_2=20), OversizedMLP(hidden_1=30, hidden_2=20)
    reference.load_state_dict(ours.state_dict())
    for model in (ours, reference):
        model.linear1.bias.requires_grad_(False)  # a frozen parameter is skipped by both
    optimizers = [Adam([p for p in ours.parameters() if p.requires_grad], lr=1e-2),
                  torch.optim.Adam([p for p in reference.parameters() if p.requires_grad], lr=1e-2, fused=True)]
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.rand(40, 784, generator=generator), torch.randint(0, 10, (40,), generator=generator)
    for step in range(30):
        batch = slice(step % 4 * 10, step % 4 * 10 + 10)
        for model, optimizer in zip((ours, reference), optimizers):
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), reference.parameters()))
    state_bytes = [sum(t.numel() * t.element_size() for s in o.state.values() for t in s.values()) for o in optimizers]
    assert state_bytes[0] == state_bytes[1]


def test_training_with_lora_train_does_not_import_torch_dynamo() -> None:
    code = ("import sys, torch; from lora.mlp import OversizedMLP; from lora.train import train; "
            "train(OversizedMLP(8, 8), torch.rand(20, 784), torch.zeros(20, dtype=torch.long), steps=3, batch_size=10, "
            "lr=1e-3, seed=0); print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_an_unwritable_cache_is_one_line_naming_the_variable(fresh_build, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LORA_KERNEL_CACHE", str(blocker / "cache"))
    with pytest.raises(KernelUnavailable, match=r"could not be cached in .*a-file/cache \(Not a directory\); set \$LORA_KERNEL_CACHE"):
        resolve_kernel("fused", CPU)
    assert resolve_kernel("auto", CPU) == "torch"

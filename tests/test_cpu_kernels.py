"""The CPU kernels (lora_mnist/fast/cpu_kernels.py): pretraining follows autograd and torch's Adam to float
rounding, is deterministic and independent of the thread count and of the instruction set it is built for; the
kernel is built once, and a missing or failing compiler is one line."""
from __future__ import annotations

import platform

import pytest
import torch

from lora_mnist.batches import batch_order
from lora_mnist.fast import cpu_kernels
from lora_mnist.fast.cpu_kernels import KernelUnavailable, train_fused
from lora_mnist.mlp import OversizedMLP
from lora_mnist.train import train

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
    for backend in ("auto", "torch"):
        torch.manual_seed(0)
        model = OversizedMLP(hidden_1=37, hidden_2=50)  # sizes off the kernel's vector width: its tails run too
        if sparse:
            _mostly_zero_hidden_layers(model)
        losses = train(model, images, labels, steps=steps, batch_size=batch_size, lr=1e-3, seed=0, backend=backend, desc="test")
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


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """An empty kernel cache and no library loaded in this process; restored afterwards."""
    monkeypatch.setenv("LORA_KERNEL_CACHE", str(tmp_path / "cache"))
    cpu_kernels._library.cache_clear()
    cpu_kernels.kernel_builds.cache_clear()
    yield tmp_path / "cache"
    cpu_kernels._library.cache_clear()
    cpu_kernels.kernel_builds.cache_clear()


def test_the_kernel_is_built_once_into_the_cache(fresh_build) -> None:
    first = cpu_kernels._build()
    assert first.parent == fresh_build and first.suffix == ".so"
    built_at = first.stat().st_mtime_ns
    assert cpu_kernels._build() == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in fresh_build.iterdir()] == [first.name]  # no temporary left behind


def test_without_a_compiler_training_falls_back_to_autograd_and_the_kernels_say_why(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    assert not cpu_kernels.trains_with_kernels(OversizedMLP(8, 8), torch.rand(4, 784))
    with pytest.raises(KernelUnavailable, match="need a C compiler: 'no-such-compiler' is not on PATH"):
        cpu_kernels._library()


def test_a_failing_compiler_is_one_line_and_leaves_no_library(fresh_build, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'cc: error: unrecognized option -fopenmp' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    with pytest.raises(KernelUnavailable) as error:
        cpu_kernels._library()
    assert str(error.value) == f"the CPU kernels could not be compiled with {compiler}: cc: error: unrecognized option -fopenmp"
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
            losses = train_fused(model, images, labels, batch_order(300, 10, 40, seed=0), lr=1e-3)
            runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    finally:
        torch.set_num_threads(threads)
    for losses, parameters in runs[1:]:
        assert torch.equal(losses, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(parameters, runs[0][1]))


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 instruction sets")
def test_fused_results_do_not_depend_on_the_instruction_set_the_kernel_is_built_for(fresh_build, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(3)
    images, labels = torch.rand(300, 784, generator=generator), torch.randint(0, 10, (300,), generator=generator)
    runs = []
    for target in ("x86-64", "native"):  # SSE2 without fused multiply-add; this CPU's best, with it
        monkeypatch.setattr(cpu_kernels, "FLAGS", [f"-march={target}" if flag.startswith("-march=") else flag
                                                   for flag in cpu_kernels.FLAGS])
        cpu_kernels._library.cache_clear()
        torch.manual_seed(0)
        model = OversizedMLP(hidden_1=37, hidden_2=50)  # sizes off the vector width: the scalar tails run too
        losses = train_fused(model, images, labels, batch_order(300, 10, 40, seed=0), lr=1e-3)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert len(list(fresh_build.iterdir())) == 2  # two builds
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def _adam_step_without_gradient(exp_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, first moment) after one fused Adam step of a 4 x 2 layer whose gradient is zero."""
    weight, bias = torch.tensor([[0.5, -0.25], [1e-3, 2.0], [-3.0, 0.125], [7.0, -1e-4]]), torch.zeros(4)
    exp_avg, exp_avg_sq = exp_avg.clone(), torch.full((4, 2), 1e-12)
    tensors = [weight, bias, exp_avg, exp_avg_sq, torch.zeros(4), torch.zeros(4), torch.ones(1, 2), torch.zeros(1, 4),
               torch.empty(1, 2), None, None]
    cpu_kernels._library().linear_adam_step(*cpu_kernels._ptrs(*tensors), 1, 0, 2, 4, 0, 1, 1e-3, 0.9, 0.999, 1e-8, 100)
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


def test_an_unwritable_cache_is_one_line_naming_the_variable(fresh_build, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LORA_KERNEL_CACHE", str(blocker / "cache"))
    with pytest.raises(KernelUnavailable, match=r"could not be cached in .*a-file/cache \(Not a directory\); set \$LORA_KERNEL_CACHE"):
        cpu_kernels._library()
    assert not cpu_kernels.trains_with_kernels(OversizedMLP(8, 8), torch.rand(4, 784))

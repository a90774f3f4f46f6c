"""Training on CUDA: steps replayed from CUDA graphs compute what eager steps compute. The plan of which steps
are replayed is checked everywhere; the rest needs a GPU (`python -m pytest tests/test_cuda.py` on one)."""
from __future__ import annotations

import random

import pytest
import torch

from lora import LoRAConfig, base_state_dict, inject, mark_only_lora_trainable
from lora_mnist.backend import make_optimizer
from lora_mnist.fast import cuda_graphs
from lora_mnist.fast.cuda_graphs import graph_plan
from lora_mnist.metrics import predict
from lora_mnist.mlp import OversizedMLP
from lora_mnist.params import LAYERS
from lora_mnist.train import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graph_plan_replays_full_chunks_after_the_warmup_and_runs_short_batches_eagerly() -> None:
    lengths = [10] * 7 + [4] + [10] * 9
    assert graph_plan(lengths, 10, chunk=3, warmup=2) == [
        (0, 1, False), (1, 1, False), (2, 3, True), (5, 1, False), (6, 1, False), (7, 1, False),
        (8, 3, True), (11, 3, True), (14, 3, True),
    ]


def test_graph_plan_covers_every_step_once_in_order() -> None:
    generator = random.Random(0)
    for _ in range(200):
        batch_size = generator.randint(1, 5)
        lengths = [generator.choice([batch_size, batch_size, generator.randint(1, batch_size)]) for _ in range(generator.randint(0, 40))]
        plan = graph_plan(lengths, batch_size, chunk=generator.randint(1, 6), warmup=generator.randint(0, 4))
        assert [first for first, _, _ in plan] == [sum(count for _, count, _ in plan[:i]) for i in range(len(plan))]
        assert sum(count for _, count, _ in plan) == len(lengths)
        for first, count, replayed in plan:
            assert not replayed or all(length == batch_size for length in lengths[first : first + count])


def _data(samples: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(samples, 1, 28, 28, generator=generator)
    labels = images.flatten(1)[:, :780].reshape(samples, 10, 78).mean(dim=2).argmax(dim=1)  # learnable: brightest band
    return images.to(device), labels.to(device)


def _eager(model: OversizedMLP, lr: float) -> dict:
    """train()'s options for the eager loop with the same Adam the graphs replay."""
    return {"backend": "torch", "optimizer": make_optimizer([p for p in model.parameters() if p.requires_grad], lr, "auto")}


def _pretrained(device: str, steps: int = 30, graphed: bool = True) -> tuple[OversizedMLP, torch.Tensor]:
    torch.manual_seed(0)
    model = OversizedMLP(hidden_1=64, hidden_2=48).to(device)
    images, labels = _data(203, device)  # batches of 17 with a short one (16) at the end of every epoch
    options = {"backend": "auto", "optimizer": make_optimizer(list(model.parameters()), 1e-3)} if graphed else _eager(model, 1e-3)
    losses = train(model, images, labels, steps=steps, batch_size=17, lr=1e-3, seed=0, desc="test", **options)
    return model, losses


@pytest.fixture()
def small_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda_graphs, "GRAPH_STEPS", 4)
    monkeypatch.setattr(cuda_graphs, "GRAPH_WARMUP", 2)


@needs_cuda
def test_graphed_training_equals_eager_training_bit_for_bit(small_graphs: None) -> None:
    (graphed, graphed_losses), (eager, eager_losses) = _pretrained("cuda"), _pretrained("cuda", graphed=False)
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=0, atol=0)
    for (name, parameter), other in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(parameter, other, rtol=0, atol=0, msg=name)
        assert parameter.grad is None, name
    assert graphed_losses[-5:].mean() < graphed_losses[:5].mean()  # it did learn


@needs_cuda
def test_graphed_training_is_deterministic(small_graphs: None) -> None:
    first, second = _pretrained("cuda"), _pretrained("cuda")
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[0].parameters(), second[0].parameters()))


@needs_cuda
def test_cuda_training_follows_cpu_training_to_float_rounding(small_graphs: None) -> None:
    (cuda_model, cuda_losses), (cpu_model, cpu_losses) = _pretrained("cuda"), _pretrained("cpu")
    torch.testing.assert_close(cuda_losses, cpu_losses, rtol=0, atol=1e-4)
    for (name, parameter), other in zip(cuda_model.named_parameters(), cpu_model.parameters()):
        torch.testing.assert_close(parameter.cpu(), other, rtol=0, atol=1e-3, msg=name)
    images, _ = _data(50, "cpu")
    torch.testing.assert_close(predict(cuda_model, images), predict(cpu_model, images), rtol=0, atol=1e-3)


def _finetuned(base: OversizedMLP, dropout: float, cuda_graph: bool) -> tuple[OversizedMLP, torch.Tensor]:
    torch.manual_seed(0)
    model = OversizedMLP(hidden_1=64, hidden_2=48).to("cuda")
    model.load_state_dict(base.state_dict())
    inject(model, LoRAConfig(r=2, alpha=2, dropout=dropout, target_modules=LAYERS))
    mark_only_lora_trainable(model)
    images, labels = _data(203, "cuda")
    options = {} if cuda_graph else _eager(model, 1e-2)
    losses = train(model, images, labels, steps=23, batch_size=17, lr=1e-2, seed=0, desc="test", **options)
    return model, losses


@needs_cuda
@pytest.mark.parametrize("dropout", [0.0, 0.1])  # with dropout, the graph must replay CUDA's random stream as eager draws it
def test_graphed_lora_finetune_equals_eager_and_leaves_the_base_bit_for_bit(small_graphs: None, dropout: float) -> None:
    base, _ = _pretrained("cuda")
    before = {name: tensor.clone() for name, tensor in base_state_dict(base).items()}
    (graphed, graphed_losses), (eager, eager_losses) = (_finetuned(base, dropout, True), _finetuned(base, dropout, False))
    for model in (graphed, eager):
        for name, tensor in base_state_dict(model).items():
            assert torch.equal(tensor, before[name]), name
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=0, atol=0)
    for (name, parameter), other in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(parameter, other, rtol=0, atol=0, msg=name)
    images = _data(20, "cpu")[0]
    assert not torch.equal(predict(graphed, images), predict(base, images))  # the adapter did train


@needs_cuda
@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "svd", "cat"])
def test_adapters_on_a_cuda_model_combine_to_the_cpu_result(combination) -> None:
    from lora import add_weighted_adapter, lora_layers

    models = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = OversizedMLP(64, 32)
        for name in ("a", "b"):
            inject(model, LoRAConfig(r=2, target_modules=LAYERS), name)
            for layer in lora_layers(model).values():
                torch.nn.init.normal_(layer.lora_B[name].weight, std=0.1)
        model.to(device)
        add_weighted_adapter(model, ["a", "b"], [0.6, 0.4], "mix", combination, density=0.5, seed=3)
        models.append(model)
    for target in LAYERS:
        cpu, cuda = (lora_layers(m)[target].delta_weight("mix") for m in models)
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-4, atol=1e-5)

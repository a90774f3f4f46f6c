"""The seed notebook's experiment as written (torchvision Dataset with per-sample transforms, DataLoader,
element-wise test loop, parametrize-based LoRA), as functions the benchmark can time stage by stage.

Only two things differ from the notebook: MNIST is read from this project's data/mnist/raw (no download)
and tqdm writes to a null stream so that progress bars do not flood the benchmark's output. As in the
notebook, everything runs on CUDA when it is present (--device overrides).
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch
import torchvision.datasets as datasets
import torchvision.transforms as transforms
from torch import nn
from tqdm import tqdm

from bench.seed_lora import apply_seed_lora, enable_disable_lora

_NULL = io.StringIO()
device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")  # the notebook's global; main() may set it


class Desperdicio(nn.Module):  # the notebook's class name ("waste")
    def __init__(self, hidden_size_1: int = 1000, hidden_size_2: int = 2000) -> None:
        super().__init__()
        self.linear1 = nn.Linear(28 * 28, hidden_size_1)
        self.linear2 = nn.Linear(hidden_size_1, hidden_size_2)
        self.linear3 = nn.Linear(hidden_size_2, 10)
        self.relu = nn.ReLU()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img.view(-1, 28 * 28)
        x = self.relu(self.linear1(x))
        x = self.relu(self.linear2(x))
        return self.linear3(x)


def torchvision_root(raw_dir: Path) -> Path:
    """torchvision reads root/MNIST/raw/: a temporary root whose MNIST/raw links to our files."""
    root = Path(tempfile.mkdtemp(prefix="seed-mnist-"))
    (root / "MNIST").mkdir()
    os.symlink(raw_dir.resolve(), root / "MNIST" / "raw")
    return root


def loaders(root: Path, digit: int | None = None) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    train_set = datasets.MNIST(root=str(root), train=True, download=False, transform=transform)
    if digit is not None:
        keep = train_set.targets == digit
        train_set.data, train_set.targets = train_set.data[keep], train_set.targets[keep]
    test_set = datasets.MNIST(root=str(root), train=False, download=False, transform=transform)
    return (
        torch.utils.data.DataLoader(train_set, batch_size=10, shuffle=True),
        torch.utils.data.DataLoader(test_set, batch_size=10, shuffle=True),
    )


def train(train_loader, net: nn.Module, epochs: int = 1, total_iterations_limit: int | None = None) -> None:
    cross_el = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.001)
    total_iterations = 0
    for epoch in range(epochs):
        net.train()
        loss_sum = 0
        num_iterations = 0
        data_iterator = tqdm(train_loader, desc=f"Epoch {epoch + 1}", file=_NULL)
        if total_iterations_limit is not None:
            data_iterator.total = total_iterations_limit
        for x, y in data_iterator:
            x, y = x.to(device), y.to(device)
            num_iterations += 1
            total_iterations += 1
            optimizer.zero_grad()
            output = net(x.view(-1, 28 * 28))
            loss = cross_el(output, y)
            loss_sum += loss.item()
            data_iterator.set_postfix(loss=loss_sum / num_iterations)
            loss.backward()
            optimizer.step()
            if total_iterations_limit is not None and total_iterations >= total_iterations_limit:
                return


def test(test_loader, net: nn.Module) -> tuple[float, list[int]]:
    correct = 0
    total = 0
    wrong_counts = [0 for _ in range(10)]
    with torch.no_grad():
        for x, y in tqdm(test_loader, desc="Testing", file=_NULL):
            x, y = x.to(device), y.to(device)
            output = net(x.view(-1, 784))
            for idx, i in enumerate(output):
                if torch.argmax(i) == y[idx]:
                    correct += 1
                else:
                    wrong_counts[y[idx]] += 1
                total += 1
    return correct / total, wrong_counts


def finetune_lora(net: nn.Module, root: Path, digit: int, steps: int = 100) -> None:
    apply_seed_lora(net, device=device)
    digit_loader, _ = loaders(root, digit)
    train(digit_loader, net, epochs=1, total_iterations_limit=steps)
    enable_disable_lora(net, enabled=True)


def main() -> None:
    """The notebook end to end; prints each step's seconds and the results as JSON on the last line."""
    import argparse
    import json
    import time

    parser = argparse.ArgumentParser()
    parser.add_argument("--raw-dir", type=Path, default=Path("data/mnist/raw"))
    parser.add_argument("--pretrain-steps", type=int, default=None, help="cap pretraining (default: 1 epoch)")
    parser.add_argument("--device", default=None, help="default: the notebook's choice, cuda:0 when present, else cpu")
    args = parser.parse_args()
    global device
    device = torch.device(args.device) if args.device else device

    seconds = {}
    clock = time.perf_counter()
    torch.manual_seed(0)
    root = torchvision_root(args.raw_dir)
    train_loader, test_loader = loaders(root)
    net = Desperdicio().to(device)
    seconds["load"] = time.perf_counter() - clock

    clock = time.perf_counter()
    train(train_loader, net, epochs=1, total_iterations_limit=args.pretrain_steps)
    seconds["pretrain"] = time.perf_counter() - clock  # the loop's loss.item() waits for the device every step

    clock = time.perf_counter()
    accuracy, wrong = test(test_loader, net)
    seconds["test_base"] = time.perf_counter() - clock
    digit = max(range(10), key=lambda d: (wrong[d], -d))

    clock = time.perf_counter()
    finetune_lora(net, root, digit)
    seconds["finetune_100"] = time.perf_counter() - clock

    clock = time.perf_counter()
    accuracy_on, wrong_on = test(test_loader, net)
    seconds["test_lora_on"] = time.perf_counter() - clock
    enable_disable_lora(net, enabled=False)
    clock = time.perf_counter()
    accuracy_off, _ = test(test_loader, net)
    seconds["test_lora_off"] = time.perf_counter() - clock
    print(json.dumps({"device": str(device), "seconds": seconds, "accuracy": accuracy, "digit": digit, "digit_errors": wrong[digit],
                      "accuracy_on": accuracy_on, "digit_errors_on": wrong_on[digit], "accuracy_off": accuracy_off}))


if __name__ == "__main__":
    main()

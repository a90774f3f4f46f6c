"""The IDX reader and the download stage: checksums enforced, bad files refused by name, nothing half-kept."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lora_mnist.data import MEAN, STD, load_split, read_idx
from lora_mnist.errors import DataError
from lora_mnist.download import DownloadError, fetch
from tests.helpers import ROOT, write_idx, write_synthetic_mnist


def test_read_idx_returns_the_declared_shape_and_bytes(tmp_path):
    array = torch.arange(2 * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "x", array)
    assert torch.equal(read_idx(tmp_path / "x"), array)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "magic empty"),
        (b"\x00\x00\x0d\x03" + b"\x00" * 12, "magic 00000d03"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", r"11 bytes, but its header \(5,\) promises 13"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02abcdef", r"14 bytes, but its header \(2,\) promises 10"),
    ],
)
def test_read_idx_refuses_damaged_files_naming_them(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"bad-idx: .*{message}"):
        read_idx(path)


def test_load_split_normalises_like_the_seed_notebook(tmp_path):
    write_synthetic_mnist(tmp_path, train=20, test=10)
    images, labels = load_split(tmp_path, "test")
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte")
    assert images.shape == (10, 784) and images.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(images[3], (raw[3].flatten().float() / 255 - MEAN) / STD)


def test_load_split_refuses_labels_out_of_range_and_count_mismatch(tmp_path):
    write_synthetic_mnist(tmp_path, train=20, test=10)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.full((10,), 12, dtype=torch.uint8))
    with pytest.raises(DataError, match="label 12 found"):
        load_split(tmp_path, "test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.zeros(9, dtype=torch.uint8))
    with pytest.raises(DataError, match="10 images but 9 labels"):
        load_split(tmp_path, "test")


def test_download_copies_from_a_local_directory_and_verifies_checksums(tmp_path):
    checksums = write_synthetic_mnist(tmp_path / "source")
    used = fetch(tmp_path / "raw", ["local"], str(tmp_path / "source"), checksums=checksums)
    assert used == {name: "local" for name in checksums}
    for name in checksums:
        assert (tmp_path / "raw" / name).read_bytes() == (tmp_path / "source" / name).read_bytes()
    assert fetch(tmp_path / "raw", ["local"], None, checksums=checksums) == {n: "already present" for n in checksums}


def test_download_reads_gzipped_files_from_the_environment_directory(tmp_path, monkeypatch):
    checksums = write_synthetic_mnist(tmp_path / "plain")
    (tmp_path / "gz").mkdir()
    for name in checksums:
        with open(tmp_path / "plain" / name, "rb") as src, gzip.open(tmp_path / "gz" / f"{name}.gz", "wb") as out:
            shutil.copyfileobj(src, out)
    monkeypatch.setenv("MNIST_SOURCE_DIR", str(tmp_path / "gz"))
    assert set(fetch(tmp_path / "raw", ["local"], None, checksums=checksums).values()) == {"local"}


def test_download_never_keeps_a_file_that_fails_its_checksum(tmp_path):
    checksums = write_synthetic_mnist(tmp_path / "source")
    wrong = dict(checksums, **{"t10k-labels-idx1-ubyte": "0" * 64})
    with pytest.raises(DownloadError, match="t10k-labels-idx1-ubyte.*does not match the expected 0000"):
        fetch(tmp_path / "raw", ["local"], str(tmp_path / "source"), checksums=wrong)
    assert not (tmp_path / "raw" / "t10k-labels-idx1-ubyte").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".download")] == []


def test_download_with_no_working_source_lists_everything_tried(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_SOURCE_DIR", raising=False)
    monkeypatch.setattr("lora_mnist.download.from_torchvision", lambda name, target: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DownloadError) as error:
        fetch(tmp_path / "raw", ["local", "torchvision"], None)
    message = str(error.value)
    assert "\n" not in message
    assert "local: no directory given" in message and "torchvision: offline" in message
    assert list((tmp_path / "raw").iterdir()) == []


# Runs fetch with a local source that stalls after its second file, so the test can kill it midway.
STALLING_FETCH = """
import json, sys, time
from pathlib import Path
import lora_mnist.download as download

copy = download.from_local
def stalling_copy(source_dir, name, target):
    copy(source_dir, name, target)
    if name == "train-labels-idx1-ubyte":
        time.sleep(120)
download.from_local = stalling_copy
download.fetch(Path(sys.argv[1]), ["local"], sys.argv[2], checksums=json.loads(sys.argv[3]))
"""


def test_a_download_killed_midway_leaves_nothing_in_raw(tmp_path):
    checksums = write_synthetic_mnist(tmp_path / "source")
    process = subprocess.Popen(
        [sys.executable, "-c", STALLING_FETCH, str(tmp_path / "raw"), str(tmp_path / "source"), json.dumps(checksums)],
        cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]},
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".download.*/train-labels-idx1-ubyte")):
        assert time.monotonic() < deadline and process.poll() is None, "the download never reached its second file"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list((tmp_path / "raw").iterdir()) == []


def test_a_download_that_fails_for_one_file_adds_no_file(tmp_path):
    checksums = write_synthetic_mnist(tmp_path / "source")
    (tmp_path / "source" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DownloadError, match="could not obtain t10k-images-idx3-ubyte"):
        fetch(tmp_path / "raw", ["local"], str(tmp_path / "source"), checksums=checksums)
    assert list((tmp_path / "raw").iterdir()) == []

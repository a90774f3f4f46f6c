"""Property-based tests: whatever bytes the IDX reader or the adapter loader get, they either work or
raise their own clear error, and a refused adapter leaves the model untouched."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora import AdapterLoadError, LoRAConfig, inject, load_adapter, lora_layers, save_adapter
from lora_mnist.data import read_idx
from lora_mnist.errors import DataError
from tests.helpers import TARGETS, TinyMLP
from lora.save_load import CONFIG_NAME, WEIGHTS_NAME

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def idx_like_bytes() -> st.SearchStrategy[bytes]:
    """Mostly well-formed headers with wrong sizes or types, plus arbitrary bytes."""
    dims = st.lists(st.integers(0, 6), min_size=0, max_size=5)
    header = st.builds(
        lambda dtype, shape: bytes([0, 0, dtype, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape),
        st.sampled_from([0x08, 0x08, 0x09, 0x0D]),
        dims,
    )
    return st.one_of(st.binary(max_size=64), st.builds(lambda h, body: h + body, header, st.binary(max_size=300)))


@FUZZ
@given(content=idx_like_bytes())
def test_idx_reader_returns_exactly_the_declared_data_or_raises_data_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("idx") / "fuzz-idx"
    path.write_bytes(content)
    try:
        array = read_idx(path)
    except DataError as error:
        assert str(path) in str(error)
        return
    ndim = content[3]
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    assert tuple(array.shape) == shape and array.dtype == torch.uint8
    assert array.numpy().tobytes() == content[4 + 4 * ndim :]


def _model() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP(hidden_1=12, hidden_2=8)


def _saved_adapter(directory: Path) -> None:
    model = _model()
    inject(model, LoRAConfig(r=2, target_modules=TARGETS))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["default"].weight.normal_()
    save_adapter(model, directory)


@FUZZ
@given(position=st.integers(0, 10_000), value=st.integers(0, 255), cut=st.booleans())
def test_adapter_loader_on_corrupted_tensor_files_loads_or_refuses_cleanly(tmp_path_factory, position, value, cut):
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    _saved_adapter(directory)
    weights = directory / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    if cut:
        data = data[: position % len(data)]
    else:
        data[position % len(data)] = value
    weights.write_bytes(bytes(data))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load_adapter(model, directory, allow_base_mismatch=True)
    except AdapterLoadError:
        assert not lora_layers(model)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


@FUZZ
@given(key=st.sampled_from(["r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "peft_type"]),
       value=json_values)
def test_adapter_loader_on_odd_config_values_loads_or_refuses_cleanly(tmp_path_factory, key, value):
    directory = tmp_path_factory.mktemp("adapter") / "adapter"
    _saved_adapter(directory)
    config = json.loads((directory / CONFIG_NAME).read_text())
    config[key] = value
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    model = _model()
    try:
        load_adapter(model, directory, allow_base_mismatch=True)
    except AdapterLoadError:
        assert not lora_layers(model)
    shutil.rmtree(directory)

"""Property: for any sequence of calibrate (possibly aborted), set_ratio, save and load on a
converted model, an operation that fails leaves the model exactly as it was."""

import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipkern
from lipkern.nn import config_from_state, config_to_tensor
from test_model_misuse import _assert_same_state, _state

OPERATIONS = st.one_of(
    st.tuples(
        st.just("calibrate"),
        st.integers(0, 3),  # batches before the iterator raises
        st.booleans(),  # whether it raises
        st.sampled_from(["tensor", "channel"]),
        st.sampled_from([None, "mean"]),
        st.sampled_from([2**-8, 2**-6, 1e-50]),
    ),
    st.tuples(st.just("set_ratio"), st.sampled_from([2**-7, 0.5, 1e-50, float("nan"), 1.5])),
    st.tuples(st.just("save")),
    st.tuples(st.just("load"), st.sampled_from(["as saved", "nan threshold", "float64"])),
    st.tuples(st.just("load_state_dict"), st.sampled_from(["as saved", "negative", "channel_dim"])),
)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lipkern.convert(model, inputs_of=("0",))


def _batches(count, fail):
    generator = torch.Generator().manual_seed(count)
    for _ in range(count):
        yield torch.randn(3, 4, generator=generator)
    if fail:
        raise OSError("the data source broke")


def _run(model, operation, files):
    kind = operation[0]
    if kind == "calibrate":
        _, count, fail, granularity, center, ratio = operation
        lipkern.calibrate(
            model, _batches(count, fail), c_r=ratio, granularity=granularity, center=center,
            progress=False,
        )
    elif kind == "set_ratio":
        lipkern.set_ratio(model, operation[1])
    elif kind == "save":
        lipkern.save_calibration(model, files / "saved.safetensors")
        torch.save(model.state_dict(), files / "state.pt")
    elif kind == "load":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        path = files / "saved.safetensors"
        if not path.exists():
            raise FileNotFoundError(path)
        if operation[1] != "as saved":
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
            tensors = load_file(str(path))
            key = max((k for k in tensors if k.endswith("/threshold")), default=None)
            if key is None:
                raise LookupError("nothing to corrupt")
            value = tensors[key]
            tensors[key] = value.double() if operation[1] == "float64" else value * float("nan")
            path = files / "corrupt.safetensors"
            save_file(tensors, str(path), metadata=metadata)
        lipkern.load_calibration(model, path)
    elif kind == "load_state_dict":
        state_path = files / "state.pt"
        if not state_path.exists():
            raise FileNotFoundError(state_path)
        state = torch.load(state_path, weights_only=True)
        if operation[1] == "negative":
            state = {k: (-1 - v.abs()) if k.endswith("threshold") else v for k, v in state.items()}
        elif operation[1] == "channel_dim":
            key = "3._extra_state"
            state[key] = config_to_tensor(dict(config_from_state(state[key]), channel_dim=1))
        model.load_state_dict(state)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.lists(OPERATIONS, min_size=1, max_size=6))
def test_a_failed_operation_leaves_the_model_as_it_was(operations):
    model = _model()
    with tempfile.TemporaryDirectory() as directory:
        files = Path(directory)
        for operation in operations:
            before = _state(model)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _run(model, operation, files)
            except (OSError, ValueError, RuntimeError, LookupError):
                _assert_same_state(model, before)
        x = torch.randn(2, 4, requires_grad=True)
        calibrated = all(m.ready for _, m in lipkern.nn.remap_modules(model))
        if calibrated:  # whatever happened, a calibrated model still runs forward and backward
            model(x).sum().backward()

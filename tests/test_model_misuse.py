"""The model layer under misuse: all-or-nothing state changes, inference mode, train/eval flags,
threads, in-place conversion and bad ratios."""

import sys
import threading
import warnings

import pytest
import torch
from torch import nn

import lipkern
from lipkern.calibrate import ChannelAxisError
from lipkern.nn import RemapAct


def _model(channel_dim=-1):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    return lipkern.convert(model, inputs_of=("2",), channel_dim=channel_dim)


def _data(batches=3):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(5, 6, generator=generator) for _ in range(batches)]


def _calibrated(**kwargs):
    model = _model()
    lipkern.calibrate(model, _data(), progress=False, **kwargs)
    return model


def _state(model):
    """Everything a failed operation must leave as it was: tensors bit for bit, settings, flags."""
    tensors = {
        key: value.clone() if isinstance(value, torch.Tensor) else value
        for key, value in model.state_dict().items()
    }
    modules = [(m.training, getattr(m, "_mode", None)) for m in model.modules()]
    return tensors, modules


def _assert_same_state(model, state):
    tensors, modules = state
    now, now_modules = _state(model)
    assert now.keys() == tensors.keys()
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            assert now[key].dtype == value.dtype and now[key].shape == value.shape, key
            bits, want = now[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
            assert torch.equal(bits, want), key
        else:
            assert now[key] == value, key
    assert now_modules == modules


def _failing(batches, exception):
    def data():
        yield from batches
        raise exception

    return data()


@pytest.mark.parametrize("exception", [OSError("disk"), KeyboardInterrupt()])
@pytest.mark.parametrize("calibrated", [False, True])
def test_aborted_calibration_leaves_the_model_as_it_was(exception, calibrated):
    model = _calibrated() if calibrated else _model()
    before = _state(model)
    with pytest.raises(type(exception)):
        lipkern.calibrate(model, _failing(_data(2), exception), granularity="channel", progress=False)
    _assert_same_state(model, before)
    if not calibrated:
        with pytest.raises(RuntimeError, match="no stored statistics"):
            lipkern.set_ratio(model, 2**-6)


def test_calibrating_on_empty_data_keeps_the_previous_calibration():
    model = _calibrated()
    before = _state(model)
    with pytest.raises(ValueError, match="data is empty"):
        lipkern.calibrate(model, [], progress=False)
    _assert_same_state(model, before)


def test_scan_arguments_are_refused_before_the_model_changes():
    model = _calibrated()
    before = _state(model)
    for data, kwargs, error, message in [
        (None, {}, TypeError, "data must be an iterable of batches, got NoneType"),
        (torch.randn(5, 6), {}, TypeError, r"got one tensor, .*pass \[x\] for one batch \(list\(x\) for a stack"),
        ([torch.randn(0, 6)], {}, ValueError, r"data batch 0 holds no elements \(shape \(0, 6\)\)"),
        (_data(), {"progress": "no"}, TypeError, "progress must be True or False, got 'no'"),
        (_data(), {"measure": 1}, TypeError, "measure must be True or False, got 1"),
    ]:
        with pytest.raises(error, match=message):
            lipkern.calibrate(model, data, **kwargs)
        _assert_same_state(model, before)
    with pytest.raises(TypeError, match="data must be an iterable of batches, got one tensor"):
        lipkern.measure_remapped(model, torch.randn(5, 6))
    with pytest.raises(ValueError, match="data is empty: a scan needs at least one batch"):
        lipkern.measure_remapped(model, [])
    _assert_same_state(model, before)
    with torch.device("meta"):
        meta = lipkern.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU()))
    with pytest.raises(ValueError, match="model's parameters are on the meta device"):
        lipkern.calibrate(meta, _data(), progress=False)


def test_a_scan_takes_a_map_style_dataset_of_batches():
    """A Dataset with __getitem__ and __len__ but no __iter__ iterates as Python iterates it."""
    batches = _data(3)

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return batches[index]

    from_dataset, from_list = _model(), _model()
    lipkern.calibrate(from_dataset, Batches(), progress=False)
    lipkern.calibrate(from_list, batches, progress=False)
    assert torch.equal(from_dataset[1].threshold, from_list[1].threshold)


def test_a_scan_takes_a_loader_without_a_length():
    """A DataLoader over an IterableDataset has __len__ but raises from it: the scan runs with the
    total unknown, and gives what a list of the same batches gives."""
    from torch.utils.data import DataLoader, IterableDataset

    batches = _data(4)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(batches)

    streamed, listed = _model(), _model()
    report = lipkern.calibrate(streamed, DataLoader(Stream(), batch_size=None), measure=True)
    lipkern.calibrate(listed, batches, progress=False)
    assert report.batches == 4
    for (_, a), (_, b) in zip(lipkern.nn.remap_modules(streamed), lipkern.nn.remap_modules(listed)):
        assert torch.equal(a.threshold, b.threshold)
    lipkern.calibrate(streamed, DataLoader(Stream(), batch_size=None), max_batches=2, progress=False)


def test_a_scan_that_reaches_no_converted_layer_is_an_error():
    """A forward that bypasses its submodules calibrates nothing: an error, not an empty report."""

    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(6, 6), nn.ReLU()

        def forward(self, x):
            return torch.relu(torch.nn.functional.linear(x, self.fc.weight, self.fc.bias))

    model = lipkern.convert(Bypass(), inputs_of=("fc",))
    before = _state(model)
    with pytest.raises(RuntimeError, match="none of the model's 2 converted layers was called"):
        lipkern.calibrate(model, _data(), progress=False)
    _assert_same_state(model, before)


def test_failed_measure_pass_undoes_the_whole_calibration():
    model = _calibrated()
    before = _state(model)
    data = _data(2)
    calls = []

    class OnceOnly:
        def __iter__(self):
            calls.append(1)
            if len(calls) > 1:
                raise OSError("the data can be read once")
            return iter(data)

    with pytest.raises(OSError):
        lipkern.calibrate(model, OnceOnly(), c_r=2**-5, measure=True, progress=False)
    _assert_same_state(model, before)


def test_calibration_under_inference_mode_leaves_a_trainable_model():
    model = _model()
    with torch.inference_mode():
        data = _data()
        lipkern.calibrate(model, data, progress=False)
        lipkern.set_ratio(model, 2**-6)
    for _, layer in lipkern.nn.remap_modules(model):
        assert not any(buffer.is_inference() for buffer in layer.buffers())
    x = torch.randn(4, 6, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None


def test_calibration_restores_each_module_train_flag():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    lipkern.convert(model)
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model
    lipkern.calibrate(model, _data(), progress=False)
    assert model.training and model[0].training and not model[1].training


def test_set_ratio_refuses_nan_and_underflow_and_changes_nothing():
    model = _calibrated()
    before = _state(model)
    layer = model[1]
    for bad in (float("nan"), float("inf"), 0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="ratio"):
            layer.set_ratio(bad)
        with pytest.raises(ValueError, match="c_r"):
            lipkern.set_ratio(model, bad)
    with pytest.raises(ValueError, match="underflows float32"):
        lipkern.set_ratio(model, 1e-50)
    with pytest.raises(ValueError, match="underflows float32"):
        lipkern.calibrate(model, _data(), c_r=1e-50, progress=False)
    _assert_same_state(model, before)


def test_load_calibration_checks_every_tensor_before_changing_anything(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    source = _calibrated(granularity="channel", center="mean", statistic="std")
    path = tmp_path / "good.safetensors"
    lipkern.save_calibration(source, path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    target = _calibrated()
    before = _state(target)
    layer = "3"  # the ReLU, a later layer than the GELU (1)

    def corrupt(key, value):
        bad = dict(tensors, **{key: value})
        if value is None:
            del bad[key]
        bad_path = tmp_path / f"bad{len(list(tmp_path.iterdir()))}.safetensors"  # one file per case
        save_file(bad, str(bad_path), metadata=metadata)
        return bad_path

    threshold = tensors[f"{layer}/threshold"]
    cases = {
        "NaN": corrupt(f"{layer}/threshold", torch.full_like(threshold, float("nan"))),
        "negative": corrupt(f"{layer}/threshold", -threshold),
        "wrong length": corrupt(f"{layer}/threshold", threshold[:-1].contiguous()),
        "float64": corrupt(f"{layer}/threshold", threshold.double()),
        "infinite centre": corrupt(f"{layer}/center", torch.full_like(threshold, float("inf"))),
        "stray tensor": corrupt(f"{layer}/bogus", threshold.clone()),
        # Statistics and mode 'apply' but no thresholds: every call would refuse to run.
        "no threshold": corrupt(f"{layer}/threshold", None),
    }
    for what, bad_path in cases.items():
        with pytest.raises(ValueError) as error:
            lipkern.load_calibration(target, bad_path)
        message = str(error.value)
        if what == "stray tensor":
            assert f"tensor '{layer}/bogus' belongs to no converted layer" in message
        else:  # the layer named once
            named = f"calibration file does not fit the model: first mismatching layer '{layer}': "
            assert message.startswith(named) and not message[len(named):].startswith(layer), message
        _assert_same_state(target, before)
    lipkern.load_calibration(target, path)
    assert torch.equal(target[3].threshold, source[3].threshold)


def test_load_calibration_with_a_bad_settings_entry_changes_nothing(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "good.safetensors"
    lipkern.save_calibration(_calibrated(c_r=2**-5), path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    layers = json.loads(metadata["layers"])
    layers[-1]["mode"] = "bogus"
    bad_path = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad_path), metadata={**metadata, "layers": json.dumps(layers)})
    target = _calibrated()
    before = _state(target)
    with pytest.raises(ValueError, match="mode"):
        lipkern.load_calibration(target, bad_path)
    _assert_same_state(target, before)


def test_save_calibration_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "calibration.safetensors"
    model = _calibrated()
    lipkern.save_calibration(model, path)
    good = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        lipkern.save_calibration(model, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_an_unsupported_dtype_names_the_layer():
    model = _calibrated().double()
    with pytest.raises(TypeError, match=r"^1 \(RemapAct\): lipkern: x must be float16, bfloat16 or float32"):
        model(torch.randn(2, 6, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"^1 \(RemapAct\): lipkern: x must be float16"):
        lipkern.calibrate(model, [torch.randn(2, 6, dtype=torch.float64)], progress=False)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("mode", ["apply", "calibrate"])
def test_an_input_without_strides_names_the_layer_and_the_layout(mode, granularity):
    layer = _calibrated()[3]
    if mode == "calibrate":
        layer.begin_calibration(granularity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch warns that nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])
    for x, got in ((torch.randn(5, 8).to_sparse(), "layout torch.sparse_coo"),
                   (torch.randn(5, 8).to_mkldnn(), "layout torch._mkldnn"),
                   (nested, "a nested tensor")):
        with pytest.raises(TypeError, match=rf"^3 \(RemapAct\): x must be a dense \(strided\) tensor, got {got}"):
            layer(x)


def test_model_layer_functions_name_a_model_that_is_not_one():
    for function in (lipkern.describe, lambda m: lipkern.straight_through(m).__enter__()):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
            function("model.pt")


def test_calibration_files_errors_name_the_path_given(tmp_path):
    with pytest.raises(ValueError, match="no converted layer holds a calibration to save"):
        lipkern.save_calibration(_model(), tmp_path / "empty.safetensors")
    assert not any(tmp_path.iterdir())
    model = _calibrated()
    missing = tmp_path / "no" / "such" / "calibration.safetensors"
    with pytest.raises(FileNotFoundError, match=f"cannot write {missing}: directory"):
        lipkern.save_calibration(model, missing)
    with pytest.raises(IsADirectoryError, match="it is a directory; give a file path"):
        lipkern.save_calibration(model, tmp_path)
    with pytest.raises(IsADirectoryError, match="is a directory, not a lipkern calibration file"):
        lipkern.load_calibration(model, tmp_path)
    not_safetensors = tmp_path / "notes.bin"
    not_safetensors.write_bytes(b"not a safetensors header" * 8)
    before = _state(model)
    with pytest.raises(ValueError, match=f"{not_safetensors} is not a lipkern calibration file"):
        lipkern.load_calibration(model, not_safetensors)
    _assert_same_state(model, before)


def test_load_state_dict_of_another_conversion_changes_nothing():
    source = _calibrated()
    target = _model(channel_dim=1)
    before = _state(target)
    with pytest.raises(ValueError, match="channel_dim"):
        target.load_state_dict(source.state_dict())
    _assert_same_state(target, before)
    # Remap layers the target lacks: refused before any weight is replaced.
    fewer = lipkern.convert(
        nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    )
    before = _state(fewer)
    for strict in (True, False):
        with pytest.raises(ValueError, match="holds remap layers this model lacks: '2.input_remap'"):
            fewer.load_state_dict(source.state_dict(), strict=strict)
        _assert_same_state(fewer, before)
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    with pytest.raises(ValueError, match="start with 'module.', as a wrapper's .* strip that prefix"):
        fewer.load_state_dict(wrapped, strict=False)
    # Unconverted, the model loads the state as one never converted: unexpected keys, no error.
    lipkern.unconvert(fewer)
    assert fewer.load_state_dict(source.state_dict(), strict=False).unexpected_keys
    # A channel count the layer reads is checked against the state's statistics too.
    narrow = lipkern.convert(nn.Sequential(nn.Linear(6, 4), nn.ReLU()), inputs_of=("0",))
    lipkern.calibrate(narrow, _data(), granularity="channel", progress=False)
    wide = lipkern.convert(nn.Sequential(nn.Linear(8, 4), nn.ReLU()), inputs_of=("0",))
    before = _state(wide)
    state = {k: v for k, v in narrow.state_dict().items() if "input_remap" in k}
    with pytest.raises(ValueError, match="statistics are of 6 channels, this layer reads 8"):
        wide.load_state_dict(state, strict=False)
    _assert_same_state(wide, before)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("3.threshold", torch.tensor(float("nan")), "threshold must be >= 0"),
        ("3.threshold", torch.tensor(-1.0), "threshold must be >= 0"),
        ("3.threshold", torch.ones(5), "threshold must have shape"),
        ("3.amax", torch.ones(2), "statistics"),
    ],
)
def test_load_state_dict_with_bad_values_changes_nothing(key, value, message):
    state = _calibrated().state_dict()
    state[key] = value
    target = _model()
    before = _state(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    _assert_same_state(target, before)


def test_converted_inplace_relu_raises_where_the_original_raises():
    # x feeds a trainable layer (which saves it for its weight's gradient) and an in-place ReLU.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.fc(x) + self.act(x)

    for convert in (False, True):
        block = Block()
        if convert:
            lipkern.convert(block)
            assert block.act.inplace
            lipkern.calibrate(block, _data(), progress=False)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            block(torch.randn(4, 6)).sum().backward()


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every microsecond, so that unguarded read-modify-writes interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_calibrate_mode_called_from_threads_keeps_every_call(frequent_thread_switches):
    layer = RemapAct("relu", channel_dim=-1)
    layer.begin_calibration(granularity="channel")
    calls, rows = 400, 7
    inputs = [torch.randn(rows, 8) for _ in range(calls)]
    barrier = threading.Barrier(4)
    errors = []

    def work(chunk):
        barrier.wait()
        try:
            for x in chunk:
                layer(x)
        except Exception as error:  # noqa: BLE001  (reported by the assertion below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(inputs[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert layer.count.tolist() == [calls * rows] * 8
    want = torch.stack(inputs).relu().amax(dim=(0, 1))
    assert torch.equal(layer.amax, want)


def test_concurrent_calibration_of_one_model_is_refused(tmp_path):
    model = _model()
    started, release = threading.Event(), threading.Event()
    results = {}

    def slow_data():
        started.set()
        assert release.wait(30)
        yield from _data()

    def first():
        results["first"] = lipkern.calibrate(model, slow_data(), progress=False)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    try:
        with pytest.raises(RuntimeError, match="another thread"):
            lipkern.calibrate(model, _data(), progress=False)
        with pytest.raises(RuntimeError, match="another thread"):
            lipkern.set_ratio(model, 2**-6)
        # A file saved now would hold half a scan.
        with pytest.raises(RuntimeError, match="another thread"):
            lipkern.save_calibration(model, tmp_path / "mid-scan.safetensors")
        assert not (tmp_path / "mid-scan.safetensors").exists()
    finally:
        release.set()
        thread.join()
    assert results["first"].batches == 3
    lipkern.set_ratio(model, 2**-6)  # free again once the first one finished


def test_a_calibration_mid_scan_is_neither_saved_nor_loaded(tmp_path):
    """A layer in the middle of a scan (mode "calibrate") is not saved, and a file that holds
    one (written before this check) is not loaded: the model would gather statistics instead
    of remapping. A malformed mode is refused as such."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _calibrated()
    good = tmp_path / "good.safetensors"
    lipkern.save_calibration(model, good)
    model[1].begin_calibration()
    with pytest.raises(ValueError, match="layer '1' is in mode 'calibrate', the middle of a scan"):
        lipkern.save_calibration(model, tmp_path / "mid-scan.safetensors")
    assert not (tmp_path / "mid-scan.safetensors").exists()

    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    layers = json.loads(metadata["layers"])
    for mode, message in (("calibrate", "in mode 'calibrate'.*was saved mid-scan"),
                          (None, "mode must be one of"), (7, "mode must be one of")):
        layers[-1]["mode"] = mode
        mid_scan = tmp_path / f"{mode}.safetensors"
        save_file(tensors, str(mid_scan), metadata={**metadata, "layers": json.dumps(layers)})
        fresh = _calibrated()
        before = _state(fresh)
        with pytest.raises(ValueError, match=message):
            lipkern.load_calibration(fresh, mid_scan)
        _assert_same_state(fresh, before)
    lipkern.load_calibration(_model(), good)


def test_a_state_dict_taken_mid_scan_is_not_loaded():
    """load_state_dict refuses a layer in mode "calibrate" as load_calibration does."""
    source = _calibrated()
    source[1].begin_calibration()
    state = source.state_dict()
    target = _calibrated()
    before = _state(target)
    with pytest.raises(ValueError, match="load_state_dict: layer '1' is in mode 'calibrate'.*taken mid-scan"):
        target.load_state_dict(state)
    _assert_same_state(target, before)


def test_concurrent_calibration_of_different_models_is_independent(frequent_thread_switches):
    # Each scan tracks its own converted activations' outputs (input remaps after an activation
    # are redundant); the other thread's scan must neither hide nor fake them.
    models = [_model() for _ in range(2)]
    reports = [None, None]
    barrier = threading.Barrier(2)

    def work(i):
        barrier.wait()
        reports[i] = lipkern.calibrate(models[i], _data(6), progress=False)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for model in models:
        assert model[2].input_remap.redundant and model[2].input_remap.fed_by == "1"


class _ActivationRegisteredFirst(nn.Module):
    """A hand-written CNN whose ReLU is registered before the convolution it follows: convert's
    registration-order rule gives it axis -1 (nothing before it tells)."""

    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))


class _ActivationAfterTheHead(nn.Module):
    """Its ReLU is registered after a Linear (axis -1) but applied to a convolution's output
    whose width equals its channel count, so no shape error would ever show it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 2)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("make, layer, maker", [
    (_ActivationRegisteredFirst, "act", "Conv2d 'conv'"),
    (_ActivationAfterTheHead, "relu", "Conv2d 'conv'"),
])
def test_per_channel_calibration_stops_where_the_inferred_axis_is_not_the_inputs(make, layer,
                                                                                  maker):
    """Per channel, a layer whose inferred axis is not the one its input's maker (a convolution
    here) puts the channels on stops the scan, naming both, and leaves the model as it was;
    per tensor the axis does not matter; with the axis set, per channel calibrates."""
    torch.manual_seed(0)
    model = lipkern.convert(make())
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    assert model.get_submodule(layer).channel_dim == -1
    state = _state(model)
    with pytest.raises(ChannelAxisError,
                       match=f"layer '{layer}' reads its channels on axis -1, .* comes from "
                             f"{maker}, whose channels are on axis 1"):
        lipkern.calibrate(model, data, granularity="channel", progress=False)
    _assert_same_state(model, state)
    lipkern.calibrate(model, data, granularity="tensor", progress=False)
    model.get_submodule(layer).channel_dim = 1
    lipkern.calibrate(model, data, granularity="channel", progress=False)
    channels = model.conv.out_channels
    assert model.get_submodule(layer).threshold.shape == (channels,)


def test_per_channel_calibration_on_unbatched_images_is_refused():
    """An unbatched [C, H, W] image through a convolution has its channels on axis 0, where the
    layer (axis 1, for batches) would take H for its channels: refused, per tensor it runs."""
    model = lipkern.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    state = _state(model)
    with pytest.raises(ChannelAxisError, match=r"input of shape \(8, 10, 10\) comes from Conv2d '0' "
                                               r"called on an unbatched input.*calibrate on batches"):
        lipkern.calibrate(model, [torch.randn(3, 12, 12)], granularity="channel", progress=False)
    _assert_same_state(model, state)
    lipkern.calibrate(model, [torch.randn(2, 3, 12, 12)], granularity="channel", progress=False)
    assert model[1].threshold.shape == (8,)


def test_a_layer_norm_over_several_axes_fixes_no_channel_axis():
    """LayerNorm([C, H, W]) normalises no one axis: an activation after it may read channels on
    axis 1 (set by hand) without the per-channel scan objecting."""
    torch.manual_seed(0)
    model = lipkern.convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 8, 8]), nn.ReLU()))
    model[2].channel_dim = 1
    lipkern.calibrate(model, [torch.randn(2, 3, 8, 8)], granularity="channel", progress=False)
    assert model[2].threshold.shape == (4,)


@pytest.mark.parametrize("flag", ["inplace", "straight_through"])
def test_layer_flags_must_be_bools(flag):
    """bool("no") would be True."""
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match=f"{flag} must be a bool, got"):
            RemapAct("relu", **{flag: bad})
    assert getattr(RemapAct("relu", **{flag: True}), flag) is True


def test_a_channel_dim_the_input_lacks_names_the_layer():
    model = lipkern.convert(nn.Sequential(nn.Linear(6, 8), nn.GELU()), channel_dim=5)
    with pytest.raises(ValueError, match=r"^1 \(RemapAct\): channel_dim=5 is out of range"):
        lipkern.calibrate(model, [torch.randn(2, 6)], progress=False)
    model[1].channel_dim = -1
    lipkern.calibrate(model, [torch.randn(2, 6)], progress=False)
    model[1].channel_dim = 5
    with pytest.raises(ValueError, match=r"^1 \(RemapAct\): channel_dim=5 is out of range"):
        model(torch.randn(2, 6))

"""pytest-benchmark suite at model level (CPU): what converting and calibrating costs.

Run with ``pytest benchmarks/bench_models.py --benchmark-only`` (not part of ``pytest tests``).
Random weights, eval mode, no_grad. Groups, one table row each:

- ``infer-<model>-<dtype>``: ``original`` vs ``converted`` (converted and calibrated, thresholds
  applied) inference at batch ``LIPKERN_BENCH_MODEL_BATCH`` (default 8). The target is an overhead
  of at most 3 %.
- ``calib-<model>``: ``plain`` (a no-grad pass of the original model over the calibration batches)
  vs ``scan`` (``lipkern.calibrate`` over the same batches: the fused statistics op in every
  converted layer). The target is at most 1.1x.
- ``compiled-<model>-<dtype>``: the same under ``torch.compile`` (inductor): ``original``,
  ``converted`` (the default ``compile_form="decomposed"``, fused by inductor) and ``opaque``
  (``compile_form="opaque"``, the lipkern op as an extern call). The target is at most 3 % for
  ``converted``. Only with ``LIPKERN_BENCH_COMPILED=1`` (compiling three variants of a model
  takes minutes).
- ``layer-call-8x192``: one converted GELU layer's call in apply and in calibrate mode against
  ``nn.GELU``, on a tiny input: the per-layer Python a model pays.

Models: torchvision ResNet-18 (ReLU), timm ViT-tiny and Swin-tiny (GELU, with input remaps on
every MLP FC1; FC2 reads the GELU output, so no second remap). Environment:
``LIPKERN_BENCH_MODELS`` (comma-separated of resnet18, vit_tiny, swin_tiny),
``LIPKERN_BENCH_MODEL_DTYPES`` (default ``fp32,bf16``), ``LIPKERN_BENCH_MODEL_SIZE`` (image side,
default 224), ``LIPKERN_BENCH_MODEL_BATCH``, ``LIPKERN_BENCH_CALIB_BATCHES`` (default 4),
``LIPKERN_BENCH_ROUNDS`` (default 5 under pytest, 15 for the script) and
``LIPKERN_BENCH_BACKEND`` (default ``auto``).

Run as a script (``python benchmarks/bench_models.py``) it prints the same comparisons as one
markdown table, timing the two variants of each row alternately, round after round: each one's
minimum, and the median of the per-round ratios (on a shared machine, load then hits both
alike).
"""

import copy
import functools
import os
import statistics
import time

import pytest
import torch

from lipkern.tools.bench import steady_allocator
from lipkern.calibrate import calibrate
from lipkern.convert import convert
from lipkern.models import build

C_R = 2**-7
MODELS = {
    "resnet18": ("torchvision:resnet18", ()),
    "vit_tiny": ("timm:vit_tiny_patch16_224", ("*.mlp.fc1", "*.mlp.fc2")),
    "swin_tiny": ("timm:swin_tiny_patch4_window7_224", ("*.mlp.fc1", "*.mlp.fc2")),
}
SELECTED = os.environ.get("LIPKERN_BENCH_MODELS", ",".join(MODELS)).split(",")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SELECTED_DTYPES = os.environ.get("LIPKERN_BENCH_MODEL_DTYPES", "fp32,bf16").split(",")
SIZE = int(os.environ.get("LIPKERN_BENCH_MODEL_SIZE", "224"))
BATCH = int(os.environ.get("LIPKERN_BENCH_MODEL_BATCH", "8"))
CALIB_BATCHES = int(os.environ.get("LIPKERN_BENCH_CALIB_BATCHES", "4"))
ROUNDS = int(os.environ.get("LIPKERN_BENCH_ROUNDS", "5"))
SCRIPT_ROUNDS = int(os.environ.get("LIPKERN_BENCH_ROUNDS", "15"))
BACKEND = os.environ.get("LIPKERN_BENCH_BACKEND", "auto")
COMPILED = os.environ.get("LIPKERN_BENCH_COMPILED", "0") == "1"


def _original(model: str) -> torch.nn.Module:
    spec, _ = MODELS[model]
    kwargs = {} if spec.startswith("torchvision") else {"img_size": SIZE}
    torch.manual_seed(0)
    return build(spec, **kwargs)


def _batches(n: int, dtype=torch.float32) -> list:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(BATCH, 3, SIZE, SIZE, generator=generator).to(dtype) for _ in range(n)]


def _converted_calibrated(original, model: str, compile_form: str = "decomposed"):
    converted = convert(
        copy.deepcopy(original),
        inputs_of=MODELS[model][1],
        backend=BACKEND,
        compile_form=compile_form,
    )
    calibrate(converted, _batches(2), c_r=C_R, progress=False)
    return converted


@functools.lru_cache(maxsize=1)
def _pair(model: str, dtype_name: str):
    """(original, converted + calibrated) in ``dtype``; calibrated in fp32 on separate batches."""
    original = _original(model)
    converted = _converted_calibrated(original, model)
    dtype = DTYPES[dtype_name]
    return original.to(dtype), converted.to(dtype)


@functools.lru_cache(maxsize=1)
def _compiled_variants(model: str, dtype_name: str) -> dict:
    """``torch.compile`` of the original, the converted (decomposed) and the opaque variant."""
    original = _original(model)
    dtype = DTYPES[dtype_name]
    nets = {
        "original": original,
        "converted": _converted_calibrated(original, model),
        "opaque": _converted_calibrated(original, model, compile_form="opaque"),
    }
    x = _batches(1, dtype)[0]
    compiled = {}
    with torch.no_grad():
        for name, net in nets.items():
            compiled[name] = torch.compile(net.to(dtype))
            compiled[name](x)  # compiles now, outside any timing
    return compiled


def _run(benchmark, fn):
    with torch.no_grad():
        benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


INFER = [
    pytest.param(m, d, v, id=f"{m}-{d}-{v}")
    for m in SELECTED
    for d in SELECTED_DTYPES
    for v in ("original", "converted")
]


@pytest.mark.parametrize("model, dtype, variant", INFER)
def test_inference(benchmark, model, dtype, variant):
    benchmark.group = f"infer-{model}-{dtype}-batch{BATCH}"
    original, converted = _pair(model, dtype)
    net = original if variant == "original" else converted
    x = _batches(1, DTYPES[dtype])[0]
    _run(benchmark, lambda: net(x))


COMPILED_CASES = [
    pytest.param(m, d, v, id=f"{m}-{d}-{v}")
    for m in SELECTED
    for d in SELECTED_DTYPES
    for v in ("original", "converted", "opaque")
]


@pytest.mark.skipif(not COMPILED, reason="set LIPKERN_BENCH_COMPILED=1 (compiles take minutes)")
@pytest.mark.parametrize("model, dtype, variant", COMPILED_CASES)
def test_compiled_inference(benchmark, model, dtype, variant):
    benchmark.group = f"compiled-{model}-{dtype}-batch{BATCH}"
    net = _compiled_variants(model, dtype)[variant]
    x = _batches(1, DTYPES[dtype])[0]
    _run(benchmark, lambda: net(x))


CALIB = [pytest.param(m, v, id=f"{m}-{v}") for m in SELECTED for v in ("plain", "scan")]


@functools.lru_cache(maxsize=1)
def _calibration_pair(model: str):
    original = _original(model)
    converted = convert(copy.deepcopy(original), inputs_of=MODELS[model][1], backend=BACKEND)
    return original, converted


@pytest.mark.parametrize("model, variant", CALIB)
def test_calibration_scan(benchmark, model, variant):
    benchmark.group = f"calib-{model}-{CALIB_BATCHES}x{BATCH}"
    original, converted = _calibration_pair(model)
    data = _batches(CALIB_BATCHES)
    if variant == "plain":

        def plain():
            for x in data:
                original(x)

        _run(benchmark, plain)
    else:
        _run(benchmark, lambda: calibrate(converted, data, c_r=C_R, progress=False))


@pytest.mark.parametrize("variant", ["nn.GELU", "apply", "calibrate"])
def test_layer_call(benchmark, variant):
    """One layer's call on a tiny input (8x192): what a model pays per converted layer besides
    the kernel. Inside a model this Python costs several times what it costs here
    (benchmarks/RESULTS.md has the measured figures), so it is worth watching."""
    benchmark.group = "layer-call-8x192"
    x = torch.randn(8, 192)
    layer = torch.nn.Sequential(torch.nn.GELU())
    if variant != "nn.GELU":
        convert(layer, backend=BACKEND)
        calibrate(layer, [x], c_r=C_R, progress=False)
        if variant == "calibrate":
            layer[0].begin_calibration()
    with torch.no_grad():
        benchmark(layer[0], x)


def _interleaved(a, b, rounds: int) -> tuple[float, float, float]:
    """``a()`` and ``b()`` run alternately (order swapped every round): the minimum seconds of
    each, and the median over rounds of b's time / a's time in that round. The paired median
    cancels the machine's slow drifts, which can move one variant's minimum by a few percent."""
    best = [float("inf"), float("inf")]
    ratios = []
    with torch.no_grad():
        a(), b()  # warm-up
        for r in range(rounds):
            seconds = [0.0, 0.0]
            for index in ((0, 1) if r % 2 == 0 else (1, 0)):
                fn = (a, b)[index]
                start = time.perf_counter()
                fn()
                seconds[index] = time.perf_counter() - start
                best[index] = min(best[index], seconds[index])
            ratios.append(seconds[1] / seconds[0])
    return best[0], best[1], statistics.median(ratios)


def main() -> None:
    steady_allocator()
    rows = [
        "| model | dtype | batch | original ms | converted ms | overhead (minima) "
        "| overhead (paired median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in SELECTED:
        for dtype in SELECTED_DTYPES:
            original, converted = _pair(model, dtype)
            x = _batches(1, DTYPES[dtype])[0]
            base, new, paired = _interleaved(
                lambda: original(x), lambda: converted(x), SCRIPT_ROUNDS
            )
            rows.append(
                f"| {model} | {dtype} | {BATCH} | {base * 1e3:.1f} | {new * 1e3:.1f} | "
                f"{(new / base - 1) * 100:+.1f} % | {(paired - 1) * 100:+.1f} % |"
            )
            print(rows[-1], flush=True)
        _pair.cache_clear()
    if COMPILED:
        rows += [
            "",
            "| model | dtype | compiled original ms | compiled converted ms (paired median) "
            "| compiled opaque ms (paired median) |",
            "|---|---|---|---|---|",
        ]
        for model in SELECTED:
            for dtype in SELECTED_DTYPES:
                nets = _compiled_variants(model, dtype)
                x = _batches(1, DTYPES[dtype])[0]
                base, fused, fused_paired = _interleaved(
                    lambda: nets["original"](x), lambda: nets["converted"](x), SCRIPT_ROUNDS
                )
                _, opaque, opaque_paired = _interleaved(
                    lambda: nets["original"](x), lambda: nets["opaque"](x), SCRIPT_ROUNDS
                )
                rows.append(
                    f"| {model} | {dtype} | {base * 1e3:.1f} | {fused * 1e3:.1f} "
                    f"({(fused_paired - 1) * 100:+.1f} %) | {opaque * 1e3:.1f} "
                    f"({(opaque_paired - 1) * 100:+.1f} %) |"
                )
                print(rows[-1], flush=True)
            _compiled_variants.cache_clear()
    rows += [
        "",
        "| model | batches | plain pass ms | calibration scan ms | ratio (minima) "
        "| ratio (paired median) |",
        "|---|---|---|---|---|---|",
    ]
    for model in SELECTED:
        original, converted = _calibration_pair(model)
        data = _batches(CALIB_BATCHES)

        def plain():
            for x in data:
                original(x)

        base, scan, paired = _interleaved(
            plain, lambda: calibrate(converted, data, c_r=C_R, progress=False), SCRIPT_ROUNDS
        )
        rows.append(
            f"| {model} | {CALIB_BATCHES}x{BATCH} | {base * 1e3:.1f} | {scan * 1e3:.1f} | "
            f"{scan / base:.3f}x | {paired:.3f}x |"
        )
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

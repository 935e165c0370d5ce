"""What keeping a converted nn.TransformerEncoder off PyTorch's fused inference path costs
(lipkern.convert does, so that its remaps run): ``python benchmarks/encoder_fused_path.py``.

Eval/no_grad nn.TransformerEncoder (6 layers, d=256, 4 heads, ff 1024, GELU, batch 8 x 128
tokens, 2 threads): the original (PyTorch's fused path) against the converted model (kept off it;
calibrated, remaps applied) and the original with the fused path switched off; rounds alternate,
ratio = median of per-round ratios."""
import copy
import statistics
import time

import torch
from torch import nn

import lipkern

torch.set_num_threads(2)
torch.manual_seed(0)
layer = nn.TransformerEncoderLayer(256, 4, 1024, activation=nn.GELU(), batch_first=True)
original = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False).eval()
x = torch.randn(8, 128, 256)
converted = lipkern.convert(copy.deepcopy(original), preset="paper")
lipkern.calibrate(converted, [torch.randn(8, 128, 256)], c_r=2**-7, progress=False)


def no_fused():
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        original(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


subjects = {"original (fused)": lambda: original(x), "original, fused path off": no_fused,
            "converted": lambda: converted(x)}
times = {k: [] for k in subjects}
with torch.no_grad():
    for f in subjects.values():
        f()
        f()
    for _ in range(30):
        for k, f in subjects.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
base = times["original (fused)"]
for k, ts in times.items():
    ratio = statistics.median(a / b for a, b in zip(ts, base))
    print(f"{k:28s} min {min(ts) * 1e3:7.2f} ms  ratio to fused {ratio:.3f}")

"""Datasets for the evaluation: the embedded scikit-learn digits and user-supplied ``.npz`` files."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The split is part of the published numbers: changing the seed or the sizes changes every table.
SPLIT_SEED = 0
TEST_FRACTION = 0.2
CALIB_SIZE = 512


@dataclass
class Split:
    """Tensors of one split: ``x`` float32 (N, C, H, W) in [0, 1], ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def head(self, n: int | None) -> "Split":
        if n is None or n >= len(self):
            return self
        return Split(self.x[:n], self.y[:n])

    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


@dataclass
class Dataset:
    name: str
    train: Split | None
    calib: Split | None
    test: Split
    num_classes: int
    calib_source: str = ""
    test_source: str = ""
    # The row of the source file each test sample is (None: not read from a file).
    test_rows: np.ndarray | None = None


def _stratified_indices(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Own stratified split (not sklearn's train_test_split) so that the indices only depend on numpy's
    # PCG64 stream, which is stable across library versions.
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train = np.concatenate(train)
    test = np.concatenate(test)
    # Interleave classes so that any prefix (quick mode uses prefixes) is roughly class-balanced.
    return rng.permutation(train), rng.permutation(test)


def load_digits(calib_size: int = CALIB_SIZE) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 17 grey levels 0..16) scaled to [0, 1].

    Fixed stratified split: 80 % train / 20 % test (seed ``SPLIT_SEED``); the calibration set is the
    first ``calib_size`` training images, so calibration never sees test data.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_indices(y, TEST_FRACTION, SPLIT_SEED)
    if not 0 < calib_size <= len(train_idx):
        raise ValueError(f"calib_size must be in [1, {len(train_idx)}], got {calib_size}")
    to_split = lambda idx: Split(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return Dataset(
        name="digits",
        train=to_split(train_idx),
        calib=to_split(train_idx[:calib_size]),
        test=to_split(test_idx),
        num_classes=10,
        calib_source=f"the first {calib_size} images of the digits training split",
        test_source=f"the digits test split, {len(test_idx)} of the {len(y)} images",
    )


def _read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{what} {path} is not an .npz file (the zip archive numpy.savez writes); save the arrays "
                         "with numpy.savez(path, x=..., y=...)")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load_npz(path: str | Path, *, num_classes: int | None = None, calib_fraction: float = 0.5,
             seed: int = SPLIT_SEED, all_test: bool = False) -> Dataset:
    """A user's data file: arrays ``x`` (N, C, H, W) float in [0, 1] and ``y`` (N,) integer labels.

    An optional array ``x_calib`` gives the calibration set (its labels ``y_calib`` may be left out: calibration does
    not use them); without it a fixed random ``calib_fraction`` of the file is used for calibration and the rest for
    testing (the two never overlap).
    ``all_test``: the calibration data comes from elsewhere, so all of ``x`` is test data (``calib`` is None).
    """
    path = Path(path)
    arrays = _read_npz(path, "--data")
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"--data {path}: missing array(s) {missing}; the file must contain 'x' (N, C, H, W) "
                         f"float in [0, 1] and 'y' (N,) integer labels (found: {sorted(arrays)})")
    x, y = _check_xy(arrays["x"], arrays["y"], f"--data {path}", num_classes)
    test_rows = np.arange(len(y))
    test_source = f"all of x in {path}"
    if all_test:
        calib, test, source = None, Split(x, y), ""
    elif "x_calib" in arrays or "y_calib" in arrays:
        if "x_calib" not in arrays:
            raise ValueError(f"--data {path}: 'y_calib' without 'x_calib'; the calibration images go in 'x_calib' "
                             "(N, C, H, W) float in [0, 1], their labels are optional")
        calib = _calibration_split(arrays["x_calib"], arrays.get("y_calib"), f"--data {path} (calibration)")
        if calib.x.shape[1:] != x.shape[1:]:
            raise ValueError(f"--data {path}: x_calib has shape {tuple(calib.x.shape)}, x has {tuple(x.shape)}")
        test = Split(x, y)
        source = f"the array{'s x_calib / y_calib' if 'y_calib' in arrays else ' x_calib'} of {path}"
    else:
        if len(y) < 2:
            raise ValueError(f"--data {path}: need at least 2 samples to split into calibration and test")
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
        n_calib = min(max(1, int(round(len(y) * calib_fraction))), len(y) - 1)
        calib = Split(x[perm[:n_calib]], y[perm[:n_calib]])
        test = Split(x[perm[n_calib:]], y[perm[n_calib:]])
        test_rows = perm[n_calib:].numpy()
        source = (f"a random {n_calib} of the {len(y)} samples of {path} (seed {seed}), the rest tests; no "
                  "training data was given (pass --calib-data with training images, as the paper calibrates)")
        test_source = (f"the {len(test)} of the {len(y)} samples of {path} that calibration left (seed {seed}); "
                       "with calibration data of its own (--calib-data) all of them test")
    # From y, the file's own labels: y_calib goes unused, and unchecked it must not count classes.
    n_cls = num_classes if num_classes is not None else int(y.max()) + 1
    return Dataset(name=path.stem, train=None, calib=calib, test=test, num_classes=n_cls, calib_source=source,
                   test_source=test_source, test_rows=test_rows)


def load_calibration_npz(path: str | Path) -> Split:
    """Calibration images: array ``x`` (N, C, H, W) float in [0, 1]; ``y`` is optional (calibration ignores it)."""
    path = Path(path)
    arrays = _read_npz(path, "--calib-data")
    if "x" not in arrays:
        raise ValueError(f"--calib-data {path}: missing array 'x' (N, C, H, W) float in [0, 1] "
                         f"(found: {sorted(arrays)})")
    return _calibration_split(arrays["x"], arrays.get("y"), f"--calib-data {path}")


def _calibration_split(x: np.ndarray, y: np.ndarray | None, what: str) -> Split:
    """Calibration images, checked as test data is; calibration does not use labels, so they may be left out
    (zeros stand in for them)."""
    labels = np.zeros(x.shape[:1], dtype=np.int64) if y is None else y
    return Split(*_check_xy(x, labels, what, None))


def _check_xy(x: np.ndarray, y: np.ndarray, what: str, num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim != 4:
        raise ValueError(f"{what}: 'x' must have shape (N, C, H, W), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what}: 'x' must be a float array in [0, 1], got dtype {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: 'y' must have shape ({x.shape[0]},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: 'y' must hold integer labels, got dtype {y.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no samples")
    non_finite = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if non_finite:
        raise ValueError(f"{what}: 'x' must be finite and in [0, 1]; it holds {non_finite} NaN or infinite "
                         f"value(s) of {np.size(x)}")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"{what}: 'x' must be in [0, 1] (min {x.min():.4g}, max {x.max():.4g})")
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        hi = "" if num_classes is None else f" and < {num_classes} (the model's number of classes)"
        raise ValueError(f"{what}: labels out of range: min {y.min()}, max {y.max()}; labels must be >= 0{hi}")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))

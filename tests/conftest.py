"""Test-wide set-up: the Triton interpreter on machines without a GPU, and backend lists."""

import os

import torch

# The Triton interpreter is chosen when triton is imported, so decide before anything imports it
# (torch._dynamo does): without a GPU, the Triton backend's numerics are tested on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lipkern  # noqa: E402


def kernel_backends(device="cpu"):
    """Backends under test on ``device``: every available one except the reference itself."""
    return [b for b in lipkern.available_backends(device) if b != "reference"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

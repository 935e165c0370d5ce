"""Loading of the compiled C++ extension ``lipkern._C`` (the CPU kernels).

The import is tried once, when lipkern is imported, so that the dispatcher's checks are plain
reads of module state (``torch.compile`` traces them without a graph break).
"""

from __future__ import annotations

import importlib

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or run `bash scripts/run.sh test`, which builds it into .venv)"
)


class ExtensionNotBuiltError(RuntimeError):
    """The C++ CPU kernels are not compiled, so backend 'cpu' cannot run."""


try:
    _MODULE = importlib.import_module("lipkern._C")
    _MISSING_REASON = None
except ImportError as _error:
    _MODULE = None
    _MISSING_REASON = (
        f"lipkern._C could not be imported ({_error}): it is not built, or was built for another "
        f"torch than this one; {BUILD_HINT}"
    )


def load():
    """The imported ``lipkern._C`` module, or a clear error saying how to build it."""
    if _MODULE is None:
        raise ExtensionNotBuiltError(_MISSING_REASON)
    return _MODULE


def missing_reason():
    """``None`` when the extension imported, else a sentence saying why and how to fix it."""
    return _MISSING_REASON

"""Loading of the compiled C++ extension ``lipkern._C`` (the CPU kernels)."""

from __future__ import annotations

import functools
import importlib

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or run `bash scripts/run.sh test`, which builds it into .venv)"
)


class ExtensionNotBuiltError(RuntimeError):
    """The C++ CPU kernels are not compiled, so backend 'cpu' cannot run."""


@functools.lru_cache(maxsize=None)
def _import():
    try:
        return importlib.import_module("lipkern._C"), None
    except ImportError as error:
        return None, error


def load():
    """Import ``lipkern._C`` (which registers the CPU kernels) or raise a clear error."""
    module, error = _import()
    if module is None:
        raise ExtensionNotBuiltError(
            f"lipkern's C++ extension lipkern._C could not be imported ({error}); {BUILD_HINT}"
        )
    return module


def missing_reason():
    """``None`` when the extension imports, else a sentence saying why and how to fix it."""
    module, error = _import()
    return None if module is not None else f"lipkern._C is not built ({error}); {BUILD_HINT}"

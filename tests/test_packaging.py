"""Installing lipkern with pip: the build's torch requirement, declared runtime dependencies, and
a CLI free of torch's CUDA_HOME warning on machines without a GPU."""

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=env,
    )


def test_build_without_torch_stops_naming_no_build_isolation():
    # What pip's isolated build environment looks like to setup.py: no torch.
    done = _run(
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
        "runpy.run_path('setup.py')"
    )
    assert done.returncode == 1
    assert "pip install --no-build-isolation ." in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert (REPO / "pyproject.toml").read_text().count("[build-system]") == 1


def _declared_requirements() -> set[str]:
    done = _run(
        "import json, runpy, setuptools\n"
        "setuptools.setup = lambda **kw: print(json.dumps(kw['install_requires']))\n"
        "runpy.run_path('setup.py')\n"
    )
    assert done.returncode == 0, done.stderr
    return {_normalise(re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0]) for r in json.loads(done.stdout)}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_runtime_dependencies_are_declared():
    """Every third-party package that `import lipkern` or `import lipkern.eval` loads at module
    level is in install_requires. The Triton backend is left out: it is imported only where a
    CUDA build of torch brings triton; the model zoos (lipkern.models) are the 'models' extra."""
    sources = [
        p for p in (REPO / "lipkern").rglob("*.py")
        if "models" not in p.relative_to(REPO / "lipkern").parts
        and not p.name.startswith("triton_")
    ]
    imported = set().union(*(_module_level_imports(p) for p in sources))
    third_party = imported - set(sys.stdlib_module_names) - {"lipkern"}
    distributions = importlib.metadata.packages_distributions()
    needed = {_normalise(distributions[name][0]) for name in third_party}
    missing = needed - _declared_requirements()
    assert not missing, f"imported by lipkern but not in install_requires: {sorted(missing)}"


def test_cli_prints_no_cuda_home_warning_without_a_gpu(tmp_path):
    # A CUDA toolkit at CUDA_HOME and no usable GPU: torch.utils.cpp_extension warns on import.
    env = {**os.environ, "CUDA_HOME": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    plain = _run("import torch.utils.cpp_extension", env=env)
    assert "CUDA_HOME" in plain.stderr  # the warning this test is about
    quiet = _run(
        "from lipkern.cli import _quiet_cuda_home_warning\n"
        "_quiet_cuda_home_warning()\n"
        "import torch.utils.cpp_extension\n",
        env=env,
    )
    assert quiet.returncode == 0 and "CUDA_HOME" not in quiet.stderr, quiet.stderr

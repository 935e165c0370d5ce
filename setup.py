"""Build and package lipkern; the C++ CPU kernels become the extension module ``lipkern._C``.

The kernel translation unit ``csrc/remap_act_kernels.cpp`` is compiled once per CPU capability,
like ATen's ``*.cpp.AVX512.cpp`` files: each ``csrc/capability/*.<CAP>.cpp`` wrapper includes it
and is compiled with that capability's instruction-set flags and ``CPU_CAPABILITY`` macros, which
put the code into its own namespace and select the matching ``at::vec::Vectorized``
specialisation (without them ``Vectorized`` is a plain array loop, many times slower).
``csrc/dispatch.cpp`` picks one of them at run time.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as error:
    # pip's default build runs in an isolated environment without the user's torch; compiling
    # against another torch (or none) would give an extension that cannot load.
    raise SystemExit(
        f"lipkern: torch is not importable while building ({error}). lipkern compiles its C++ "
        "kernels against the torch it will run with: install torch first, then install lipkern "
        "with `pip install --no-build-isolation .` (pip's default isolated build cannot see "
        "your torch)."
    ) from error

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")

# The same instruction-set flags ATen builds its AVX2 / AVX512 kernels with (cmake/Codegen.cmake).
CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mlzcnt", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    # AVX512 plus the bf16 conversion instructions (Cooper Lake, Sapphire Rapids, Zen 4).
    "AVX512_BF16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx512bf16"],
}
# The at::vec::Vectorized specialisation each capability builds on (ATen has no AVX512_BF16).
CAPABILITY_VEC = {"AVX512_BF16": "AVX512"}
# GCC 12's own AVX-512 intrinsic headers trip -Wuninitialized (GCC bug 105593).
CAPABILITY_WARNINGS = ["-Wno-uninitialized", "-Wno-maybe-uninitialized"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
CAPABILITIES = list(CAPABILITY_FLAGS) if X86 else ["DEFAULT"]

# torch >= 2.10 headers need C++20, which BuildExtension adds itself.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]
CXX_FLAGS += [f"-DLIPKERN_HAVE_{cap}" for cap in CAPABILITIES]


def capability_of(source: str) -> str | None:
    """``AVX512`` for ``csrc/capability/remap_act_kernels.AVX512.cpp``; None for common sources."""
    stem_suffix = Path(source).suffixes
    cap = stem_suffix[-2].lstrip(".") if len(stem_suffix) >= 2 else None
    return cap if cap in CAPABILITY_FLAGS else None


class CapabilityBuildExtension(BuildExtension):
    """BuildExtension with per-capability compiler flags for the capability wrapper sources.

    BuildExtension compiles all of an extension's sources with one flag set. Here the wrappers
    are compiled first, one ``compile`` call per capability with its flags appended (that works
    with the ninja and the plain compiler path alike), and linked in as extra objects.
    """

    def build_extension(self, ext):
        common = [s for s in ext.sources if capability_of(s) is None]
        per_cap = {}
        for source in ext.sources:
            cap = capability_of(source)
            if cap is not None:
                per_cap.setdefault(cap, []).append(source)
        base_args = list(ext.extra_compile_args)
        objects = []
        for cap, sources in per_cap.items():
            cap_args = base_args + CAPABILITY_FLAGS[cap] + CAPABILITY_WARNINGS + [
                f"-DCPU_CAPABILITY={cap}",
                f"-DCPU_CAPABILITY_{cap}",
            ]
            if cap in CAPABILITY_VEC:
                cap_args.append(f"-DCPU_CAPABILITY_{CAPABILITY_VEC[cap]}")
            objects += self.compiler.compile(
                sources,
                output_dir=os.path.join(self.build_temp, f"capability_{cap}"),
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=cap_args,
                depends=ext.depends,
            )
        ext.sources = common
        ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


# What `import lipkern` and `import lipkern.eval` (the CLI's evaluation) need; torch is the one
# the extension is built against. Model zoos and the test tools are extras.
INSTALL_REQUIRES = [
    "torch>=2.10",
    "numpy>=1.26",
    "tqdm>=4.60",
    "safetensors>=0.4",
    "matplotlib>=3.7",
    "scipy>=1.10",
    "scikit-learn>=1.3",
    "pyautoattack>=0.2",
    "torchattacks>=3.5",
]
EXTRAS_REQUIRE = {
    "models": ["torchvision", "timm>=1.0", "transformers>=5", "pyyaml"],
    "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "ninja"],
}

sources = [
    str(CSRC / "module.cpp"),
    str(CSRC / "ops.cpp"),
    str(CSRC / "dispatch.cpp"),
    str(CSRC / "autograd.cpp"),
] + [str(CSRC / "capability" / f"remap_act_kernels.{cap}.cpp") for cap in CAPABILITIES]

setup(
    name="lipkern",
    version="0.1.0",
    description="Fused activation + threshold-remap kernels (PyTorch extension)",
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    packages=find_packages(include=["lipkern", "lipkern.*"]),
    package_data={"lipkern": ["eval/weights/*.pt"]},
    ext_modules=[
        CppExtension(
            name="lipkern._C",
            sources=sources,
            include_dirs=[str(ROOT / CSRC)],
            depends=[str(p) for p in sorted((ROOT / CSRC).rglob("*.h"))]
            + [str(ROOT / CSRC / "remap_act_kernels.cpp")],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": CapabilityBuildExtension},
    entry_points={"console_scripts": ["lipkern = lipkern.cli:main"]},
)

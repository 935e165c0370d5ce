// The Python module lipkern._C. Importing it registers the CPU kernels of the lipkern::* ops
// (ops.cpp); the functions below report and switch the kernel build in use.

#include <torch/extension.h>

#include "remap_act.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lipkern CPU kernels (registered as lipkern::* torch ops on import)";
  m.def("cpu_capability", &lipkern::cpu_capability,
        "Kernel build in use: 'DEFAULT', 'AVX2' or 'AVX512'.");
  m.def("set_cpu_capability", &lipkern::set_cpu_capability, py::arg("name"),
        "Switch the kernel build (tests and benchmarks); raises ValueError if this CPU or build "
        "lacks it. The environment variable LIPKERN_CPU_CAPABILITY sets the initial choice.");
  m.def("cpu_16bit_method", &lipkern::cpu_16bit_method,
        "How the AVX-512 builds evaluate the 16-bit smooth activations: 'grid' (fp32 "
        "polynomials) or 'table' (a gather from their tables); both give the same bits.");
  m.def("set_cpu_16bit_method", &lipkern::set_cpu_16bit_method, py::arg("name"),
        "'grid', 'table' or 'auto' (the faster on this CPU, timed once per build; the default, "
        "or the environment variable LIPKERN_CPU_16BIT); returns the choice it replaces.");
  m.def(
      "parameter_set_counts",
      [] {
        const lipkern::ParameterSetCounts counts = lipkern::kernels().parameter_set_counts();
        return py::dict(py::arg("made") = counts.made, py::arg("reused") = counts.reused);
      },
      "What the backward's per-parameter-set caches of the kernel build in use did since they "
      "last forgot: {'made': per-channel searches made for a set, 'reused': calls that found "
      "their set's search kept}.");
  m.def(
      "forget_parameter_sets", [] { lipkern::kernels().forget_parameter_sets(); },
      "Empty the kernel build's per-parameter-set caches (their memory, up to 32 MiB per kind "
      "of data) and zero their counts; later calls search again.");
}

// growdense._C: what this build of the extension contains. Plain values only.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Build information of the growdense extension";
  m.attr("version") = GROWDENSE_VERSION;
  m.attr("torch_version") = GROWDENSE_TORCH_VERSION;
  m.attr("with_cuda") = static_cast<bool>(GROWDENSE_WITH_CUDA_BOOL);
  m.attr("cuda_version") = GROWDENSE_CUDA_VERSION;
  m.attr("cuda_archs") = GROWDENSE_CUDA_ARCHS;
  // The CPU capabilities the kernels were compiled for (space separated).
  m.attr("cpu_capabilities") = GROWDENSE_CPU_CAPABILITIES;
#if defined(__clang__)
  m.attr("compiler") = "clang " __clang_version__;
#elif defined(__GNUC__)
  m.attr("compiler") = "gcc " __VERSION__;
#else
  m.attr("compiler") = "unknown";
#endif
}

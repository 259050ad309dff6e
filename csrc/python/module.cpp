// The Python extension module wildcat._C. Importing it loads the library, which registers the
// ops with the dispatcher (csrc/library.cpp); ops are then reached as torch.ops.wildcat.*.
// pybind11 carries only helpers that are not ops.
#include <torch/extension.h>

#include "wildcat/wildcat.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "wildcat: WildCat attention ops (registered as torch.ops.wildcat.*)";
  m.def("cuda_built", &wildcat::cuda_built, "Whether this build has the CUDA kernels.");
}

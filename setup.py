"""Build of the wildcat extension (wildcat._C) with torch.utils.cpp_extension.

CUDA kernels are built when torch is a CUDA build and nvcc is found (never decided by whether a
GPU is present: build hosts often have none). Overrides: WILDCAT_FORCE_CUDA=1, WILDCAT_NO_CUDA=1.
TORCH_CUDA_ARCH_LIST picks the architectures (default "9.0+PTX").
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""

import glob
import importlib.util
import os
import shutil
import subprocess

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _with_cuda() -> bool:
    if _flag("WILDCAT_NO_CUDA"):
        return False
    if _flag("WILDCAT_FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _pip_cuda_include_dirs() -> list:
    """Headers of the CUDA libraries that a pip-installed torch brings (nvidia-* wheels).

    ATen's CUDA headers include cuBLAS and cuSPARSE headers, which a toolkit installed without
    its libraries (a bare nvcc) lacks; the wheels torch depends on carry them.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or spec.submodule_search_locations is None:
        return []
    found = []
    for root in spec.submodule_search_locations:
        for include in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.exists(os.path.join(include, "cusparse.h")) or os.path.exists(os.path.join(include, "cublas_v2.h")):
                found.append(include)
    return found


def _cuda_library_dirs() -> list:
    """Library folders that hold the CUDA runtime: CUDA_HOME's, /usr/local/cuda's and those of
    the toolkit nvcc belongs to. torch guesses CUDA_HOME from nvcc's folder (/usr/local for a
    /usr/local/bin/nvcc wrapper) and adds only lib64/, while some toolkits use lib/."""
    roots = [CUDA_HOME, "/usr/local/cuda"]  # the toolkit's standard home, where nvcc is a wrapper
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    dirs = [os.path.join(root, sub) for root in roots for sub in ("lib64", "lib")]
    return sorted({d for d in dirs if glob.glob(os.path.join(d, "libcudart.so*"))})


def _has_shared_libstdcxx(compiler: str) -> bool:
    try:
        found = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return False
    return os.path.isabs(found) and os.path.exists(found)


def _use_compiler_with_shared_runtime() -> None:
    """Make sure the extension links the shared libstdc++ that torch uses.

    A toolchain without a shared libstdc++ (seen: CXX=/opt/gcc/bin/g++ on a GPU image) makes the
    linker take the static archive; the extension then carries a private libstdc++ and the first
    C++ exception it formats (every argument error) crashes the process. Such a CXX is replaced
    by the system compiler when that one has the shared runtime.
    """
    cxx = os.environ.get("CXX")
    if not cxx or _has_shared_libstdcxx(cxx):
        return
    for candidate_cxx, candidate_cc in (("/usr/bin/g++", "/usr/bin/gcc"), ("/usr/bin/c++", "/usr/bin/cc")):
        if os.path.exists(candidate_cxx) and _has_shared_libstdcxx(candidate_cxx):
            print(f"wildcat: CXX={cxx} has no shared libstdc++ (it would be linked statically into the "
                  f"extension and break C++ exceptions); building with {candidate_cxx} instead")
            os.environ["CXX"] = candidate_cxx
            if os.path.exists(candidate_cc):
                os.environ["CC"] = candidate_cc
            return
    raise RuntimeError(f"wildcat: CXX={cxx} has no shared libstdc++; set CXX to a compiler that has one")


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _extension():
    with_cuda = _with_cuda()
    sources = _sources("csrc/*.cpp") + _sources("csrc/ops/*.cpp") + _sources("csrc/ops/cpu/*.cpp")
    sources += _sources("csrc/python/*.cpp")
    # -fopenmp: at::parallel_for is inline OpenMP in ATen's headers; without it our tasks run
    # serially. -fopenmp also honours the `omp simd` loops of the CPU kernels.
    # -fno-trapping-math -fno-math-errno: nothing here reads FP exception flags or errno; without
    # them the compiler may not if-convert or vectorize loops with conditional FP arithmetic
    # (measured 3x on the pivot loop, benchmarks/NOTES.md).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    macros = []
    kwargs = {}
    if with_cuda:
        sources += _sources("csrc/ops/cuda/*.cu")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")
        macros.append(("WILDCAT_WITH_CUDA", None))
        kwargs["extra_compile_args"] = {
            "cxx": cxx,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        }
        kwargs["extra_link_args"] = ["-fopenmp"]
        kwargs["library_dirs"] = _cuda_library_dirs()
        make = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        kwargs["extra_link_args"] = ["-fopenmp"]
        make = CppExtension
    print(f"wildcat: building {'with' if with_cuda else 'without'} CUDA kernels"
          + (f" (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else ""))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    if with_cuda:
        include_dirs += _pip_cuda_include_dirs()
    return make(
        name="wildcat._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=macros,
        **kwargs,
    )


_use_compiler_with_shared_runtime()
setup(
    packages=find_packages(include=["wildcat", "wildcat.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

"""Build of the wildcat extension (wildcat._C) with torch.utils.cpp_extension.

CUDA kernels are built when torch is a CUDA build and nvcc is found (never decided by whether a
GPU is present: build hosts often have none). Overrides: WILDCAT_FORCE_CUDA=1, WILDCAT_NO_CUDA=1.
TORCH_CUDA_ARCH_LIST picks the architectures (default "9.0+PTX").
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""

import glob
import os

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
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
        }
        kwargs["libraries"] = ["cublas"]
        kwargs["extra_link_args"] = ["-fopenmp"]
        make = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        kwargs["extra_link_args"] = ["-fopenmp"]
        make = CppExtension
    print(f"wildcat: building {'with' if with_cuda else 'without'} CUDA kernels"
          + (f" (TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else ""))
    return make(
        name="wildcat._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        define_macros=macros,
        **kwargs,
    )


setup(
    packages=find_packages(include=["wildcat", "wildcat.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

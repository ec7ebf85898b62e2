"""Build script: the pure-Python package everywhere; the `eet_pipe._C` CUDA extension from csrc/
only where a CUDA build of torch and nvcc are present.

EET_PIPE_BUILD_EXT=1 forces the extension (fails loudly without CUDA), =0 skips it; unset = auto.
"""

import glob
import os
import shutil

from setuptools import setup


def _want_extension() -> bool:
    flag = os.environ.get("EET_PIPE_BUILD_EXT", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        if flag in ("1", "true", "yes", "on"):
            raise RuntimeError("EET_PIPE_BUILD_EXT=1 but torch is not importable in the build environment") from None
        return False
    have_cuda = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if flag in ("1", "true", "yes", "on") and not have_cuda:
        raise RuntimeError("EET_PIPE_BUILD_EXT=1 but torch has no CUDA build or nvcc is missing")
    return have_cuda and bool(glob.glob("csrc/*.cu"))


def _extensions() -> dict:
    if not _want_extension():
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    ext = CUDAExtension(
        "eet_pipe._C", sources,
        # no -std flag: torch's headers choose the C++ standard they need (C++20 from torch 2.14)
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(**_extensions())

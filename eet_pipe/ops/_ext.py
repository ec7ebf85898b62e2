"""Finds the CUDA extension once, at import: the only place that decides whether kernels exist.

Order: ``import eet_pipe._C`` (built by ``pip install .`` / setup.py); else, only when the
environment sets ``EET_PIPE_JIT=1`` and CUDA and nvcc are present, a JIT build of ``csrc/`` with
``torch.utils.cpp_extension.load`` cached under ``~/.cache/eet_pipe/ext/<torch>-<cuda>``; else no
extension. A JIT build that was asked for and fails raises: silently running the slow path after
an explicit request would hide the problem.

``HAVE_EXT`` says whether ``torch.ops.eet_pipe.*`` kernels are registered; ``reason`` says why
(or why not) in words a user can act on.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

__all__ = ["HAVE_EXT", "reason"]

log = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
# As setup.py, minus -std: torch.utils.cpp_extension picks the standard its headers need
# (C++17 up to torch 2.13, C++20 from 2.14).
_CXX_FLAGS = ["-O3"]
_NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def env_on(name: str) -> bool:
    """An on-by-default kernel switch from the environment (EET_PIPE_GEMV, EET_PIPE_PDL, EET_PIPE_GEMM_SELECT):
    0, false, no or off turn it off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


_SCHEMA_ARGS = {"rms_norm": 3, "gemv": 6, "set_pdl": 1, "gemm_lt": 7, "dequantize_int8": 2, "cublaslt_version": 0,
                "decode_attention_qkv": 9, "gemv_gated": 8}
"""Ops whose argument counts tell a build of the current csrc/ from an older one (a `pip install -e` checkout
keeps its old `_C` after a pull: calling a changed op would then fail on every decode step)."""


def _registered() -> bool:
    return hasattr(torch.ops.eet_pipe, "rms_norm")


def _stale(namespace: object | None = None) -> str | None:
    """Which registered op (of `namespace`, default torch.ops.eet_pipe) does not match the sources' schema."""
    namespace = torch.ops.eet_pipe if namespace is None else namespace
    for name, count in _SCHEMA_ARGS.items():
        op = getattr(namespace, name, None)
        if op is None:
            return f"op {name} is missing"
        got = len(op.default._schema.arguments)
        if got != count:
            return f"op {name} has {got} arguments, the sources define {count}"
    return None


def _cuda_toolkit() -> str | None:
    """Why a JIT build is impossible here, or None if it is possible."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc is not on PATH and CUDA_HOME is unset"
    if not sorted(_CSRC.glob("*.cu")):
        return f"no CUDA sources in {_CSRC} (an installed package without csrc/)"
    return None


def _jit_build() -> None:
    from torch.utils.cpp_extension import load  # imported here: it probes CUDA and logs on CPU-only hosts

    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}"
    build_dir = Path.home() / ".cache" / "eet_pipe" / "ext" / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(p) for p in sorted(_CSRC.glob("*.cpp")) + sorted(_CSRC.glob("*.cu"))]
    log.info("EET_PIPE_JIT=1: building the eet_pipe CUDA extension in %s", build_dir)
    load(name="eet_pipe_C", sources=sources, extra_cflags=_CXX_FLAGS, extra_cuda_cflags=_NVCC_FLAGS,
         build_directory=str(build_dir), is_python_module=False, verbose=False)


def _detect() -> tuple[bool, str]:
    try:
        import eet_pipe._C  # noqa: F401  (importing registers torch.ops.eet_pipe.*)
    except ImportError as err:
        missing = f"eet_pipe._C is not importable ({err})"
    else:
        if _registered():
            stale = _stale()
            if stale is None:
                return True, "eet_pipe._C imported"
            return False, (f"eet_pipe._C is a stale build ({stale}); rebuild it with `pip install .` "
                           "(the kernels are off until then)")
        return False, "eet_pipe._C imported but registered no torch.ops.eet_pipe ops (stale build?)"
    if os.environ.get("EET_PIPE_JIT", "").strip() != "1":
        return False, f"{missing}; build it with `pip install .` or set EET_PIPE_JIT=1 to compile it at import"
    why_not = _cuda_toolkit()
    if why_not is not None:
        return False, f"{missing}; EET_PIPE_JIT=1 but {why_not}"
    try:
        _jit_build()
    except (RuntimeError, OSError) as err:
        raise RuntimeError(f"EET_PIPE_JIT=1 but building the eet_pipe CUDA extension failed: {err}") from err
    if not _registered():
        raise RuntimeError("EET_PIPE_JIT=1: the JIT-built extension registered no torch.ops.eet_pipe ops")
    stale = _stale()
    if stale is not None:
        raise RuntimeError(f"EET_PIPE_JIT=1: the JIT-built extension does not match the sources ({stale})")
    return True, "JIT-built from csrc/ (EET_PIPE_JIT=1)"


HAVE_EXT, reason = _detect()
log.debug("eet_pipe CUDA extension: %s (%s)", HAVE_EXT, reason)

"""Sources and compiler flags of the CUDA extension ``fastmask._C``: the one list used by
setup.py (``extension_kwargs``), by the run-time build ``fastmask.cuda_ext.build_jit``
(``jit_kwargs``) and by the CI compile check in tests/test_cuda_ext.py (``nvcc_command``).

No torch import at module level: setup.py imports this before torch's cpp_extension so
that ``ensure_cuda_home`` can fix CUDA_HOME first.

Flags: ``-O3``; ``-std=c++17`` for nvcc (the .cu files include no torch header, so they
do not need the C++ standard torch's headers require; bindings.cpp gets torch's own);
``-lineinfo`` (source lines in compute-sanitizer reports, no run-time cost); real code
for sm_80 (A100) and sm_90 (H100/H200) plus PTX of the newest one for later GPUs.
No ``--use_fast_math``: it flushes denormals and approximates division, sqrt and rsqrt,
which moves results away from the PyTorch reference the kernels are tested against, and
these kernels are memory-bound, so it would buy nothing.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil

CSRC = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(CSRC)

# Few, large translation units: nvcc compiles these in about a minute on 2 cores.
KERNEL_SOURCES = ("tokens.cu", "norm.cu", "loss.cu")
BINDING_SOURCES = ("bindings.cpp",)
HEADERS = ("fastmask_cuda.h", "common.cuh")
SOURCES = BINDING_SOURCES + KERNEL_SOURCES

DEFAULT_ARCHS = ("80", "90")
ARCH_ENV = "FASTMASK_CUDA_ARCHS"  # e.g. "90" or "80;90"; TORCH_CUDA_ARCH_LIST also works

NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo")
CXX_FLAGS = ("-O3",)


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else /usr/local/cuda, else the
    parent of the real nvcc on PATH (a wrapper script in /usr/local/bin is not a root)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def ensure_cuda_home() -> str | None:
    """Set CUDA_HOME for torch.utils.cpp_extension (which reads it once, at import) when it is
    unset and a toolkit is found; returns the toolkit root or None."""
    home = cuda_home()
    if home and not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = home
    return home


def nvcc_path() -> str | None:
    home = cuda_home()
    if home:
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def nvidia_include_dirs() -> list[str]:
    """Include folders of the NVIDIA wheels that torch brings: <site-packages>/nvidia/cu13/include
    (cusparse.h, cublas_v2.h ... that torch's CUDA headers include), or the per-library
    folders of the older CUDA 12 wheels."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    out: list[str] = []
    for root in roots:
        candidates = [os.path.join(root, "cu13", "include")]
        if not os.path.isdir(candidates[0]):
            candidates = sorted(glob.glob(os.path.join(root, "*", "include")))
        for inc in candidates:
            if os.path.isdir(inc) and inc not in out:
                out.append(inc)
    return out


def archs(requested=None) -> tuple[str, ...] | None:
    """Compute capabilities to build for, as digits ("80", "90"). None means "let torch decide
    from TORCH_CUDA_ARCH_LIST", which is respected when set and FASTMASK_CUDA_ARCHS is not."""
    if requested:
        return tuple(str(a).replace(".", "") for a in requested)
    env = os.environ.get(ARCH_ENV)
    if env:
        return tuple(a.strip().replace(".", "") for a in env.replace(",", ";").split(";") if a.strip())
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return None
    return DEFAULT_ARCHS


def gencode_flags(arch_list) -> list[str]:
    if not arch_list:
        return []
    flags: list[str] = []
    for a in arch_list:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    newest = max(arch_list, key=int)
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX for newer GPUs
    return flags


def nvcc_flags(arch_list=None) -> list[str]:
    return list(NVCC_FLAGS) + gencode_flags(archs(arch_list))


def _sources(relative: bool) -> list[str]:
    paths = [os.path.join(CSRC, s) for s in SOURCES]
    return [os.path.relpath(p, ROOT) for p in paths] if relative else paths


def extension_kwargs(arch_list=None, relative: bool = True) -> dict:
    """Keyword arguments of ``CUDAExtension(name="fastmask._C", **extension_kwargs())``.

    Sources are relative to the repository root (where setup.py runs) unless ``relative``
    is False.
    """
    return {
        "sources": _sources(relative),
        "include_dirs": [CSRC] + nvidia_include_dirs(),
        "extra_compile_args": {"cxx": list(CXX_FLAGS), "nvcc": nvcc_flags(arch_list)},
    }


def jit_kwargs(arch_list=None, name: str = "fastmask_C") -> dict:
    """Keyword arguments of ``torch.utils.cpp_extension.load`` for the same extension."""
    kw = extension_kwargs(arch_list, relative=False)
    return {
        "name": name,
        "sources": kw["sources"],
        "extra_include_paths": kw["include_dirs"],
        "extra_cflags": kw["extra_compile_args"]["cxx"],
        "extra_cuda_cflags": kw["extra_compile_args"]["nvcc"],
    }


def nvcc_command(source: str, output: str, arch_list=("80",)) -> list[str]:
    """The nvcc command that compiles one kernel source to an object file exactly as the
    extension build does (torch's common nvcc flags, our flags), for the given archs only."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME to the CUDA toolkit root)")
    incs = [CSRC] + include_paths(device_type="cuda") + nvidia_include_dirs()
    home = cuda_home()
    if home:
        incs.append(os.path.join(home, "include"))
    cmd = [nvcc, "-c", source, "-o", output, "--compiler-options", "-fPIC"]
    cmd += list(COMMON_NVCC_FLAGS) + list(NVCC_FLAGS) + gencode_flags(tuple(arch_list))
    cmd += [f"-I{d}" for d in incs]
    return cmd


def cxx_syntax_command(source: str) -> list[str]:
    """A host-compiler syntax check of a binding source against the torch and Python headers
    (what the extension build compiles with c++; -fsyntax-only: no object, about a minute)."""
    import sysconfig

    import torch
    from torch.utils.cpp_extension import include_paths

    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    incs = include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]] + nvidia_include_dirs()
    home = cuda_home()
    if home:
        incs.append(os.path.join(home, "include"))
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    cmd = [cxx, "-fsyntax-only", _torch_cxx_std(), "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{CSRC}"]
    cmd += [f"-isystem{d}" for d in incs] + [source]
    return cmd


def _torch_cxx_std() -> str:
    """The C++ standard torch's extension builder passes to the host compiler."""
    import inspect

    import torch.utils.cpp_extension as ce

    try:
        return "-std=c++20" if "-std=c++20" in inspect.getsource(ce) else "-std=c++17"
    except (OSError, TypeError):
        return "-std=c++17"

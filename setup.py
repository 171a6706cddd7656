"""Build script for fastmask (distribution name: ``fastmask-dit``; import name: ``fastmask``).

A plain ``pip install .`` needs neither a GPU nor nvcc. The optional CUDA C++ extension
``fastmask._C`` (sources in csrc/) is built only where nvcc and a CUDA build of torch are
present at build time (install torch first, then ``pip install --no-build-isolation .``).
FASTMASK_BUILD_CUDA=1 forces the build (and fails loudly if it cannot), =0 skips it.
"""
from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extensions():
    """([extensions], {cmdclass}) for the CUDA backend, or empty when it is not built."""
    want = os.environ.get("FASTMASK_BUILD_CUDA", "auto").lower()
    if want in ("0", "false", "no", "off"):
        print("fastmask: FASTMASK_BUILD_CUDA=0, skipping the CUDA extension", file=sys.stderr)
        return [], {}
    sys.path.insert(0, HERE)
    try:
        from csrc.build import ensure_cuda_home, extension_kwargs  # the one place that lists sources and flags
    except ImportError:  # a source tree without csrc/
        ensure_cuda_home = extension_kwargs = None
    else:
        # torch's cpp_extension reads CUDA_HOME once, at import, and otherwise guesses from
        # the nvcc on PATH (a wrapper script in /usr/local/bin gives a root without headers).
        ensure_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # torch absent from an isolated build environment
        reason = f"torch is not importable at build time ({type(e).__name__})"
        torch = CUDA_HOME = None
    else:
        reason = None
        if extension_kwargs is None:
            reason = "the CUDA sources (csrc/) are not in this source tree"
        elif torch.version.cuda is None:
            reason = "torch is a CPU-only build"
        elif CUDA_HOME is None:
            reason = "nvcc / CUDA_HOME not found"
    if reason is not None:
        if want in ("1", "true", "yes", "on"):
            raise RuntimeError(f"FASTMASK_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        print(f"fastmask: skipping the optional CUDA extension: {reason}", file=sys.stderr)
        return [], {}
    ext = CUDAExtension(name="fastmask._C", **extension_kwargs())
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="fastmask-dit",
    version="0.1.0",
    description="Fast training of diffusion transformers with masked tokens (MaskDiT): fused Triton/CUDA kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["fastmask", "fastmask.*"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["scikit-learn", "matplotlib", "pillow"],
        # ImageNet pipeline: `fastmask latents` / `sample --vae` (diffusers' AutoencoderKL) and
        # `fastmask fid` (torch-fidelity, which brings torchvision)
        "latents": ["diffusers>=0.27", "pillow"],
        "fid": ["torch-fidelity>=0.3", "pillow"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "scikit-learn", "matplotlib", "pillow", "triton>=3.0",
                 "diffusers>=0.27", "torch-fidelity>=0.3", "scipy", "peft"],
        "bench": ["pytest", "pytest-benchmark", "pytest-timeout", "matplotlib", "triton>=3.0"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["fastmask=fastmask.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

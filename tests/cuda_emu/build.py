"""Build fastmask._C for the CPU emulator (cuda_emu.h): the real csrc/ kernels and bindings
in one C++ translation unit (module.cpp), loaded with torch.utils.cpp_extension on CPU
tensors. Used by tests/test_cuda_ext.py and by ``scripts/cuda_smoke.py --emulate``."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

EMU_DIR = Path(__file__).resolve().parent
CSRC = EMU_DIR.parent.parent / "csrc"


def _csrc_build():
    from fastmask.cuda_ext import build_module  # csrc/build.py, loaded in one place

    return build_module()


def cuda_include_dir() -> str | None:
    """The CUDA toolkit's include folder (cuda_fp16.h and friends), or None."""
    home = _csrc_build().cuda_home()
    inc = os.path.join(home, "include") if home else None
    return inc if inc and os.path.isfile(os.path.join(inc, "cuda_fp16.h")) else None


def load_emulated(verbose: bool = False):
    """The emulated extension module (cached by torch; a cold build takes a minute or two)."""
    inc = cuda_include_dir()
    if inc is None:
        raise FileNotFoundError("no CUDA toolkit headers (cuda_fp16.h): set CUDA_HOME")
    from torch.utils.cpp_extension import load

    h = hashlib.sha256()
    for f in sorted(CSRC.glob("*")) + sorted(EMU_DIR.glob("*")):
        if f.suffix in (".cu", ".cuh", ".h", ".cpp"):
            h.update(f.name.encode() + f.read_bytes())
    halves = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
    return load(
        name=f"fastmask_C_emu_{h.hexdigest()[:12]}",  # the kernels are #included: key on their contents
        sources=[str(EMU_DIR / "module.cpp")],
        extra_include_paths=[str(CSRC), str(EMU_DIR), inc],
        extra_cflags=["-O2", "-pthread"] + halves,
        extra_ldflags=["-pthread"],
        with_cuda=False,
        verbose=verbose,
    )

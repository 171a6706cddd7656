"""The ``cuda`` backend of fastmask: launchers around the CUDA C++ kernels in csrc/.

The kernels are compiled into the extension module ``fastmask._C`` by
``FASTMASK_BUILD_CUDA=1 pip install --no-build-isolation -e .`` (see setup.py), or at run
time by :func:`build_jit`. The dispatcher (:mod:`fastmask.ops.dispatch`) imports this
module and asks :func:`not_supported_reasons` whether the backend can run a call: the
device, the dtypes and the build state (:func:`unavailable_reason`), every reason at once.

Every launcher has the signature declared with its op in :mod:`fastmask.ops.registry`, takes contiguous CUDA
tensors, allocates its outputs with ``torch.empty`` / ``torch.empty_like`` (the tests
poison those to catch unwritten elements), converts the small per-sample vectors
(shift, scale, gate: [B, D]) to fp32 and the position table and mask token to the
activations' dtype (exactly what the reference does), and calls ``fastmask._C``.
Parameter gradients are fp32 sums (reduced deterministically, without atomics) returned in
the dtype the op layer expects.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from . import _env

_ext: ModuleType | None = None
_import_error: str | None = None

BUILD_HINT = (
    "build it with `FASTMASK_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "or call fastmask.cuda_ext.build_jit()"
)


def _extension() -> ModuleType | None:
    global _ext, _import_error
    if _ext is None and _import_error is None:
        try:
            _ext = importlib.import_module("fastmask._C")
        except ImportError as e:
            _import_error = str(e)
    return _ext


def unavailable_reason() -> str | None:
    """None when the compiled kernels can be used, else why not (read by the dispatcher)."""
    if torch.version.cuda is None:
        return "torch is a CPU-only build; the CUDA extension needs a CUDA build of torch"
    if _extension() is None:
        if "No module named" in (_import_error or ""):
            return f"the CUDA extension fastmask._C is not built; {BUILD_HINT}"
        return (
            f"the CUDA extension fastmask._C could not be loaded ({_import_error}); it must be built against "
            f"the installed torch {torch.__version__}: rebuild it ({BUILD_HINT})"
        )
    return None


DEVICE_TYPES = ("cuda",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def not_supported_reasons(op: str, tensors) -> list[str]:
    """Every reason the compiled kernels cannot run ``op`` on ``tensors`` (empty if they can):
    device, dtypes and the build state. Reads only devices and dtypes (meta tensors are fine)."""
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    out = []
    dev = tensors[0].device.type if tensors else "cpu"
    if dev not in DEVICE_TYPES:
        out.append(f"tensors are on {dev}, the CUDA extension runs on CUDA devices")
    bad = sorted({str(t.dtype) for t in tensors if t.is_floating_point() and t.dtype not in DTYPES})
    if bad:
        out.append(f"dtype {', '.join(bad)} is not supported by the CUDA kernels (float32, float16, bfloat16)")
    if op in _TRITON_ONLY:
        out.append(_TRITON_ONLY[op])
    build = unavailable_reason()
    if build:
        out.append(build)
    return out


# Ops of the modern (LightningDiT-style) blocks that csrc/ leaves to Triton, and why.
_TRITON_ONLY = {
    "attention_rope": "the CUDA C++ sources have no attention kernel; the Triton flash kernels carry the "
                      "RoPE / qk-norm prologue",
    "rmsnorm_modulate": "no RMSNorm kernels in csrc/: the Triton norm kernels serve RMSNorm with an RMS switch, "
                        "and no benchmark yet shows a CUDA C++ version would be faster",
    "residual_rmsnorm_modulate": "no RMSNorm kernels in csrc/: the Triton norm kernels serve RMSNorm with an RMS "
                                 "switch, and no benchmark yet shows a CUDA C++ version would be faster",
    "swiglu": "no SwiGLU kernel in csrc/: a memory-bound elementwise op that the Triton kernel already serves",
}


def _C() -> ModuleType:
    ext = _extension()
    if ext is None:
        raise RuntimeError(unavailable_reason())
    return ext


def csrc_dir() -> Path:
    """csrc/ of a source checkout: next to the package, at the repository root."""
    return Path(__file__).resolve().parent.parent / "csrc"


def load_file(path: Path | str, name: str) -> ModuleType:
    """Import the Python file ``path`` as module ``name`` (a build script that is not part of
    the installed package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_module() -> ModuleType:
    """csrc/build.py of this source checkout: the one list of CUDA sources, flags and the
    nvcc / CUDA_HOME lookup (setup.py imports it as ``csrc.build``; everything else loads
    it through here)."""
    path = csrc_dir() / "build.py"
    if not path.is_file():
        raise FileNotFoundError(
            f"fastmask.cuda_ext compiles the CUDA sources of a fastmask source checkout, but {path.parent} "
            "does not hold them (an installed wheel has no csrc/). Clone the repository and install it with "
            "`FASTMASK_BUILD_CUDA=1 pip install --no-build-isolation -e .`, or call build_jit from that checkout."
        )
    return _load_build(path)


@functools.lru_cache(maxsize=None)
def _load_build(path: Path) -> ModuleType:
    return load_file(path, "_fastmask_csrc_build")


def build_jit(verbose: bool = False, archs=None) -> ModuleType:
    """Compile csrc/ with torch.utils.cpp_extension.load (cached in torch's extension folder,
    so a second call only loads it) and make it the ``cuda`` backend.

    ``archs``: compute capabilities such as ``("90",)``; by default the visible GPU's, else
    those of the installed build (sm_80 and sm_90). Takes minutes the first time.
    """
    global _ext, _import_error
    build = build_module()
    if build.ensure_cuda_home() is None:
        raise RuntimeError("fastmask.cuda_ext.build_jit: nvcc not found; set CUDA_HOME to the CUDA toolkit root")
    import torch.utils.cpp_extension as cpp_extension

    if cpp_extension.CUDA_HOME != os.environ["CUDA_HOME"]:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # it was read at import, before ensure_cuda_home
    if archs is None and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        archs = (f"{major}{minor}",)
    ext = cpp_extension.load(**build.jit_kwargs(archs), verbose=verbose)
    _ext, _import_error = ext, None  # not_supported_reasons() now sees the built backend
    _env.reload()  # and the dispatcher forgets the choices it cached without it
    return ext


# ------------------------------------------------------------------------------ helpers
def _f32(v: Tensor) -> Tensor:
    """A small per-sample vector or the position table as contiguous, 16-byte aligned fp32
    (vector loads; pos is added in fp32 and the sum rounded once)."""
    v = v.to(torch.float32).contiguous()
    return v if v.data_ptr() % 16 == 0 else v.clone()


def _as(t: Tensor | None, like: Tensor) -> Tensor | None:
    """t in like's dtype, contiguous (the mask token: the reference casts it to x_vis's dtype)."""
    if t is None:
        return None
    t = t.to(like.dtype).contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
    n = x.shape[0] * x.shape[1]
    return (
        torch.empty(n, device=x.device, dtype=torch.float32),
        torch.empty(n, device=x.device, dtype=torch.float32),
    )


# ---------------------------------------------------------------------------- token ops
def gather_tokens_fwd(x: Tensor, ids_keep: Tensor, pos: Tensor | None) -> Tensor:
    B, N, D = x.shape
    out = torch.empty(B, ids_keep.shape[1], D, device=x.device, dtype=x.dtype)
    _C().gather_tokens_fwd(out, x, ids_keep, None if pos is None else _f32(pos.reshape(N, D)))
    return out


def gather_tokens_bwd(grad_out: Tensor, ids_keep: Tensor, num_tokens: int, pos_grad: bool):
    B, K, D = grad_out.shape
    grad_x = torch.empty(B, num_tokens, D, device=grad_out.device, dtype=grad_out.dtype)
    grad_pos = torch.empty(num_tokens, D, device=grad_out.device, dtype=torch.float32) if pos_grad else None
    _C().gather_tokens_bwd(grad_x, grad_pos, grad_out, ids_keep)
    return grad_x, grad_pos


def unmask_tokens_fwd(
    x_vis: Tensor, ids_keep: Tensor, mask_token: Tensor, num_tokens: int, pos: Tensor | None
) -> Tensor:
    B, K, D = x_vis.shape
    out = torch.empty(B, num_tokens, D, device=x_vis.device, dtype=x_vis.dtype)
    pos = None if pos is None else pos.reshape(num_tokens, D)
    _C().unmask_tokens_fwd(out, x_vis, ids_keep, _as(mask_token.reshape(D), x_vis), None if pos is None else _f32(pos))
    return out


def unmask_tokens_bwd(grad_out: Tensor, ids_keep: Tensor, pos_grad: bool):
    B, N, D = grad_out.shape
    grad_x_vis = torch.empty(B, ids_keep.shape[1], D, device=grad_out.device, dtype=grad_out.dtype)
    grad_mask = torch.empty(D, device=grad_out.device, dtype=torch.float32)
    grad_pos = torch.empty(N, D, device=grad_out.device, dtype=torch.float32) if pos_grad else None
    _C().unmask_tokens_bwd(grad_x_vis, grad_mask, grad_pos, grad_out, ids_keep)
    return grad_x_vis, grad_mask, grad_pos


def scatter_tokens_fwd(x_kept: Tensor, ids_keep: Tensor, fill: Tensor | None, num_tokens: int) -> Tensor:
    B, K, D = x_kept.shape
    out = torch.empty(B, num_tokens, D, device=x_kept.device, dtype=x_kept.dtype)
    # the reference casts the fill to x_kept's dtype (a pass of its own only when they differ)
    _C().scatter_tokens_fwd(out, x_kept, ids_keep, None if fill is None else fill.to(x_kept.dtype).contiguous())
    return out


def scatter_tokens_bwd(grad_out: Tensor, ids_keep: Tensor, fill_grad: bool):
    B, N, D = grad_out.shape
    grad_x_kept = torch.empty(B, ids_keep.shape[1], D, device=grad_out.device, dtype=grad_out.dtype)
    grad_fill = torch.empty_like(grad_out) if fill_grad else None
    _C().scatter_tokens_bwd(grad_x_kept, grad_fill, grad_out, ids_keep)
    return grad_x_kept, grad_fill


# ----------------------------------------------------------------------------- norm ops
def layernorm_modulate_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float):
    out = torch.empty_like(x)
    mean, rstd = _stats(x)
    _C().layernorm_modulate_fwd(out, mean, rstd, x, _f32(shift), _f32(scale), float(eps))
    return out, mean, rstd


def layernorm_modulate_bwd(grad_out: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor):
    grad_x = torch.empty_like(x)
    grad_shift = torch.empty_like(scale)
    grad_scale = torch.empty_like(scale)
    _C().layernorm_modulate_bwd(grad_x, grad_shift, grad_scale, grad_out, x, _f32(scale), mean, rstd)
    return grad_x, grad_shift, grad_scale


def gated_residual_fwd(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    out = torch.empty_like(x)
    _C().gated_residual_fwd(out, x, y, _f32(gate))
    return out


def gated_residual_bwd(grad_out: Tensor, y: Tensor, gate: Tensor):
    # grad_x is grad_out itself (x + gate * y passes it unchanged): returned, not copied
    grad_y = torch.empty_like(y)
    grad_gate = torch.empty_like(gate)
    _C().gated_residual_bwd(grad_y, grad_gate, grad_out, y, _f32(gate))
    return grad_out, grad_y, grad_gate


def residual_layernorm_modulate_fwd(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float):
    x_new = torch.empty_like(x)
    out = torch.empty_like(x)
    mean, rstd = _stats(x)
    _C().residual_layernorm_modulate_fwd(x_new, out, mean, rstd, x, y, _f32(gate), _f32(shift), _f32(scale), float(eps))
    return x_new, out, mean, rstd


def residual_layernorm_modulate_bwd(grad_x_new, grad_out, x_new, y, gate, scale, mean, rstd):  # see fastmask.ops.registry
    grad_x = torch.empty_like(x_new)
    grad_y = torch.empty_like(y)
    grad_gate = torch.empty_like(gate)
    grad_shift = torch.empty_like(scale)
    grad_scale = torch.empty_like(scale)
    _C().residual_layernorm_modulate_bwd(
        grad_x, grad_y, grad_gate, grad_shift, grad_scale,
        grad_x_new, grad_out, x_new, y, _f32(gate), _f32(scale), mean, rstd,
    )
    return grad_x, grad_y, grad_gate, grad_shift, grad_scale


# --------------------------------------------------------------------------------- loss
def dsm_mae_loss_fwd(
    F_out: Tensor,
    x_noisy: Tensor,
    y: Tensor,
    sigma: Tensor,
    mask: Tensor | None,
    mae_coef: float,
    sigma_data: float,
    objective: str = "edm",
):
    B = F_out.shape[0]
    loss = torch.empty(B, device=F_out.device, dtype=torch.float32)
    terms = torch.empty(B, 2, device=F_out.device, dtype=torch.float32)
    grad_F = torch.empty_like(F_out)
    m = None if mask is None else mask.to(torch.float32).contiguous()
    # x_noisy and y stay in F's dtype when they share it, else they are read as fp32 (never
    # rounded down to a half-precision F: the reference computes in fp32 from each input).
    same = x_noisy.dtype == F_out.dtype and y.dtype == F_out.dtype
    xdt = F_out.dtype if same else torch.float32
    _C().dsm_mae_loss_fwd(
        loss, terms, grad_F, F_out, x_noisy.to(xdt).contiguous(), y.to(xdt).contiguous(),
        sigma.to(torch.float32).contiguous(), m, float(mae_coef), float(sigma_data),
        objective == "flow",
    )
    return loss, terms, grad_F

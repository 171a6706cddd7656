"""Launch policy of the attention kernels: configs, the heuristic, the register model,
pruning, the resource fallback, and the launchers :func:`attention_fwd` / :func:`attention_bwd`.

The kernel math is in :mod:`fastmask.kernels.attention`. Each launch is a *kind*: ``fwd``;
``delta`` and ``bwd`` (the one-pass backward, the default); ``dq`` and ``dkdv`` (the
deterministic backward). ``KERNELS[kind]`` is the jitted kernel, :func:`kind_constexprs` the
constexprs the kind fixes (``bwd`` and ``dkdv`` are one kernel, told apart by ONE_PASS),
:func:`autotune_configs` the configs the autotuner times for it and :func:`heuristic_config`
the config used without autotuning. Ahead-of-time compile checks take their candidates from
these.

Which backward runs: the deterministic one when ``deterministic=True`` is passed, or when it
is left unset (None) and ``torch.are_deterministic_algorithms_enabled()``; else the one-pass.

Launch configs: on a GPU, 16-bit inputs are autotuned over :func:`autotune_configs`, keyed on
(power-of-two bucket of L, bucket of B * H, head dim, dtype), pruned of configs that would
spill registers; ``FASTMASK_ATTN_AUTOTUNE=0`` uses :func:`heuristic_config` instead (no timing
runs on the first call of a new shape), as do fp32 inputs. The interpreter (CPU tests) always
uses a fixed small config.
"""
from __future__ import annotations

import functools

import torch
import triton

from .. import _env
from ._utils import cdiv, interpreting, launch, placeholder, tracing
from .attention import KERNELS, LOG2E, head_dim_split, not_supported_reason

__all__ = [
    "KERNELS",
    "KINDS",
    "attention_bwd",
    "attention_fwd",
    "attention_rope_bwd",
    "attention_rope_fwd",
    "autotune_configs",
    "head_dim_split",
    "heuristic_config",
    "kind_constexprs",
    "not_supported_reason",
    "use_deterministic",
]

# ----------------------------------------------------------------------------- launch configs

# (BLOCK_M, BLOCK_N, num_warps, num_stages). In the dk/dv kernel BLOCK_N is the key block the
# program owns and BLOCK_M the query block it walks over.
# The "delta" kernel takes no BLOCK_N (it reads rows of dO and O only; the 16 is a placeholder).
_GPU_CONFIGS = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3)],
    "dq": [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
    "dkdv": [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 2)],
    "bwd": [(32, 128, 4, 3), (32, 128, 8, 2), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3), (32, 64, 8, 2)],
    "delta": [(64, 16, 4, 1)],
    "qchain": [(64, 16, 4, 1)],
}
KINDS = tuple(_GPU_CONFIGS)
# Fixed blocks in the interpreter: small, and different for queries and keys, so the CPU
# tests cover several blocks on each side, ragged tails, and M != N.
_INTERPRET_BLOCKS = {
    "fwd": (16, 32), "dq": (16, 32), "dkdv": (32, 16), "bwd": (16, 32), "delta": (16, 16), "qchain": (16, 16),
}
# The dimension of L each kind's grid is split along.
_GRID_DIM = {
    "fwd": "BLOCK_M", "dq": "BLOCK_M", "dkdv": "BLOCK_N", "bwd": "BLOCK_N", "delta": "BLOCK_M", "qchain": "BLOCK_M",
}
_KIND_CONSTEXPRS = {"dkdv": {"ONE_PASS": False}, "bwd": {"ONE_PASS": True}}
# Kinds that never go through the autotuner (one cheap memory-bound config).
_FIXED_ONLY = ("delta", "qchain")
# The smallest block along the grid dimension any launch may take (autotune configs, the
# resource fallback, the interpreter): the per-program partial buffers of the qk-norm weight
# gradients are sized for it.
_MIN_GRID_BLOCK = 16


def kind_constexprs(kind: str) -> dict:
    """Constexprs that launch ``kind`` fixes beyond the per-call meta (HD, HD_A, HD_B, UPCAST,
    DOT_PREC) and the config's blocks."""
    return dict(_KIND_CONSTEXPRS.get(kind, {}))


def autotune_configs(kind: str) -> list[triton.Config]:
    """The configs the autotuner times for kernel ``kind`` (before pruning); [] for a kind
    that always launches with :func:`heuristic_config` ("delta": it has no BLOCK_N)."""
    if kind in _FIXED_ONLY:
        return []
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in _GPU_CONFIGS[kind]
    ]


def use_deterministic(deterministic: bool | None = None) -> bool:
    """Whether the backward runs the deterministic kernels: ``deterministic`` when given, else
    ``torch.are_deterministic_algorithms_enabled()``."""
    if deterministic is None:
        return torch.are_deterministic_algorithms_enabled()
    return bool(deterministic)


def _l_bucket(L: int) -> int:
    return min(triton.next_power_of_2(max(L, 1)), 4096)


def heuristic_config(kind: str, L: int, hd: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for kernel ``kind`` without autotuning.

    After the Triton flash-attention tutorial's H100 settings (128-row query tiles in the
    forward and dq, 128-row key tiles walked by 32-row query tiles in dk/dv), adjusted with
    ptxas register counts for sm_90 (see :func:`_regs_estimate`): 8 warps, or 64-row tiles,
    for wide padded head dims, so that no chosen config spills.

    fp32 inputs (a correctness path, not a fast one: no tensor cores with "ieee" dots) get
    32 x 32 tiles; dk/dv walks 16-row query tiles, since with 32 it spilled at head dim 72 on
    sm_90 and sm_80 (48 / 28 bytes; benchmarks/static_check.py).
    """
    if kind not in KERNELS:
        raise ValueError(f"attention: unknown kernel kind {kind!r}, expected one of {sorted(KERNELS)}")
    if kind in _FIXED_ONLY:
        return _GPU_CONFIGS[kind][0]
    if dtype == torch.float32:
        return (16, 32, 4, 2) if kind in ("dkdv", "bwd") else (32, 32, 4, 2)
    width = sum(head_dim_split(hd))
    if kind in ("fwd", "dq") and L <= 64:
        return (64, 64, 4, 2)
    if kind == "fwd":
        return (128, 64, 8, 3) if width > 64 else (128, 64, 4, 3)
    if kind == "dq":
        return (64, 64, 4, 3) if width > 64 else (128, 32, 4, 3)
    # dkdv holds two fp32 accumulators of 128 x width: 8 warps from width 48 on; the one-pass
    # kernel also holds a dq tile, so at the widest head dims it takes 8 warps on 64-key tiles
    if L <= 64:
        cfg = (32, 64, 4, 2)
    else:
        cfg = (32, 128, 8, 2) if width > 32 else (32, 128, 4, 3)
    if _regs_estimate(kind, cfg[0], cfg[1], cfg[2], width) > _REG_LIMIT[kind] or (
        (kind, *cfg[:3], width) in SPILLS_BY_ARCH[_device_arch()]
    ):
        cfg = (32, 64, 8, 2)
    return cfg


# A rough per-thread register count: fp32 accumulators + fp32 score tiles + 16-bit tiles held
# across the loop. Calibrated on ptxas -v for sm_90a (triton 3.8, bf16): configs above the
# limit spilled (e.g. dk/dv with a 128 x 80 key tile on 4 warps: 180 bytes of spills).
# The one-pass "bwd" limit is the dkdv one until ptxas counts calibrate it.
_REG_LIMIT = {"fwd": 300, "dq": 300, "dkdv": 250, "bwd": 250, "delta": 300, "qchain": 300}
# The same budget per target (compute capability as 90 / 80). sm_80 spills sooner (no wgmma:
# the mma.sync fragments live in registers); calibrated with benchmarks/static_check.py, which
# compiles every autotune config for both targets (tests/test_static_gpu.py keeps it true).
REG_LIMIT_BY_ARCH = {
    90: _REG_LIMIT, 80: {"fwd": 236, "dq": 240, "dkdv": 250, "bwd": 250, "delta": 300, "qchain": 300},
}
# Configs ptxas spilled on although the model above passes them, per target:
# (kind, BLOCK_M, BLOCK_N, num_warps, padded head width). sm_80, triton 3.8: dk/dv 64 x 64 on
# 4 warps at width 80 (36 bytes), forward 64 x 64 on 4 warps at width 32 (8 bytes), the one-pass
# backward 32 x 128 on 8 warps at width 80 (16 bytes; the heuristic then takes 32 x 64).
SPILLS_BY_ARCH = {
    90: set(),
    80: {("dkdv", 64, 64, 4, 80), ("fwd", 64, 64, 4, 32), ("bwd", 32, 128, 8, 80)},
}


def _regs_estimate(kind: str, BM: int, BN: int, warps: int, width: int) -> float:
    t = 32 * warps
    if kind == "fwd":  # acc [BM, W], s/p [BM, BN], q [BM, W]
        return (BM * width + 2 * BM * BN + BM * width / 2) / t
    if kind == "dq":  # dq [BM, W], s/p and dp [BM, BN], q and dO [BM, W]
        return (BM * width + 2 * BM * BN + BM * width) / t
    if kind in ("delta", "qchain"):  # two row tiles [BM, W]
        return 2 * BM * width / t
    # dk, dv [BN, W]; s^T, dp^T [BN, BM] plus the transposes; k, v [BN, W]
    est = (2 * BN * width + 3 * BN * BM + BN * width) / t
    if kind == "bwd":  # plus the dq tile [BM, W] added into the fp32 buffer
        est += BM * width / t
    return est


@functools.lru_cache(maxsize=None)
def _device_arch() -> int:
    """The register tables' key for the current GPU: 90 from Hopper on, else 80 (90 without
    a GPU; benchmarks/static_check.py replaces this function to plan for each target)."""
    if torch.cuda.is_available():
        return 90 if torch.cuda.get_device_capability()[0] >= 9 else 80
    return 90


def prune_for_target(kind, configs, named_args, arch: int | None = None, keep_one: bool = True):
    """The configs worth timing on target ``arch`` (default: this GPU): blocks much longer than
    the sequence only add masked work; configs the register model says spill on that target
    are never the fastest and each costs a compile."""
    cap = max(64, named_args["L_BUCKET"])
    width = named_args["HD_A"] + named_args["HD_B"] if "HD_A" in named_args and "HD_B" in named_args else 0
    arch = _device_arch() if arch is None else arch
    limit, spills = REG_LIMIT_BY_ARCH[arch][kind], SPILLS_BY_ARCH[arch]

    def ok(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if (kind, m, n, c.num_warps, width) in spills:
            return False
        return m <= cap and n <= cap and _regs_estimate(kind, m, n, c.num_warps, width) <= limit

    kept = [c for c in configs if ok(c)]
    return kept or (configs[:1] if keep_one else [])


def _prune(kind, configs, named_args, **kwargs):
    return prune_for_target(kind, configs, {**named_args, **kwargs})


_EVEN = {
    "EVEN_M": lambda a: a["L"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["L"] % a["BLOCK_N"] == 0,
}
_tuned: dict[str, object] = {}
# Kernel arguments the autotuner keys its choice on.
AUTOTUNE_KEY = ("L_BUCKET", "BH_BUCKET", "HD")


def _autotune_enabled() -> bool:
    return _env.attn_autotune()


def _tuned_kernel(kind: str):
    k = _tuned.get(kind)
    if k is None:
        k = triton.autotune(
            configs=autotune_configs(kind),
            key=list(AUTOTUNE_KEY),  # the autotuner adds the tensors' dtypes to the key
            prune_configs_by={"early_config_prune": functools.partial(_prune, kind)},
            # timing runs add into the dq buffer: zero it before each, and before the real run
            reset_to_zero=["DQ_ACC"] if kind == "bwd" else None,
        )(triton.heuristics(_EVEN)(KERNELS[kind]))
        _tuned[kind] = k
    return k


_fixed_choice: dict[tuple, tuple[int, int, int, int]] = {}


def prologue_config(kind: str, L: int, hd: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of a launch with the RoPE / qk-norm prologue.

    The prologue holds fp32 copies of the tile it rotates (and its cos / sin), and the backward's
    epilogue several fp32 tiles of the rows it chains back, so the tiles that the prologue
    touches are smaller than :func:`heuristic_config`'s and get more warps: the key tile of the
    forward and dq kernels, the query tile walked by dk/dv (and its own key tile). Checked for
    spills on sm_90 and sm_80 with benchmarks/static_check.py (--ops attention_rope).
    """
    if kind in _FIXED_ONLY:
        return _GPU_CONFIGS[kind][0]
    wide = sum(head_dim_split(hd)) > 64
    if dtype == torch.float32:  # the correctness path; at head dim 72 the smallest tiles
        if not wide:
            return (16, 32, 8, 2) if kind in ("dkdv", "bwd") else (32, 32, 4, 2)
        return {"fwd": (32, 32, 8, 2), "dq": (16, 32, 8, 2), "dkdv": (16, 32, 8, 2), "bwd": (16, 32, 8, 2)}[kind]
    if kind == "fwd":
        return (128, 32, 8, 2) if wide else (128, 32, 4, 3)
    if kind == "dq":
        return (64, 32, 8, 2) if wide else (64, 32, 4, 3)
    if wide:  # sm_80 spilled 8-20 bytes with 64-key tiles at head dim 72 (mma.sync fragments)
        return (16, 64, 8, 2) if _device_arch() >= 90 else (16, 32, 8, 2)
    return (16, 64, 4, 2)


def _fixed_candidates(kind: str, L: int, hd: int, dtype: torch.dtype, pro: bool = False):
    # The heuristic config, then cheaper ones for GPUs with less shared memory than an H100
    # (fewer pipeline stages, then small tiles).
    BM, BN, w, st = (prologue_config if pro else heuristic_config)(kind, L, hd, dtype)
    yield BM, BN, w, st
    for stages in range(st - 1, 0, -1):
        yield BM, BN, w, stages
    yield (32, 64, 4, 1) if kind == "dkdv" else (64, 32, 4, 1)
    yield 32, 32, 4, 1


def _launch(kind: str, L: int, BH: int, hd: int, args: tuple, meta: dict) -> None:
    """Run kernel ``kind`` on a 1-D grid of (blocks of L) x (B * H) programs, the blocks of one
    head adjacent (they share its K/V, or Q/dO, in L2). 1-D because B * H can exceed the
    65535 limit of the grid's second axis."""
    kernel = KERNELS[kind]
    grid_dim = _GRID_DIM[kind]
    meta = {**meta, **kind_constexprs(kind)}

    def run(BLOCK_M, BLOCK_N, warps, stages):
        block = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N}
        if kind in _FIXED_ONLY:
            block_args = {"BLOCK_M": BLOCK_M, "EVEN_M": L % BLOCK_M == 0}
        else:
            block_args = {**block, "EVEN_M": L % BLOCK_M == 0, "EVEN_N": L % BLOCK_N == 0}
        launch(kernel)[(cdiv(L, block[grid_dim]) * BH,)](*args, **meta, **block_args, num_warps=warps,
                                                         num_stages=stages)

    if interpreting():
        run(*_INTERPRET_BLOCKS[kind], 4, 1)
        return
    qkv = args[0]
    # With the RoPE / qk-norm prologue (PRO) the heuristic config runs: the autotuner's cache
    # is keyed without the prologue, and its register model does not count the rotary tiles.
    pro = bool(meta.get("PRO", False))
    if _autotune_enabled() and qkv.dtype != torch.float32 and kind not in _FIXED_ONLY and not pro:
        grid = lambda META: (cdiv(L, META[grid_dim]) * BH,)  # noqa: E731
        launch(_tuned_kernel(kind))[grid](*args, **meta)
        return
    # (a length that torch.compile traces symbolically is no dictionary key: the first candidate runs)
    key = (kind, _l_bucket(L), hd, qkv.dtype, qkv.device.index, pro) if isinstance(L, int) else None
    if key is not None and key in _fixed_choice:
        run(*_fixed_choice[key])
        return
    if tracing():  # torch.compile records the launch: no OutOfResources to catch (nor to cache) here
        run(*next(_fixed_candidates(kind, L, hd, qkv.dtype, pro)))
        return
    from triton.runtime.errors import OutOfResources

    err = None
    for cfg in _fixed_candidates(kind, L, hd, qkv.dtype, pro):
        try:
            run(*cfg)  # raises before launching when the config does not fit the GPU
        except OutOfResources as e:
            err = e
            continue
        _fixed_choice[key] = cfg
        return
    raise err


def _common_meta(qkv: torch.Tensor, dot: bool = True) -> dict:
    hd = qkv.shape[-1]
    HD_A, HD_B = head_dim_split(hd)
    upcast = interpreting() and qkv.dtype == torch.bfloat16  # interpreter bf16 tl.dot is wrong
    if qkv.dtype == torch.float32 and qkv.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
        prec = "ieee"
    else:
        prec = "tf32"  # ignored for 16-bit operands
    if not dot:  # kernels without tl.dot
        return dict(HD=hd, HD_A=HD_A, HD_B=HD_B)
    return dict(HD=hd, HD_A=HD_A, HD_B=HD_B, UPCAST=upcast, DOT_PREC=prec)


def _check(qkv: torch.Tensor) -> None:
    reason = not_supported_reason(qkv)
    if reason:
        raise ValueError(f"attention (triton): {reason}")


def _strides8(t: torch.Tensor, dims: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of ``dims`` divided by 8. The kernels multiply them back by the literal 8 (and
    address heads as h * HD), so the compiler can prove every row starts 16-byte aligned and
    vectorise the loads; Triton itself only specialises integer arguments divisible by 16,
    which a row stride like 3 * H * 72 with odd H is not."""
    return tuple(t.stride(d) // 8 for d in dims)


def _qkv_layout_ok(qkv: torch.Tensor) -> bool:
    # head dim contiguous, heads packed (stride hd), other strides multiples of 8 elements
    hd = qkv.shape[-1]
    return qkv.stride(4) == 1 and qkv.stride(3) == hd and all(qkv.stride(d) % 8 == 0 for d in (0, 1, 2))


def _rows_layout_ok(t: torch.Tensor) -> bool:
    # [B, L, H * hd] with the last dim contiguous and row strides multiples of 8
    return t.stride(2) == 1 and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0


def _bh_bucket(BH: int) -> int:
    # the number of (batch, head) pairs decides how many waves of programs fill the GPU,
    # so a config tuned at B * H = 16 need not be the best at 4096
    return min(triton.next_power_of_2(max(BH, 1)), 1 << 16)


def _buckets(L: int, BH: int) -> tuple[int, int]:
    """(L_BUCKET, BH_BUCKET): the autotune key's view of the launch size."""
    return _l_bucket(L), _bh_bucket(BH)


# ----------------------------------------------------------------------------- launchers


def _prologue_inputs(qkv, cos=None, sin=None, ids_keep=None, q_weight=None, k_weight=None, eps: float = 1e-6):
    """(pointer and scalar arguments, constexprs) of the RoPE / qk-norm prologue; without
    tables or weights, placeholders and PRO=False (the plain kernels)."""
    B, L, _, H, hd = qkv.shape
    rope, norm, gather = cos is not None, q_weight is not None, ids_keep is not None
    if (cos is None) != (sin is None) or (q_weight is None) != (k_weight is None) or (gather and not rope):
        raise ValueError("attention (triton): cos and sin come together, q_weight and k_weight together, "
                         "and ids_keep only with cos/sin")
    dummy = placeholder(qkv)
    if rope:
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 2 or t.shape[1] != hd or t.shape[0] < (1 if gather else L):
                raise ValueError(f"attention (triton): {name} must be [positions >= L, head_dim={hd}], "
                                 f"got {tuple(t.shape)}")
        # one angle per interleaved pair (columns 2i and 2i + 1 hold the same value in every RoPE
        # table): the kernels read the half tables [P, hd / 2]
        cos, sin = cos[:, 0::2].float().contiguous(), sin[:, 0::2].float().contiguous()
    if gather:
        if ids_keep.shape != (B, L) or ids_keep.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"attention (triton): ids_keep must be an integer [B={B}, L={L}], "
                             f"got {tuple(ids_keep.shape)} {ids_keep.dtype}")
        ids_keep = ids_keep.contiguous()
    if norm:
        for name, t in (("q_weight", q_weight), ("k_weight", k_weight)):
            if t.shape != (hd,):
                raise ValueError(f"attention (triton): {name} must be [head_dim={hd}], got {tuple(t.shape)}")
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    args = (
        cos if rope else dummy, sin if rope else dummy, ids_keep if gather else dummy,
        q_weight if norm else dummy, k_weight if norm else dummy,
    )
    consts = dict(PRO=rope or norm, ROPE=rope, QK_NORM=norm, GATHER=gather)
    return args, (ids_keep.stride(0) if gather else 0), float(eps), consts


def attention_fwd(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [B, L, 3, H, hd] -> (out [B, L, H * hd] in qkv's dtype, lse [B, H, L] fp32, natural log)."""
    return attention_rope_fwd(qkv, scale, None, None, None, None, None, 1e-6)


def attention_rope_fwd(qkv, scale, cos, sin, ids_keep, q_weight, k_weight, eps: float):
    """:func:`attention_fwd` with the prologue of :mod:`fastmask.kernels.attention` on q and k:
    per-head RMSNorm (weights [hd], eps) and/or interleaved-pair RoPE (cos, sin [P, hd], one angle
    per pair: columns 2i and 2i + 1 equal, the even ones are read; row ids_keep[b, l] when
    ids_keep [B, L] is given, else row l); None skips a part."""
    _check(qkv)
    if not _qkv_layout_ok(qkv):
        qkv = qkv.contiguous()
    B, L, _, H, hd = qkv.shape
    ptrs, stride_idb, eps, consts = _prologue_inputs(qkv, cos, sin, ids_keep, q_weight, k_weight, eps)
    out = torch.empty((B, L, H * hd), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, L), device=qkv.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    scale = float(scale)
    args = (
        qkv, out, lse, scale * LOG2E, L, H, *_buckets(L, B * H),
        *_strides8(qkv, (0, 1, 2)), *_strides8(out, (0, 1)), *ptrs, stride_idb, eps,
    )
    meta = {**_common_meta(qkv), **consts}  # every kernel argument named, the prologue's switches too
    _launch("fwd", L, B * H, hd, args, meta)
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    deterministic: bool | None = None,
) -> torch.Tensor:
    """Gradient of :func:`attention_fwd`'s out: dqkv [B, L, 3, H, hd] (qkv's shape and dtype,
    contiguous). ``deterministic`` picks the backward (see :func:`use_deterministic`): the
    one-pass kernel adds dq with fp32 atomics, the deterministic pair of kernels gives
    bit-identical results from run to run at the cost of two more matmuls."""
    dqkv, _, _ = attention_rope_bwd(grad_out, qkv, out, lse, scale, None, None, None, None, None, 1e-6,
                                    deterministic=deterministic)
    return dqkv


def attention_rope_bwd(grad_out, qkv, out, lse, scale, cos, sin, ids_keep, q_weight, k_weight, eps: float,
                       deterministic: bool | None = None):
    """Gradient of :func:`attention_rope_fwd`: (dqkv, dq_weight, dk_weight); the weight
    gradients are fp32 (per-program partials summed in a fixed order), empty without qk-norm.
    The rotated / normalised q and k are recomputed in the kernels' prologue, and the gradient
    is chained back through them in the epilogue (one-pass: in a small kernel after the dq
    atomics are done)."""
    _check(qkv)
    if not _qkv_layout_ok(qkv):
        qkv = qkv.contiguous()
    B, L, _, H, hd = qkv.shape
    ptrs, stride_idb, eps, consts = _prologue_inputs(qkv, cos, sin, ids_keep, q_weight, k_weight, eps)
    pro, norm = consts["PRO"], consts["QK_NORM"]
    if not (_rows_layout_ok(grad_out) and _rows_layout_ok(out) and grad_out.stride() == out.stride()):
        grad_out, out = grad_out.contiguous(), out.contiguous()
    lse = lse.contiguous()
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    no_w = torch.empty(0, device=qkv.device, dtype=torch.float32)
    if dqkv.numel() == 0:
        return dqkv, no_w, no_w
    # qk-norm weight partials: one fp32 row per program (rows past the grid stay zero)
    n_part = cdiv(L, _MIN_GRID_BLOCK) * B * H if norm else 1
    p_dq = torch.zeros((n_part, hd), device=qkv.device, dtype=torch.float32) if norm else placeholder(qkv)
    p_dk = torch.zeros((n_part, hd), device=qkv.device, dtype=torch.float32) if norm else placeholder(qkv)
    delta = torch.empty((B, H, L), device=qkv.device, dtype=torch.float32)
    scale = float(scale)
    strides = (*_strides8(qkv, (0, 1, 2)), *_strides8(grad_out, (0, 1)), *_strides8(dqkv, (0, 1, 2)))
    head = (scale * LOG2E, scale, L, H, *_buckets(L, B * H))
    meta = {**_common_meta(qkv), **consts}  # every kernel argument named, the prologue's switches too

    def weights():
        if not norm:
            return no_w, no_w
        return p_dq.sum(0), p_dk.sum(0)

    # With the prologue at padded widths over 64 (head dim 72), the one-pass kernel (dk, dv and
    # the dq atomics, plus the rotated q tiles) spilled on sm_90 and sm_80 in every config tried
    # down to 16 x 16 tiles on 8 warps (benchmarks/static_check.py --ops attention_rope): those
    # launches take the deterministic pair, which fits.
    # Under torch.compile (traced launches) the deterministic pair runs too: Inductor's compiled
    # one-pass backward gave a wrong dq on an H200 (torch 2.11; tests/test_compile.py, GPU), the
    # pair matched eager.
    if use_deterministic(deterministic) or tracing() or (pro and sum(head_dim_split(hd)) > 64):
        # dq first: it also writes delta = rowsum(dO * O), which the dk/dv kernel reads.
        _launch("dq", L, B * H, hd, (qkv, grad_out, out, lse, delta, dqkv, *head, *strides,
                                     *ptrs, p_dq, stride_idb, eps), meta)
        # (DQ_ACC and its strides are unused without ONE_PASS)
        _launch("dkdv", L, B * H, hd, (qkv, grad_out, lse, delta, dqkv, placeholder(dqkv), *head, *strides, 0, 0,
                                       *ptrs, p_dk, stride_idb, eps), meta)
        return (dqkv, *weights())
    _launch("delta", L, B * H, hd, (grad_out, out, delta, L, H, *_buckets(L, B * H), *_strides8(grad_out, (0, 1))),
            _common_meta(qkv, dot=False))
    # dq in fp32: straight into dqkv's q slice for fp32 inputs without a prologue, else a
    # buffer (cast at the end, or chained back through the prologue by the "qchain" kernel)
    # (not while traced: a view of dqkv written beside dqkv itself would rest on the order in
    # which torch writes the kernel's outputs back)
    in_place = qkv.dtype == torch.float32 and not pro and not tracing()
    if in_place:
        dq_acc = dqkv[:, :, 0]
        dq_acc.zero_()
    else:
        dq_acc = torch.zeros((B, L, H, hd), device=qkv.device, dtype=torch.float32)
    _launch("bwd", L, B * H, hd, (qkv, grad_out, lse, delta, dqkv, dq_acc, *head, *strides,
                                  *_strides8(dq_acc, (0, 1)), *ptrs, p_dk, stride_idb, eps), meta)
    if pro:
        qmeta = {k: v for k, v in _common_meta(qkv, dot=False).items()}
        qmeta.update(ROPE=consts["ROPE"], QK_NORM=norm, GATHER=consts["GATHER"])
        _launch("qchain", L, B * H, hd, (qkv, dq_acc, dqkv, L, H, *_buckets(L, B * H), *_strides8(qkv, (0, 1, 2)),
                                         *_strides8(dqkv, (0, 1, 2)), *_strides8(dq_acc, (0, 1)),
                                         ptrs[0], ptrs[1], ptrs[2], ptrs[3], p_dq, stride_idb, eps), qmeta)
    elif not in_place:
        dqkv[:, :, 0].copy_(dq_acc)
    return (dqkv, *weights())

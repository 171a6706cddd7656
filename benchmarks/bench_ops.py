"""Per-op benchmarks: every fastmask op, every available backend and baseline, three modes.

One setup function per op builds the inputs of a real DiT/MaskDiT shape and says how many
bytes (memory-bound ops) or FLOPs (attention) each mode must move or compute; the single
test below times one (op, shape, provider, mode) case and records the roofline figure.

Providers:
    fastmask-triton, fastmask-cuda   the public op under ``fastmask.backend(...)``
    torch                            the PyTorch reference (``fastmask.ops.reference``), eager;
                                     for attention that is SDPA from the fused qkv layout
    torch-compile                    ``torch.compile`` of the same reference function
    attention only: torch-math (explicit softmax, eager), sdpa-flash / sdpa-efficient /
    sdpa-cudnn (SDPA forced to one kernel, on q/k/v views), xformers (if installed)
Modes: forward (inputs require grad, as in training), backward (the forward runs untimed
before each round), full (forward + backward).
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fastmask
from benchmarks import common
from fastmask.ops import dispatch, reference
from fastmask.models.configs import model_kwargs

MODES = ("forward", "backward", "full")
FASTMASK_PROVIDERS = ("fastmask-triton", "fastmask-cuda")
COMMON_PROVIDERS = (*FASTMASK_PROVIDERS, "torch", "torch-compile")
ATTENTION_BASELINES = ("torch-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers")
# The GPU script's "ops" stage: the headline shape, forward and backward, these providers.
HEADLINE_PROVIDERS = (*FASTMASK_PROVIDERS, "torch", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "xformers")
HEADLINE_MODES = ("forward", "backward")


# ----------------------------------------------------------------------------- shapes
@dataclasses.dataclass(frozen=True)
class Shape:
    """One point of the sweep: a DiT config at an input size, batch and mask ratio."""

    config: str
    input_size: int  # latent side: 32 for 256x256 images, 64 for 512x512
    batch: int
    mask_ratio: float
    in_channels: int = 4

    @functools.cached_property
    def kw(self) -> dict:
        return model_kwargs(self.config, masked=True)

    @property
    def res(self) -> int:
        return self.input_size * 8

    @property
    def N(self) -> int:
        return (self.input_size // self.kw["patch_size"]) ** 2

    @property
    def K(self) -> int:
        return fastmask.ops.num_kept(self.N, self.mask_ratio)

    @property
    def P(self) -> int:
        return self.kw["patch_size"] ** 2 * self.in_channels

    def width(self, stage: str) -> tuple[int, int]:
        """(D, heads) of the encoder or decoder blocks."""
        if stage == "decoder":
            return self.kw["decoder_hidden_size"], self.kw["decoder_num_heads"]
        return self.kw["hidden_size"], self.kw["num_heads"]

    def tokens(self, stage: str) -> int:
        return self.N if stage == "decoder" else self.K


def grid() -> tuple[list[Shape], Shape]:
    """(shapes of this run's size set, the headline shape)."""
    sset = common.size_set()
    if sset == "dry":
        shapes = [Shape("T/2", 8, 2, 0.5)]
    elif sset == "cpu":
        shapes = [Shape("S/2", 32, 8, r) for r in (0.5, 0.0, 0.75)]
    elif sset == "quick":
        shapes = [Shape("XL/2", 32, 64, r) for r in (0.5, 0.0, 0.75, 0.25)]
        shapes += [Shape("XL/2", 64, 16, 0.5)]
    else:
        shapes = [
            Shape(cfg, size, batch, r)
            for cfg in ("XL/2", "L/2", "B/2", "S/2")
            for size, batch in ((32, 64), (64, 16))
            for r in (0.5, 0.0, 0.25, 0.75)
        ]
    return shapes, shapes[0]


# ----------------------------------------------------------------------------- op setups
@dataclasses.dataclass
class OpSetup:
    """Inputs of one op call, the callables per provider, and the work per mode."""

    inputs: tuple
    grad_idx: tuple[int, ...]  # which inputs get gradients
    public: callable  # the fastmask op, called as public(*inputs)
    ref: callable  # the reference, same signature (a module-level function: compiled once)
    bytes: dict  # mode -> bytes that must move
    flops: dict | None = None  # mode -> useful FLOPs
    bound: str = "memory"
    dims: dict = dataclasses.field(default_factory=dict)


def _randn(*shape, dtype=None, device=None, requires_grad=False):
    t = torch.randn(*shape, device=device or common.device(), dtype=dtype or common.bench_dtype())
    return t.requires_grad_(requires_grad)


def _ids(shape: Shape):
    ids_keep, _, mask = fastmask.ops.random_mask(shape.batch, shape.N, shape.mask_ratio, device=common.device())
    return ids_keep, mask


def minimum_bytes(op: str, *, B: int, D: int = 0, L: int = 0, N: int = 0, K: int = 0, P: int = 0, e: int = 2,
                  masked: bool = True, pos_grad: bool = False, fill: bool = True, fill_grad: bool = True) -> dict:
    """The bytes an op must move, per mode {"forward", "backward"}: each input read once, each
    output written once (activations of ``e`` bytes, fp32 position embeddings, int64 ids). The
    benchmarks' roofline and benchmarks/static_check.py's byte count both use it."""
    if op in _NORM_OPS:
        _, _, (act_f, act_b), (vec_f, vec_b) = _NORM_OPS[op]
        return {"forward": (act_f * L + vec_f) * B * D * e, "backward": (act_b * L + vec_b) * B * D * e}
    if op in ("rmsnorm_modulate", "residual_rmsnorm_modulate"):  # + the fp32 weight [D] (and its gradient)
        ln = minimum_bytes(op.replace("rmsnorm", "layernorm"), B=B, L=L, D=D, e=e)
        return {"forward": ln["forward"] + D * 4, "backward": ln["backward"] + 2 * D * 4}
    if op == "swiglu":  # on the w12 output [B, L, 2F], F = int(2/3 * 4 D)
        F = int(2 / 3 * 4 * D)
        return {"forward": 3 * B * L * F * e, "backward": 5 * B * L * F * e}
    gpos = N * D * 4 if pos_grad else 0  # the position embedding's gradient, when it has one
    if op == "gather_tokens":
        return {"forward": B * K * D * e * 2 + min(B * K, N) * D * 4 + B * K * 8,
                "backward": B * K * D * e + B * N * D * e + B * K * 8 + gpos}
    if op == "unmask_tokens":
        return {"forward": B * K * D * e + N * D * 4 + B * K * 8 + B * N * D * e,
                "backward": B * N * D * e + B * K * D * e + B * K * 8 + D * 4 + gpos}
    if op == "scatter_tokens":  # the fill's kept rows are overwritten: never read (no fill: zeros)
        fwd = B * K * D * e + (B * (N - K) * D * e if fill else 0) + B * N * D * e + B * K * 8
        if not (fill and fill_grad):  # the backward is then the gather of grad_out's kept rows
            return {"forward": fwd, "backward": 2 * B * K * D * e + B * K * 8}
        return {"forward": fwd, "backward": 2 * B * N * D * e + B * K * D * e + B * K * 8}
    if op == "dsm_mae_loss":
        reads = B * N * P * (e + 8) + B * 4 + (B * N * 4 if masked else 0)
        return {"forward": reads, "backward": reads + B * N * P * e}
    raise ValueError(f"op: no byte count for {op!r}")


def setup_gather_tokens(shape: Shape, stage: str) -> OpSetup:
    B, N, K = shape.batch, shape.N, shape.K
    D, _ = shape.width(stage)
    e = common.bench_dtype().itemsize
    x = _randn(B, N, D, requires_grad=True)
    pos = _randn(N, D, dtype=torch.float32)  # the fixed fp32 pos_embed buffer of the model
    ids_keep, _ = _ids(shape)
    fwd, bwd = minimum_bytes("gather_tokens", B=B, N=N, K=K, D=D, e=e).values()
    return OpSetup(
        inputs=(x, ids_keep, pos),
        grad_idx=(0,),
        public=functools.partial(fastmask.ops.gather_tokens, check_ids=False),
        ref=reference.gather_tokens,
        bytes={"forward": fwd, "backward": bwd, "full": fwd + bwd},
        dims=dict(B=B, N=N, K=K, D=D),
    )


def setup_unmask_tokens(shape: Shape, stage: str) -> OpSetup:
    B, N, K = shape.batch, shape.N, shape.K
    D, _ = shape.width("decoder")
    e = common.bench_dtype().itemsize
    x_vis = _randn(B, K, D, requires_grad=True)
    mask_token = _randn(D, dtype=torch.float32, requires_grad=True)  # an fp32 parameter
    pos = _randn(N, D, dtype=torch.float32)
    ids_keep, _ = _ids(shape)
    fwd, bwd = minimum_bytes("unmask_tokens", B=B, N=N, K=K, D=D, e=e).values()
    return OpSetup(
        inputs=(x_vis, ids_keep, mask_token, N, pos),
        grad_idx=(0, 2),
        public=functools.partial(fastmask.ops.unmask_tokens, check_ids=False),
        ref=reference.unmask_tokens,
        bytes={"forward": fwd, "backward": bwd, "full": fwd + bwd},
        dims=dict(B=B, N=N, K=K, D=D),
    )


def setup_scatter_tokens(shape: Shape, stage: str) -> OpSetup:
    """TREAD's route end: the K routed tokens put back into the saved [B, N, D] stream."""
    B, N, K = shape.batch, shape.N, shape.K
    D, _ = shape.width(stage)
    e = common.bench_dtype().itemsize
    x_kept = _randn(B, K, D, requires_grad=True)
    fill = _randn(B, N, D, requires_grad=True)
    ids_keep, _ = _ids(shape)
    fwd, bwd = minimum_bytes("scatter_tokens", B=B, N=N, K=K, D=D, e=e).values()
    return OpSetup(
        inputs=(x_kept, ids_keep, fill),
        grad_idx=(0, 2),
        public=functools.partial(fastmask.ops.scatter_tokens, check_ids=False),
        ref=reference.scatter_tokens,
        bytes={"forward": fwd, "backward": bwd, "full": fwd + bwd},
        dims=dict(B=B, N=N, K=K, D=D),
    )


def setup_attention(shape: Shape, stage: str) -> OpSetup:
    B, L = shape.batch, shape.tokens(stage)
    D, H = shape.width(stage)
    hd = D // H
    e = common.bench_dtype().itemsize
    qkv = _randn(B, L, 3, H, hd, requires_grad=True)
    fwd_flops = 4 * B * H * L * L * hd
    fwd = 4 * B * L * D * e
    bwd = 8 * B * L * D * e
    scale = hd**-0.5
    return OpSetup(
        inputs=(qkv, scale),
        grad_idx=(0,),
        public=fastmask.ops.attention,
        ref=reference.attention,
        bytes={"forward": fwd, "backward": bwd, "full": fwd + bwd},
        flops={"forward": fwd_flops, "backward": 2.5 * fwd_flops, "full": 3.5 * fwd_flops},
        bound="compute",
        dims=dict(B=B, L=L, H=H, hd=hd),
    )


# The row-wise norm ops: (number of [B, L, D] activations, number of [B, D] vectors,
# activation tensors moved forward / backward, vector tensors moved forward / backward).
# gated_residual's backward: dx is dout itself (read dout and y, write dy).
_NORM_OPS = {
    "layernorm_modulate": (1, 2, (2, 3), (2, 3)),
    "gated_residual": (2, 1, (3, 3), (1, 2)),
    "residual_layernorm_modulate": (2, 3, (4, 6), (3, 5)),
}


def _setup_norm(op: str, shape: Shape, stage: str) -> OpSetup:
    n_act, n_vec, _, _ = _NORM_OPS[op]
    B, L = shape.batch, shape.tokens(stage)
    D, _ = shape.width(stage)
    e = common.bench_dtype().itemsize
    inputs = tuple(_randn(B, L, D, requires_grad=True) for _ in range(n_act))
    inputs += tuple(_randn(B, D, requires_grad=True) for _ in range(n_vec))
    fwd, bwd = minimum_bytes(op, B=B, L=L, D=D, e=e).values()
    return OpSetup(
        inputs=inputs,
        grad_idx=tuple(range(len(inputs))),
        public=getattr(fastmask.ops, op),
        ref=getattr(reference, op),
        bytes={"forward": fwd, "backward": bwd, "full": fwd + bwd},
        dims=dict(B=B, L=L, D=D),
    )


def _setup_rms(op: str, shape: Shape, stage: str) -> OpSetup:
    # the LayerNorm counterpart's traffic, plus the RMSNorm weight [D] (fp32, a parameter)
    s = _setup_norm(op.replace("rmsnorm", "layernorm"), shape, stage)
    D = s.dims["D"]
    w = _randn(D, dtype=torch.float32, requires_grad=True)
    return dataclasses.replace(
        s, inputs=(*s.inputs, w), grad_idx=tuple(range(len(s.inputs) + 1)), public=getattr(fastmask.ops, op),
        ref=getattr(reference, op), bytes=_with_full(minimum_bytes(op, B=s.dims["B"], L=s.dims["L"], D=D,
                                                                  e=common.bench_dtype().itemsize)),
    )


def _with_full(b: dict) -> dict:
    return {**b, "full": b["forward"] + b["backward"]}


def setup_attention_rope(shape: Shape, stage: str) -> OpSetup:
    """Attention with the modern-block prologue: per-head q/k RMSNorm and 2-D RoPE, the
    encoder's rotary rows read at ids_keep (the kept tokens), the decoder's at 0..N-1."""
    s = setup_attention(shape, stage)
    hd, N = s.dims["hd"], shape.N
    ids = _ids(shape)[0] if stage == "encoder" and shape.mask_ratio > 0 else None
    cos, sin = (_randn(N, hd // 2, dtype=torch.float32).repeat_interleave(2, 1) for _ in range(2))  # angle per pair
    qw, kw = (_randn(hd, dtype=torch.float32, requires_grad=True) for _ in range(2))
    return dataclasses.replace(s, inputs=(*s.inputs, cos, sin, ids, qw, kw), grad_idx=(0, 5, 6),
                               public=_attention_rope_public, ref=reference.attention_rope)


def _attention_rope_public(qkv, scale, cos, sin, ids, qw, kw):
    return fastmask.ops.attention(qkv, scale, rope=(cos, sin), ids_keep=ids, q_norm_weight=qw, k_norm_weight=kw)


def setup_swiglu(shape: Shape, stage: str) -> OpSetup:
    """LightningDiT's SwiGLU activation on the w12 output [B, L, 2F], F = int(2/3 * 4 D):
    forward reads 2F and writes F per token, backward reads 2F + F and writes 2F."""
    B, L = shape.batch, shape.tokens(stage)
    D, _ = shape.width(stage)
    F = int(2 / 3 * 4 * D)
    e = common.bench_dtype().itemsize
    ab = _randn(B, L, 2 * F, requires_grad=True)
    fwd, bwd = minimum_bytes("swiglu", B=B, L=L, D=D, e=e).values()
    return OpSetup(
        inputs=(ab,), grad_idx=(0,), public=fastmask.ops.swiglu, ref=reference.swiglu,
        bytes={"forward": fwd, "backward": bwd, "full": fwd + bwd}, dims=dict(B=B, L=L, F=F),
    )


setup_layernorm_modulate = functools.partial(_setup_norm, "layernorm_modulate")
setup_rmsnorm_modulate = functools.partial(_setup_rms, "rmsnorm_modulate")
setup_residual_rmsnorm_modulate = functools.partial(_setup_rms, "residual_rmsnorm_modulate")
setup_gated_residual = functools.partial(_setup_norm, "gated_residual")
setup_residual_layernorm_modulate = functools.partial(_setup_norm, "residual_layernorm_modulate")


def setup_dsm_mae_loss(shape: Shape, stage: str) -> OpSetup:
    B, N, P = shape.batch, shape.N, shape.P
    e = common.bench_dtype().itemsize
    F = _randn(B, N, P, requires_grad=True)  # the network output (bf16 under autocast)
    x_noisy = _randn(B, N, P, dtype=torch.float32)
    y = _randn(B, N, P, dtype=torch.float32)
    sigma = (torch.randn(B, device=common.device()) * 1.2 - 1.2).exp()
    mask = _ids(shape)[1] if shape.mask_ratio > 0 else None
    fwd, bwd = minimum_bytes("dsm_mae_loss", B=B, N=N, P=P, e=e, masked=mask is not None).values()
    return OpSetup(
        inputs=(F, x_noisy, y, sigma, mask),
        grad_idx=(0,),
        # sigmas drawn here are positive and finite: no value check (a host sync, which would also
        # keep the call out of a CUDA graph)
        public=functools.partial(fastmask.ops.dsm_mae_loss, check_values=False),
        ref=reference.dsm_mae_loss,
        bytes={"forward": fwd, "backward": bwd, "full": fwd + bwd},
        dims=dict(B=B, N=N, P=P),
    )


# (op, stages it is benchmarked at, setup, skip at mask ratio 0: the model does not call it)
OPS = (
    ("attention", ("encoder", "decoder"), setup_attention, False),
    ("layernorm_modulate", ("encoder", "decoder"), setup_layernorm_modulate, False),
    ("residual_layernorm_modulate", ("encoder", "decoder"), setup_residual_layernorm_modulate, False),
    ("gated_residual", ("encoder", "decoder"), setup_gated_residual, False),
    ("gather_tokens", ("encoder",), setup_gather_tokens, True),
    ("unmask_tokens", ("decoder",), setup_unmask_tokens, True),
    ("scatter_tokens", ("encoder",), setup_scatter_tokens, True),  # TREAD's put-back
    ("dsm_mae_loss", ("output",), setup_dsm_mae_loss, False),
    # LightningDiT-style blocks
    ("attention_rope", ("encoder", "decoder"), setup_attention_rope, False),
    ("rmsnorm_modulate", ("encoder",), setup_rmsnorm_modulate, False),
    ("residual_rmsnorm_modulate", ("encoder",), setup_residual_rmsnorm_modulate, False),
    ("swiglu", ("encoder",), setup_swiglu, False),
)
SETUPS = {op: setup for op, _, setup, _ in OPS}


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class OpCase:
    op: str
    stage: str
    shape: Shape
    provider: str
    mode: str
    priority: tuple = ()
    headline: bool = False  # the GPU script's "ops" stage (FASTMASK_BENCH_PART)

    @property
    def id(self) -> str:
        s = self.shape
        cfg = s.config.replace("/", "")
        return f"{self.op}-{self.stage}-{cfg}-{s.res}px-r{int(round(s.mask_ratio * 100)):02d}-{self.provider}-{self.mode}"

    def row(self) -> dict:
        s = self.shape
        decoder_only = self.stage == "decoder" and self.op != "unmask_tokens"
        return {
            "kind": "op",
            "op": self.op,
            "stage": self.stage,
            "provider": self.provider,
            "mode": self.mode,
            "config": s.config,
            "input_size": s.input_size,
            "res": s.res,
            "batch": s.batch,
            # decoder-width ops see all N tokens whatever the ratio
            "mask_ratio": None if decoder_only else s.mask_ratio,
            "dtype": str(common.bench_dtype()).replace("torch.", ""),
        }


def _dims_key(op: str, stage: str, shape: Shape):
    if op == "dsm_mae_loss":
        return (shape.batch, shape.N, shape.P, shape.mask_ratio > 0)
    if op in ("gather_tokens", "unmask_tokens", "scatter_tokens"):
        return (shape.batch, shape.N, shape.K, shape.width(stage))
    return (shape.batch, shape.tokens(stage), shape.width(stage))


def build_cases() -> list[OpCase]:
    shapes, _ = grid()
    providers = {op: COMMON_PROVIDERS + (ATTENTION_BASELINES if op == "attention" else ()) for op, *_ in OPS}
    cases, seen = [], set()
    for shape_rank, shape in enumerate(shapes):
        for op_rank, (op, stages, _, skip_at_zero) in enumerate(OPS):
            if skip_at_zero and shape.mask_ratio == 0:
                continue
            for stage in stages:
                key = (op, stage, _dims_key(op, stage, shape))
                if key in seen:  # e.g. decoder-width ops do not depend on the mask ratio
                    continue
                seen.add(key)
                for provider in providers[op]:
                    compiled = provider == "torch-compile"
                    for mode_rank, mode in enumerate(MODES):
                        prio = (int(compiled), shape_rank, op_rank, mode_rank)
                        head = shape_rank == 0 and provider in HEADLINE_PROVIDERS and mode in HEADLINE_MODES
                        cases.append(OpCase(op, stage, shape, provider, mode, prio, head))
    return cases


CASES = build_cases()


# ----------------------------------------------------------------------------- providers
@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn)


_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}


def _sdpa_fn(provider: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = _SDPA_BACKENDS[provider]
    if not hasattr(SDPBackend, name):
        pytest.skip(f"{provider}: this torch has no SDPBackend.{name}")
    be = getattr(SDPBackend, name)

    def fn(qkv, scale):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, hd] views, as DiT does
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    return fn


def xformers_reason() -> str | None:
    """None if xformers' compiled kernels load here, else why it is no baseline: without its
    compiled part (a wheel built for another torch / CUDA) it runs PyTorch's own SDPA."""
    try:
        import xformers
        import xformers.ops  # noqa: F401
    except Exception as e:
        return f"xformers is not installed ({type(e).__name__})"
    if not getattr(xformers, "_has_cpp_library", False):
        return f"xformers {xformers.__version__}: its compiled part does not load with this torch/CUDA (it would run PyTorch's SDPA)"
    return None


def _xformers_fn():
    reason = xformers_reason()
    if reason:
        pytest.skip(reason)
    import xformers.ops as xops

    def fn(qkv, scale):
        B, L, _, H, hd = qkv.shape
        q, k, v = qkv.unbind(2)  # [B, L, H, hd] views: xformers' BMHK layout
        return xops.memory_efficient_attention(q, k, v, scale=scale).reshape(B, L, H * hd)

    return fn


def _xformers_kernel(qkv, scale) -> str | None:
    """The name of the xformers forward kernel its dispatcher picks for these inputs."""
    try:
        from xformers.ops import fmha

        q, k, v = qkv.unbind(2)
        return fmha._dispatch_fw(fmha.Inputs(query=q, key=k, value=v, scale=scale), True).NAME
    except Exception as e:  # a private API: the label is a courtesy
        return f"unknown ({type(e).__name__})"


def provider_fn(case: OpCase, s: OpSetup):
    """The callable for the case's provider, or pytest.skip with the reason it cannot run."""
    p = case.provider
    if p in FASTMASK_PROVIDERS:
        name = p.split("-", 1)[1]
        tensors = [t for t in s.inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
        reason = dispatch.why_not(name, case.op, tensors)
        if reason is None and not common.on_gpu() and common.size_set() != "dry":
            reason = "the Triton interpreter runs on the CPU: its timings mean nothing (GPU only)"
        if reason is not None:
            pytest.skip(f"{p} unavailable: {reason}")

        def fn(*a):
            with fastmask.backend(name):
                return s.public(*a)

        return fn
    if p == "torch":
        return s.ref
    if p == "torch-compile":
        reason = common.compile_allowed()
        if reason:
            pytest.skip(reason)
        return _compiled(s.ref)
    if p == "torch-math":
        return reference.attention_math
    if p in _SDPA_BACKENDS:
        return _sdpa_fn(p)
    if p == "xformers":
        return _xformers_fn()
    raise ValueError(f"unknown provider {p}")


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _grads_for(outs) -> tuple:
    # loss [B]: d(mean)/d(loss_b); others: unit-variance random cotangents
    return tuple(
        torch.full_like(o, 1.0 / o.numel()) if o.dim() == 1 else torch.randn_like(o) for o in outs
    )


def _ran_label(case: OpCase, ran: dict, s: OpSetup) -> str:
    """What actually computed the case: the fastmask backend the dispatcher chose, the forced
    SDPA kernel, xformers' own kernel, or the reference."""
    p = case.provider
    if p in FASTMASK_PROVIDERS:
        return common.backends_field(ran).get(case.op, "none")
    if p in _SDPA_BACKENDS:
        return f"sdpa:{_SDPA_BACKENDS[p]}"
    if p == "xformers":
        return f"xformers:{_xformers_kernel(*s.inputs)}"
    return p


# ----------------------------------------------------------------------------- the test
@pytest.mark.bench_case
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op(case: OpCase, benchmark, ceilings, bench_env, result_row):
    if case.provider == "xformers" and xformers_reason():  # cheap skip before building inputs
        pytest.skip(xformers_reason())
    if case.provider == "torch-compile" and common.compile_allowed():
        pytest.skip(common.compile_allowed())
    s = SETUPS[case.op](case.shape, case.stage)
    fn = provider_fn(case, s)
    result_row.update(
        dims=s.dims,
        bound=s.bound,
        bytes=s.bytes[case.mode],
        flops=(s.flops or {}).get(case.mode),
    )
    grad_inputs = [s.inputs[i] for i in s.grad_idx]

    def forward():
        return _outputs(fn(*s.inputs))

    def backward(*outs):
        return torch.autograd.grad(outs, grad_inputs, grads)

    def full():
        return torch.autograd.grad(forward(), grad_inputs, grads)

    try:
        with common.record_backends() as ran:  # which backend the fastmask op really ran on
            grads = _grads_for(forward())
            if case.mode == "forward":
                stats = common.measure(benchmark, forward)
            elif case.mode == "backward":
                stats = common.measure(benchmark, backward, setup=forward)
            else:
                stats = common.measure(benchmark, full)
    except Exception as e:
        # A baseline kernel that cannot run this shape on this machine (no cuDNN kernel for the
        # head dim, out of memory for the explicit softmax, ...) is skipped with the reason;
        # a failure of fastmask, torch or torch.compile is a result to look at.
        if case.provider in ATTENTION_BASELINES:
            pytest.skip(f"{case.provider} cannot run this case: {type(e).__name__}: {str(e)[:300]}")
        raise
    result_row.update(stats)
    # the kernels' own time (CUDA-graph replay, no host cost): the roofline is taken from it
    if case.mode == "forward":
        result_row.update(common.graph_ms(forward))
    elif case.mode == "full":
        result_row.update(common.graph_ms(full))
    else:  # backward = full - forward, each replayed from a graph
        f, fw = common.graph_ms(full), common.graph_ms(forward)
        if "gpu_ms" in f and "gpu_ms" in fw:
            result_row["gpu_ms"] = max(f["gpu_ms"] - fw["gpu_ms"], 0.0)
        elif f or fw:
            result_row["gpu_ms_error"] = f.get("gpu_ms_error") or fw.get("gpu_ms_error")
    if result_row.get("gpu_ms") and result_row.get("median_ms"):
        result_row["host_bound"] = result_row["median_ms"] > 1.5 * result_row["gpu_ms"]
    result_row.update(common.roofline(result_row, ceilings))
    result_row["ran"] = _ran_label(case, ran, s)
    benchmark.extra_info.update(case.row())
    benchmark.extra_info.update({k: v for k, v in result_row.items() if k != "dims"})
    benchmark.extra_info.update(
        {k: bench_env.get(k) for k in ("device", "torch", "triton", "cuda", "commit", "date")}
    )

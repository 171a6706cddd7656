"""Flash-style attention kernels (fastmask.kernels.attention, launched by attention_launch) against the explicit-softmax oracle.

CPU: the Triton interpreter on small shapes (fp32, plus fp16/bf16 spot checks).
GPU (marked ``gpu``): DiT shapes in bf16/fp16, judged relative to PyTorch SDPA in the same
precision, and a bit-exact repeat test of the backward at a large batch.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastmask
from fastmask.kernels import attention_launch as K
from fastmask.ops.reference import attention as sdpa_attention
from fastmask.ops.reference import attention_math
from fastmask._env import reload as _reload_env
from helpers import assert_all_written, assert_close_to_ref, max_err, poisoned_empty


def _qkv(B, L, H, hd, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(B, L, 3, H, hd, generator=g).to(device=device, dtype=dtype)


def _lse_ref(qkv, scale):
    q, k, _ = qkv.double().permute(2, 0, 3, 1, 4).unbind(0)
    return torch.logsumexp((q @ k.transpose(-1, -2)) * scale, dim=-1)


def _ref_grads(qkv, grad_out, scale, fn=attention_math, dtype=None):
    x = qkv.detach().to(dtype or qkv.dtype).requires_grad_(True)
    out = fn(x, scale)
    out.backward(grad_out.to(x.dtype))
    return out.detach(), x.grad


# ----------------------------------------------------------------------------- head-dim split


def test_head_dim_split_table():
    assert K.head_dim_split(8) == (16, 0)
    assert K.head_dim_split(32) == (32, 0)
    assert K.head_dim_split(40) == (32, 16)
    assert K.head_dim_split(72) == (64, 16)  # DiT-XL/2: 80 wide, not 128
    assert K.head_dim_split(96) == (64, 32)
    assert K.head_dim_split(128) == (128, 0)


@pytest.mark.parametrize("hd", range(8, 129, 8))
def test_head_dim_split_is_tight(hd):
    a, b = K.head_dim_split(hd)
    pow2 = lambda x: x & (x - 1) == 0  # noqa: E731
    assert pow2(a) and a >= 16 and (b == 0 or (pow2(b) and 16 <= b <= a))
    assert a + b >= hd
    # no split into two powers of two (each >= 16) pads less
    cands = [x for x in (16, 32, 64, 128) if x >= hd] + [
        x + y for x in (16, 32, 64, 128) for y in (16, 32, 64) if y <= x and x + y >= hd
    ]
    assert a + b == min(cands)


@pytest.mark.parametrize("hd", [0, 12, 136])
def test_unsupported_head_dim_raises(hd):
    qkv = torch.zeros(1, 4, 3, 1, hd)
    assert K.not_supported_reason(qkv) is not None
    with pytest.raises(ValueError, match="head dim"):
        K.attention_fwd(qkv, 1.0)


def test_launch_configs_are_sane():
    for kind in ("fwd", "dq", "dkdv", "bwd"):
        for hd in range(8, 129, 8):
            for L in (1, 64, 128, 1024):
                m, n, w, s = K.heuristic_config(kind, L, hd)
                assert m in (32, 64, 128) and n in (32, 64, 128) and w in (4, 8) and s >= 1
                # the heuristic configs pass the autotuner's own spill filter
                width = sum(K.head_dim_split(hd))
                assert K._regs_estimate(kind, m, n, w, width) <= K._REG_LIMIT[kind], (kind, L, hd)
        configs = [
            type("C", (), {"kwargs": {"BLOCK_M": m, "BLOCK_N": n}, "num_warps": w})()
            for m, n, w, _ in K._GPU_CONFIGS[kind]
        ]
        meta = {"HD": 32, "HD_A": 32, "HD_B": 0}
        kept = K._prune(kind, configs, {"L_BUCKET": 32}, **meta)
        assert kept and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)
        assert len(K._prune(kind, configs, {"L_BUCKET": 1024}, **meta)) == len(configs)
        assert 0 < len(K._prune(kind, configs, {"L_BUCKET": 1024}, HD=128, HD_A=128, HD_B=0)) < len(configs)


# ----------------------------------------------------------------------------- CPU interpreter, fp32

CASES = [(hd, L) for hd in (8, 32, 40, 72) for L in (1, 17, 64)]


@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "deterministic"])
@pytest.mark.parametrize("hd,L", CASES, ids=[f"hd{hd}-L{L}" for hd, L in CASES])
def test_forward_backward_fp32(hd, L, deterministic, device):
    torch.manual_seed(hd + L)
    B, H = (2, 1) if L == 64 else (2, 2)
    qkv = _qkv(B, L, H, hd, device=device, seed=hd * 100 + L)
    scale = 1.0 / math.sqrt(hd)
    grad_out = torch.randn(B, L, H * hd, device=device)
    ref_out, ref_dqkv = _ref_grads(qkv, grad_out, scale)

    with poisoned_empty():
        out, lse = K.attention_fwd(qkv, scale)
        dqkv = K.attention_bwd(grad_out, qkv, out, lse, scale, deterministic=deterministic)
    for t, name in ((out, "out"), (lse, "lse"), (dqkv, "dqkv")):
        assert_all_written(t, name)
    assert out.shape == (B, L, H * hd) and out.dtype == qkv.dtype
    assert lse.shape == (B, H, L) and lse.dtype == torch.float32
    assert dqkv.shape == qkv.shape and dqkv.dtype == qkv.dtype
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.double(), _lse_ref(qkv, scale), atol=2e-5, rtol=1e-5)
    for i, name in enumerate("qkv"):
        torch.testing.assert_close(dqkv[:, :, i], ref_dqkv[:, :, i], atol=5e-5, rtol=1e-4, msg=f"d{name}")


def _assert_backward_repeats(qkv, scale, repeats):
    """Runs the forward, then the deterministic backward ``repeats + 1`` times: every dqkv
    bit-identical."""
    out, lse = K.attention_fwd(qkv, scale)
    grad_out = torch.randn_like(out)
    first = K.attention_bwd(grad_out, qkv, out, lse, scale, deterministic=True)
    for _ in range(repeats):
        assert torch.equal(K.attention_bwd(grad_out, qkv, out, lse, scale, deterministic=True), first)
    return out, lse


def test_backward_is_deterministic(device):
    _assert_backward_repeats(_qkv(2, 33, 2, 72, device=device, seed=1), 72**-0.5, repeats=2)


class _KindSpy:
    """Records the kinds (and arguments) the attention launcher runs."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = K._launch

        def launch(kind, L, BH, hd, args, meta):
            self.calls.append((kind, args))
            return real(kind, L, BH, hd, args, meta)

        monkeypatch.setattr(K, "_launch", launch)

    @property
    def kinds(self):
        return [k for k, _ in self.calls]


def test_backward_choice_follows_option_and_torch_flag(monkeypatch, device):
    spy = _KindSpy(monkeypatch)
    qkv = _qkv(1, 9, 1, 16, device=device, seed=9)
    out, lse = K.attention_fwd(qkv, 0.25)
    g = torch.randn_like(out)
    for deterministic, torch_flag, want in [
        (None, False, ["delta", "bwd"]),
        (None, True, ["dq", "dkdv"]),
        (False, True, ["delta", "bwd"]),
        (True, False, ["dq", "dkdv"]),
    ]:
        spy.calls.clear()
        prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(torch_flag)
        try:
            K.attention_bwd(g, qkv, out, lse, 0.25, deterministic=deterministic)
        finally:
            torch.use_deterministic_algorithms(prev)
        assert spy.kinds == want, (deterministic, torch_flag)
    # the public op resolves the choice when it is called and carries it to its backward
    for deterministic, want in [(True, ["dq", "dkdv"]), (False, ["delta", "bwd"])]:
        x = qkv.clone().requires_grad_(True)
        with fastmask.backend("triton"):
            y = fastmask.ops.attention(x, deterministic=deterministic)
        spy.calls.clear()
        y.backward(torch.ones_like(y))
        assert spy.kinds == want


@pytest.mark.parametrize("hd,L", [(72, 17), (32, 64), (8, 17)])
def test_one_pass_matches_deterministic(hd, L, device):
    qkv = _qkv(2, L, 2, hd, device=device, seed=hd + L)
    scale = hd**-0.5
    out, lse = K.attention_fwd(qkv, scale)
    g = torch.randn_like(out)
    fast = K.attention_bwd(g, qkv, out, lse, scale, deterministic=False)
    det = K.attention_bwd(g, qkv, out, lse, scale, deterministic=True)
    torch.testing.assert_close(fast, det, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_pass_low_precision_dq_buffer(dtype, device):
    # 16-bit inputs: dq is summed in an fp32 buffer and cast once at the end
    B, L, H, hd = 1, 33, 2, 40
    qkv = _qkv(B, L, H, hd, device=device, seed=11).to(dtype)
    grad = torch.randn(B, L, H * hd, device=device).to(dtype)
    scale = hd**-0.5
    ref_out, ref_dqkv = _ref_grads(qkv.double(), grad.double(), scale)
    _, low_dqkv = _ref_grads(qkv, grad, scale, fn=attention_math)
    out, lse = K.attention_fwd(qkv, scale)
    with poisoned_empty():
        dqkv = K.attention_bwd(grad, qkv, out, lse, scale, deterministic=False)
    assert_all_written(dqkv, "dqkv")
    for i, name in enumerate("qkv"):
        assert_close_to_ref(dqkv[:, :, i], low_dqkv[:, :, i], ref_dqkv[:, :, i], 3.0, atol=1e-3, name=f"d{name}")


@pytest.mark.parametrize("deterministic", [False, True], ids=["one-pass", "deterministic"])
@pytest.mark.parametrize("L", [17, 130])
def test_gpu_heuristic_configs_in_interpreter(monkeypatch, L, deterministic):
    """The GPU's untuned launch path (heuristic blocks, the resource fallback loop) runs here
    too, in fp16, so its block sizes' indexing is proven before a GPU sees them."""
    monkeypatch.setattr(K, "interpreting", lambda: False)
    monkeypatch.setenv("FASTMASK_ATTN_AUTOTUNE", "0")
    _reload_env()  # fastmask reads the environment at import and on reload
    monkeypatch.setattr(K, "_fixed_choice", {})
    B, H, hd = 1, 2, 72
    qkv = _qkv(B, L, H, hd, seed=L).to(torch.float16)
    grad = torch.randn(B, L, H * hd).to(torch.float16)
    scale = hd**-0.5
    ref_out, ref_dqkv = _ref_grads(qkv.double(), grad.double(), scale)
    low_out, low_dqkv = _ref_grads(qkv, grad, scale, fn=attention_math)
    with poisoned_empty():
        out, lse = K.attention_fwd(qkv, scale)
        dqkv = K.attention_bwd(grad, qkv, out, lse, scale, deterministic=deterministic)
    assert {k[0] for k in K._fixed_choice} == {"fwd", *(("dq", "dkdv") if deterministic else ("delta", "bwd"))}
    assert_close_to_ref(out, low_out, ref_out, 2.0, atol=1e-3, name="out")
    assert_close_to_ref(dqkv, low_dqkv, ref_dqkv, 3.0, atol=1e-3, name="dqkv")


def test_compile_check_api():
    """What ahead-of-time compile checks read: the kernel, its fixed constexprs, the autotune
    configs and the heuristic config of every kind, consistent with the kernels' parameters."""
    assert set(K.KINDS) == set(K.KERNELS)
    for kind in K.KINDS:
        params = set(K.KERNELS[kind].arg_names)
        assert set(K.kind_constexprs(kind)) <= params
        for cfg in K.autotune_configs(kind):
            assert set(cfg.kwargs) <= params and cfg.num_warps in (4, 8)
        m, n, w, s = K.heuristic_config(kind, 128, 72, torch.bfloat16)
        assert "BLOCK_M" in params and m >= 16 and w in (4, 8) and s >= 1
    assert K.autotune_configs("delta") == [] and K.kind_constexprs("bwd") == {"ONE_PASS": True}
    assert K.KERNELS["bwd"] is K.KERNELS["dkdv"] and K.kind_constexprs("dkdv") == {"ONE_PASS": False}


def test_autotune_key_includes_batch_times_heads(monkeypatch, device):
    # a config tuned for the first batch seen must not be reused for every later B * H
    for kind in ("fwd", "dq", "dkdv", "bwd"):
        assert "BH_BUCKET" in K._tuned_kernel(kind).keys
    assert K._buckets(128, 16) != K._buckets(128, 4096)
    assert K._buckets(128, 3000) == K._buckets(128, 4096)  # bucketed: no retune per batch size
    spy = _KindSpy(monkeypatch)
    for B in (1, 5):
        qkv = _qkv(B, 9, 3, 16, device=device, seed=B)
        K.attention_fwd(qkv, 0.25)
        kind, args = spy.calls[-1]
        names = K.KERNELS[kind].arg_names
        assert args[names.index("BH_BUCKET")] == K._bh_bucket(B * 3)
        assert args[names.index("L_BUCKET")] == K._l_bucket(9)


@pytest.mark.parametrize("scale", [4.0, -0.7])
def test_extreme_and_negative_scale(scale, device):
    # large logits would overflow a naive exp; a negative scale flips which score is largest
    qkv = _qkv(1, 19, 2, 32, device=device, seed=2) * 3
    grad_out = torch.randn(1, 19, 64, device=device)
    ref_out, ref_dqkv = _ref_grads(qkv, grad_out, scale, dtype=torch.float64)
    out, lse = K.attention_fwd(qkv, scale)
    dqkv = K.attention_bwd(grad_out, qkv, out, lse, scale)
    assert torch.isfinite(out).all() and torch.isfinite(dqkv).all()
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse.double(), _lse_ref(qkv, scale), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dqkv.double(), ref_dqkv, atol=1e-3, rtol=1e-3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # exp2 overflow in rows the kernels discard
def test_all_scores_very_negative(device):
    # every score ~ -160: exp(-lse) overflows fp32, so padded keys must be masked, not just zero
    qkv = _qkv(1, 17, 2, 32, device=device, seed=6).abs() + 1
    scale = -2.0
    grad_out = torch.randn(1, 17, 64, device=device)
    ref_out, ref_dqkv = _ref_grads(qkv, grad_out, scale, dtype=torch.float64)
    out, lse = K.attention_fwd(qkv, scale)
    dqkv = K.attention_bwd(grad_out, qkv, out, lse, scale)
    assert lse.max() < -100
    torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dqkv.double(), ref_dqkv, atol=1e-3, rtol=1e-3)


def test_strided_qkv_view(device):
    # qkv as a view into a wider buffer (row stride larger than 3 * H * hd): strides, not copies
    B, L, H, hd = 2, 17, 2, 40
    buf = _qkv(B, L, 4, hd, device=device, seed=3)  # [B, L, 3, 4, hd]
    qkv = buf[:, :, :, 1:3]
    assert not qkv.is_contiguous()
    scale = 0.2
    out, lse = K.attention_fwd(qkv, scale)
    grad_out = torch.randn_like(out)
    dqkv = K.attention_bwd(grad_out, qkv, out, lse, scale)
    ref_out, ref_dqkv = _ref_grads(qkv.contiguous(), grad_out, scale)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv, ref_dqkv, atol=5e-5, rtol=1e-4)


def test_layout_fallback_copies(device):
    # heads not packed (stride(3) != hd): the launcher makes qkv contiguous first
    B, L, H, hd = 1, 9, 2, 24
    qkv = torch.randn(B, L, 3, hd, H, device=device).transpose(-1, -2)
    assert qkv.stride(-1) != 1
    out, lse = K.attention_fwd(qkv, 0.3)
    grad_out = torch.randn_like(out)
    dqkv = K.attention_bwd(grad_out, qkv, out, lse, 0.3)
    ref_out, ref_dqkv = _ref_grads(qkv.contiguous(), grad_out, 0.3)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv, ref_dqkv, atol=5e-5, rtol=1e-4)


def test_empty_batch(device):
    qkv = torch.zeros(0, 5, 3, 2, 16, device=device)
    out, lse = K.attention_fwd(qkv, 0.25)
    assert out.shape == (0, 5, 32) and lse.shape == (0, 2, 5)
    assert K.attention_bwd(torch.zeros_like(out), qkv, out, lse, 0.25).shape == qkv.shape


@pytest.mark.parametrize("scale", [None, 0.3])
def test_public_op_forward_backward(scale, device):
    B, L, H, hd = 2, 17, 2, 72
    qkv = _qkv(B, L, H, hd, device=device, seed=4)
    grad_out = torch.randn(B, L, H * hd, device=device)
    ref_scale = 1.0 / math.sqrt(hd) if scale is None else scale
    ref_out, ref_dqkv = _ref_grads(qkv, grad_out, ref_scale)
    x = qkv.clone().requires_grad_(True)
    with fastmask.backend("triton"):
        out = fastmask.ops.attention(x, scale)
    out.backward(grad_out)
    torch.testing.assert_close(out.detach(), ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, ref_dqkv, atol=5e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- CPU interpreter, 16-bit


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_interpreter(dtype, device):
    # bf16 runs with fp32 dot operands in the interpreter (its bf16 tl.dot is wrong); the GPU
    # tests are the judge for bf16 tensor-core numerics.
    B, L, H, hd = 1, 40, 2, 72
    qkv32 = _qkv(B, L, H, hd, device=device, seed=5)
    qkv = qkv32.to(dtype)
    scale = hd**-0.5
    grad32 = torch.randn(B, L, H * hd, device=device)
    grad = grad32.to(dtype)
    ref_out, ref_dqkv = _ref_grads(qkv.double(), grad.double(), scale)  # exact, on the rounded inputs
    low_out, low_dqkv = _ref_grads(qkv, grad, scale, fn=attention_math)  # PyTorch in the same dtype
    out, lse = K.attention_fwd(qkv, scale)
    dqkv = K.attention_bwd(grad, qkv, out, lse, scale)
    assert out.dtype == dtype and dqkv.dtype == dtype
    assert_close_to_ref(out, low_out, ref_out, 2.0, atol=1e-3, name="out")
    for i, name in enumerate("qkv"):
        assert_close_to_ref(dqkv[:, :, i], low_dqkv[:, :, i], ref_dqkv[:, :, i], 3.0, atol=1e-3, name=f"d{name}")


# ----------------------------------------------------------------------------- GPU

DIT_SHAPES = [  # (B, H, L, hd): DiT-XL/2 encoder at 256 (masked and not), decoder, 512 res
    (8, 16, 128, 72),
    (8, 16, 256, 32),
    (4, 16, 512, 72),
    (2, 16, 1024, 72),
    (3, 6, 123, 64),  # DiT-S head dim, awkward length
    (1, 12, 59, 40),
]


# Autotuning compiles ~16 kernels per (head dim, dtype): tune bf16 only, and check the
# untuned heuristic configs (FASTMASK_ATTN_AUTOTUNE=0) in both dtypes.
MODES = [(torch.bfloat16, "autotune"), (torch.bfloat16, "heuristic"), (torch.float16, "heuristic")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,mode", MODES, ids=["bf16-autotune", "bf16-heuristic", "fp16-heuristic"])
@pytest.mark.parametrize("B,H,L,hd", DIT_SHAPES, ids=[f"B{b}-H{h}-L{l}-hd{d}" for b, h, l, d in DIT_SHAPES])
def test_gpu_dit_shapes_vs_sdpa(B, H, L, hd, dtype, mode, monkeypatch):
    monkeypatch.setenv("FASTMASK_ATTN_AUTOTUNE", "1" if mode == "autotune" else "0")
    _reload_env()  # fastmask reads the environment at import and on reload
    qkv = _qkv(B, L, H, hd, dtype=dtype, device="cuda", seed=L + hd)
    grad = torch.randn(B, L, H * hd, device="cuda", dtype=dtype)
    scale = hd**-0.5
    ref_out, ref_dqkv = _ref_grads(qkv.double(), grad.double(), scale)
    sdpa_out, sdpa_dqkv = _ref_grads(qkv, grad, scale, fn=sdpa_attention)
    with poisoned_empty():
        out, lse = K.attention_fwd(qkv, scale)
        dqkv = K.attention_bwd(grad, qkv, out, lse, scale)
    assert_all_written(out, "out")
    assert_all_written(dqkv, "dqkv")
    assert_close_to_ref(out, sdpa_out, ref_out, 2.0, atol=1e-4, name="out")
    torch.testing.assert_close(lse.double(), _lse_ref(qkv, scale), atol=2e-3, rtol=1e-3)
    for i, name in enumerate("qkv"):
        assert_close_to_ref(dqkv[:, :, i], sdpa_dqkv[:, :, i], ref_dqkv[:, :, i], 3.0, atol=1e-4, name=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("hd,L", [(8, 1), (72, 17), (40, 77), (128, 200)])
def test_gpu_fp32_and_tails(hd, L):
    qkv = _qkv(2, L, 3, hd, device="cuda", seed=hd)
    grad = torch.randn(2, L, 3 * hd, device="cuda")
    scale = hd**-0.5
    ref_out, ref_dqkv = _ref_grads(qkv.double(), grad.double(), scale)
    with poisoned_empty():
        out, lse = K.attention_fwd(qkv, scale)
        dqkv = K.attention_bwd(grad, qkv, out, lse, scale)
    assert_all_written(dqkv, "dqkv")
    tol = 1e-4 if not torch.backends.cuda.matmul.allow_tf32 else 2e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(dqkv.double(), ref_dqkv, atol=tol * 5, rtol=tol * 5)


@pytest.mark.gpu
def test_gpu_public_op_bf16():
    qkv = _qkv(4, 128, 16, 72, dtype=torch.bfloat16, device="cuda", seed=7).requires_grad_(True)
    with fastmask.backend("triton"):
        out = fastmask.ops.attention(qkv)
    out.float().square().sum().backward()
    ref = qkv.detach().double().requires_grad_(True)
    ref_out = attention_math(ref)
    ref_out.square().sum().backward()
    low = qkv.detach().clone().requires_grad_(True)
    low_out = sdpa_attention(low)
    low_out.float().square().sum().backward()
    assert_close_to_ref(out.detach(), low_out.detach(), ref_out.detach(), 2.0, atol=1e-4)
    assert_close_to_ref(qkv.grad, low.grad, ref.grad, 3.0, atol=1e-3, name="dqkv")


@pytest.mark.gpu
def test_gpu_backward_repeat_large_batch():
    # B * L * 3 * H * hd = 256 * 128 * 3 * 16 * 72 ~ 1.1e8 elements per tensor
    qkv = _qkv(256, 128, 16, 72, dtype=torch.bfloat16, device="cuda", seed=8)
    scale = 72**-0.5
    out, lse = _assert_backward_repeats(qkv, scale, repeats=3)
    out2, lse2 = K.attention_fwd(qkv, scale)
    assert torch.equal(out2, out) and torch.equal(lse2, lse)
    assert max_err(out, sdpa_attention(qkv, scale)) < 0.05


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_int64_offsets():
    # qkv with more than 2**31 elements: offsets must not wrap (needs ~13 GB of GPU memory)
    L, H, hd = 128, 16, 72
    B = (2**31) // (L * 3 * H * hd) + 2  # 4856: qkv 4.3 GB in bf16, ~12 GB in all
    try:
        qkv = torch.randn(B, L, 3, H, hd, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a > 2**31-element qkv")
    assert qkv.numel() > 2**31
    scale = hd**-0.5
    out, lse = K.attention_fwd(qkv, scale)
    tail = qkv[-2:]
    torch.testing.assert_close(out[-2:], sdpa_attention(tail, scale), atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(out)
    dqkv = K.attention_bwd(grad, qkv, out, lse, scale)
    _, ref = _ref_grads(tail, grad[-2:], scale, fn=sdpa_attention)
    torch.testing.assert_close(dqkv[-2:], ref, atol=5e-2, rtol=5e-2)

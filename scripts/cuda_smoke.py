"""One small call of every CUDA kernel of fastmask (fastmask.cuda_ext), each checked loosely
against fastmask.ops.reference: the workload that scripts/compute_sanitizer.sh runs under
compute-sanitizer, also a quick smoke test on its own.

The cases cover both instantiations (16-byte vectors, and the scalar path of D % 8 != 0),
rows wider than the register caches (re-read path), narrow and multi-warp row groups
(shared-memory sums), batch splits with multi-pass partial reductions, masks and no masks.

    python scripts/cuda_smoke.py              # build (if needed) and run
    python scripts/cuda_smoke.py --build-only # build / load the extension, run nothing
    python scripts/cuda_smoke.py --emulate    # no GPU: the same calls on the CPU emulator
                                              # of tests/cuda_emu (a dry run of this script)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastmask  # noqa: E402
from fastmask import cuda_ext  # noqa: E402
from fastmask.ops import reference as R  # noqa: E402

EPS = 1e-6
DEV = "cuda"  # "cpu" with --emulate
failures: list[str] = []


def check(name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    # fp16 results as small as loss gradients (~1e-6) are subnormal: allow their spacing.
    atol = 2.0**-24 if ours.dtype == torch.float16 else 0.0
    ours, ref = ours.float(), ref.float()
    scale = max(ref.abs().max().item(), 1e-30)
    err = (ours - ref).abs().max().item() if ours.numel() else 0.0
    ok = bool(torch.isfinite(ours).all()) and err <= rtol * scale + atol
    print(f"  {'ok ' if ok else 'BAD'} {name:<44} max err {err:.2e} (scale {scale:.2e})")
    if not ok:
        failures.append(name)


def tol(dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


def tokens(B, N, K, D, dtype, with_pos):
    tag = f"tokens B{B} N{N} K{K} D{D} {str(dtype)[6:]} pos={with_pos}"
    x = torch.randn(B, N, D, device=DEV, dtype=dtype)
    ids = torch.stack([torch.randperm(N, device=DEV)[:K] for _ in range(B)])
    pos = torch.randn(N, D, device=DEV) if with_pos else None
    out = cuda_ext.gather_tokens_fwd(x, ids, pos)
    check(f"{tag} gather", out, R.gather_tokens(x, ids, pos), tol(dtype))
    g = torch.randn(B, K, D, device=DEV, dtype=dtype)
    gx, gpos = cuda_ext.gather_tokens_bwd(g, ids, N, with_pos)
    check(f"{tag} gather grad_x", gx, torch.zeros_like(x).scatter(1, ids[..., None].expand(-1, -1, D), g), 0)
    if with_pos:
        check(f"{tag} gather grad_pos", gpos, torch.zeros(B, N, D, device=DEV).scatter(
            1, ids[..., None].expand(-1, -1, D), g.float()).sum(0), 1e-5)
    mt = torch.randn(D, device=DEV)
    out = cuda_ext.unmask_tokens_fwd(g, ids, mt, N, pos)
    check(f"{tag} unmask", out, R.unmask_tokens(g, ids, mt, N, pos), tol(dtype))
    go = torch.randn(B, N, D, device=DEV, dtype=dtype)
    gxv, gmt, gpos = cuda_ext.unmask_tokens_bwd(go, ids, with_pos)
    check(f"{tag} unmask grad_x_vis", gxv, torch.gather(go, 1, ids[..., None].expand(-1, -1, D)), 0)
    dropped = torch.ones(B, N, device=DEV).scatter(1, ids, 0.0)
    check(f"{tag} unmask grad_mask_token", gmt, (go.float() * dropped[..., None]).sum((0, 1)), 1e-5)
    if with_pos:
        check(f"{tag} unmask grad_pos", gpos, go.float().sum(0), 1e-5)


def norm(B, L, D, dtype, vdtype):
    tag = f"norm B{B} L{L} D{D} {str(dtype)[6:]}/{str(vdtype)[6:]}"
    x = torch.randn(B, L, D, device=DEV, dtype=dtype) + 0.5
    y = torch.randn(B, L, D, device=DEV, dtype=dtype)
    gate, shift, scale = (0.5 * torch.randn(B, D, device=DEV, dtype=vdtype) for _ in range(3))
    g1 = torch.randn(B, L, D, device=DEV, dtype=dtype)
    g2 = torch.randn(B, L, D, device=DEV, dtype=dtype)

    def ref_grads(fn, inputs, grads):
        leaves = [t.float().detach().requires_grad_() for t in inputs]
        outs = fn(*leaves)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        torch.autograd.backward(outs, [g.float() for g in grads])
        return outs, [t.grad for t in leaves]

    out, mean, rstd = cuda_ext.layernorm_modulate_fwd(x, shift, scale, EPS)
    grads = cuda_ext.layernorm_modulate_bwd(g1, x, scale, mean, rstd)
    (o32,), g32 = ref_grads(lambda a, b, c: R.layernorm_modulate(a, b, c, EPS), [x, shift, scale], [g1])
    check(f"{tag} layernorm_modulate", out, o32, tol(dtype))
    for n, a, b in zip(["grad_x", "grad_shift", "grad_scale"], grads, g32):
        check(f"{tag} layernorm_modulate {n}", a, b, 3 * tol(dtype))

    out = cuda_ext.gated_residual_fwd(x, y, gate)
    grads = cuda_ext.gated_residual_bwd(g1, y, gate)
    (o32,), g32 = ref_grads(R.gated_residual, [x, y, gate], [g1])
    check(f"{tag} gated_residual", out, o32, tol(dtype))
    for n, a, b in zip(["grad_x", "grad_y", "grad_gate"], grads, g32):
        check(f"{tag} gated_residual {n}", a, b, 3 * tol(dtype))

    x_new, out, mean, rstd = cuda_ext.residual_layernorm_modulate_fwd(x, y, gate, shift, scale, EPS)
    grads = cuda_ext.residual_layernorm_modulate_bwd(g1, g2, x_new, y, gate, scale, mean, rstd)
    (xn32, o32), g32 = ref_grads(lambda *a: R.residual_layernorm_modulate(*a, EPS), [x, y, gate, shift, scale],
                                 [g1, g2])
    check(f"{tag} residual_ln x_new", x_new, xn32, tol(dtype))
    check(f"{tag} residual_ln out", out, o32, 3 * tol(dtype))
    for n, a, b in zip(["grad_x", "grad_y", "grad_gate", "grad_shift", "grad_scale"], grads, g32):
        check(f"{tag} residual_ln {n}", a, b, 4 * tol(dtype))


def loss(B, N, P, dtype, xdtype, with_mask):
    tag = f"loss B{B} N{N} P{P} {str(dtype)[6:]}/{str(xdtype)[6:]} mask={with_mask}"
    y = torch.randn(B, N, P, device=DEV)
    sigma = torch.exp(torch.randn(B, device=DEV) * 1.2 - 1.2)
    xn = y + sigma.view(-1, 1, 1) * torch.randn_like(y)
    F = torch.randn(B, N, P, device=DEV).to(dtype)
    mask = (torch.rand(B, N, device=DEV) < 0.5).float() if with_mask else None
    xn, y = xn.to(xdtype), y.to(xdtype)
    l, terms, gF = cuda_ext.dsm_mae_loss_fwd(F, xn, y, sigma, mask, 0.1, 0.5)
    Fl = F.float().requires_grad_()
    dsm, mae = R.dsm_mae_loss_terms(Fl, xn.float(), y.float(), sigma, mask, 0.5)
    ref = dsm + 0.1 * mae
    ref.sum().backward()
    check(f"{tag} loss", l, ref.detach(), 1e-4)
    check(f"{tag} terms", terms, torch.stack([dsm, mae], 1).detach(), 1e-4)
    check(f"{tag} grad_F", gF, Fl.grad, tol(dtype))


def public_ops():
    B, N, D = 2, 59, 72
    x = torch.randn(B, N, D, device=DEV, requires_grad=True)
    ids, _, _ = fastmask.ops.random_mask(B, N, 0.5, device=DEV)
    with fastmask.backend("cuda"):
        out = fastmask.ops.layernorm_modulate(fastmask.ops.gather_tokens(x, ids), x[:, 0], x[:, 1])
    out.sum().backward()
    ref = R.layernorm_modulate(R.gather_tokens(x.detach(), ids), x[:, 0].detach(), x[:, 1].detach())
    check("public ops, backend('cuda')", out, ref, 1e-4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--emulate", action="store_true", help="run the kernels on the CPU emulator (no GPU)")
    args = ap.parse_args()
    global DEV
    if args.emulate:
        from fastmask.ops import dispatch

        path = Path(__file__).resolve().parent.parent / "tests" / "cuda_emu" / "build.py"
        cuda_ext._ext = cuda_ext.load_file(path, "_fastmask_cuda_emu_build").load_emulated()
        why_not = dispatch.why_not  # let the dispatcher send CPU tensors to the "cuda" backend
        dispatch.why_not = lambda name, op, ts: None if name == "cuda" else why_not(name, op, ts)
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device visible", file=sys.stderr)
        return 2
    if not args.emulate and cuda_ext.unavailable_reason() is not None:
        print("cuda_smoke: building the extension with build_jit() ...", flush=True)
        cuda_ext.build_jit(verbose=False)
    if args.build_only:
        print("cuda_smoke: extension ready")
        return 0
    torch.manual_seed(0)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    for case in [(1, 59, 29, 72, bf16, True), (3, 64, 32, 1152, fp16, True), (2, 17, 17, 20, fp32, False),
                 (2, 16, 8, 1154, bf16, True)]:
        tokens(*case)
    for case in [(1, 59, 72, bf16, fp32), (2, 9, 1152, fp16, fp16), (2, 5, 1154, bf16, bf16), (1, 2, 8256, fp32, fp32),
                 (1, 300, 64, bf16, fp32)]:
        norm(*case)
    for case in [(2, 59, 16, bf16, bf16, True), (1, 64, 16, fp32, fp32, False), (2, 16, 4, fp16, fp32, True),
                 (2, 8, 768, bf16, fp32, True), (1, 4, 1030, fp16, fp16, True)]:
        loss(*case)
    public_ops()
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"cuda_smoke: {'all ok' if not failures else str(len(failures)) + ' BAD: ' + ', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

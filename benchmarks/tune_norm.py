"""Sweep the launch configurations of the adaLN kernels (fastmask/kernels/norm.py) on a GPU.

For each op (LayerNorm-modulate, the residual fusion, the gated residual; RMSNorm-modulate
with a weight) at the MaskDiT-XL/2 shapes, every forward tile (rows per tile, warps) and every
backward tile and rows-per-program split is timed as kernels (CUDA-graph replay, L2 flushed:
``benchmarks.common.graph_ms``), next to the rule the launchers use today. Each result is
checked against the rule's output (the split changes only the fp32 summation order of the
per-sample parameter gradients). Prints a table per case and writes JSON.

    python benchmarks/tune_norm.py --out OUT.json [--quick]

GPU only; the rule in the launchers is chosen from what this prints (see the kernel module).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks import common  # noqa: E402
from fastmask.kernels import norm  # noqa: E402

# op -> (has_res, has_ln, rms with weight)
KINDS = {
    "layernorm_modulate": (False, True, False),
    "residual_layernorm_modulate": (True, True, False),
    "gated_residual": (True, False, False),
    "residual_rmsnorm_modulate": (True, True, True),
}
# (name, B, L, D): the XL/2 encoder on 128 kept tokens and the decoder on 256 at 256 px;
# the encoder at 512 px (16 x 512 kept tokens)
SHAPES = [("enc256", 64, 128, 1152), ("dec256", 64, 256, 512), ("enc512", 16, 512, 1152)]


def tiles(D: int, bwd: bool) -> list[tuple[int, int]]:
    """(rows per tile, warps) candidates: 8-16 elements per thread in the forward (16-byte bf16
    vectors and up), 4-16 in the backward (three fp32 accumulators per element); 4-16 warps."""
    block_d = triton.next_power_of_2(D)
    out = []
    for r in (1, 2, 4, 8, 16):
        for w in (4, 8, 16):
            per_thread = r * block_d // (32 * w)
            if (4 if bwd else 8) <= per_thread <= 16:
                out.append((r, w))
    return out


def inputs(kind: str, B: int, L: int, D: int, dtype):
    has_res, has_ln, rms = KINDS[kind]
    g = torch.Generator(device="cuda").manual_seed(0)

    def t(*shape, dt=dtype):
        return torch.randn(*shape, device="cuda", dtype=dt, generator=g)

    x, y = t(B, L, D), t(B, L, D)
    gate, shift, scale = t(B, D) * 0.5, t(B, D) * 0.5, t(B, D) * 0.5
    w = 1 + 0.1 * t(D, dt=torch.float32) if rms else None
    return dict(x=x, y=y if has_res else None, gate=gate if has_res else None, shift=shift if has_ln else None,
                scale=scale if has_ln else None, weight=w, g_out=t(B, L, D) if has_ln else None,
                g_xn=t(B, L, D) if has_res else None)


def run_fwd(kind, a, config=None):
    has_res, has_ln, rms = KINDS[kind]
    return norm._fwd(a["x"], a["y"], a["gate"], a["shift"], a["scale"], 1e-6, has_res=has_res, has_ln=has_ln,
                     rms=rms, weight=a["weight"], config=config)


def run_bwd(kind, a, saved, config=None):
    has_res, has_ln, rms = KINDS[kind]
    x_new, _, mean, rstd = saved
    return norm._bwd(a["g_xn"], a["g_out"], x_new if has_ln else None, a["y"], a["gate"], a["scale"], mean, rstd,
                     has_res=has_res, has_ln=has_ln, rms=rms, weight=a["weight"], config=config)


def bytes_moved(kind, B, L, D, esize, bwd: bool) -> int:
    has_res, has_ln, _ = KINDS[kind]
    n = B * L * D * esize
    if not bwd:
        return n * (1 + 2 * has_res + has_ln)  # x (+y, x_new) (+out)
    if has_res and has_ln:
        return 6 * n  # g_xn, g_out, x_new, y in; gx, gy out
    return 3 * n  # ln: g_out, x in, gx out; gr: g_xn, y in, gy out


def max_diff(a, b) -> float:
    d = 0.0
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and u.numel():
            d = max(d, (u.float() - v.float()).abs().max().item())
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="the 256 px shapes and the LayerNorm ops only")
    ap.add_argument("--deadline", type=float, default=0, help="seconds; stop sweeping after this")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_norm: needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.time()
    ceil = common.measure_ceilings()
    gbps = ceil["copy_gbps"]
    print(f"copy bandwidth {gbps:.0f} GB/s", flush=True)
    rows = []
    dtype = torch.bfloat16
    kinds = list(KINDS)[:3] if args.quick else list(KINDS)
    shapes = SHAPES[:2] if args.quick else SHAPES
    for sname, B, L, D in shapes:
        for kind in kinds:
            if args.deadline and time.time() - t0 > args.deadline:
                break
            a = inputs(kind, B, L, D, dtype)
            saved = run_fwd(kind, a)
            ref_bwd = run_bwd(kind, a, saved)
            for direction in ("fwd", "bwd"):
                nbytes = bytes_moved(kind, B, L, D, 2, direction == "bwd")
                rule = common.graph_ms(lambda: run_fwd(kind, a) if direction == "fwd" else run_bwd(kind, a, saved))
                res = [("rule", rule.get("gpu_ms"), 0.0)]
                configs = []
                if direction == "fwd":
                    configs = [(r, w) for r, w in tiles(D, False)]
                else:
                    for r, w in tiles(D, True):
                        for rp in sorted({max(r, x) for x in (8, 16, 32, 64, L)}):
                            if rp <= L and rp % r == 0:
                                configs.append((r, w, rp))
                for cfg in configs:
                    try:
                        if direction == "fwd":
                            diff = max_diff(run_fwd(kind, a, cfg), saved)
                            ms = common.graph_ms(lambda: run_fwd(kind, a, cfg)).get("gpu_ms")
                        else:
                            diff = max_diff(run_bwd(kind, a, saved, cfg), ref_bwd)
                            ms = common.graph_ms(lambda: run_bwd(kind, a, saved, cfg)).get("gpu_ms")
                    except Exception as e:  # a config the compiler refuses (shared memory, registers)
                        print(f"  {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                        continue
                    res.append((cfg, ms, diff))
                res = [x for x in res if x[1]]
                best = min(res, key=lambda x: x[1])
                print(f"{sname} {kind} {direction} B={B} L={L} D={D}: rule {rule.get('gpu_ms', 0)*1e3:.1f} us "
                      f"({nbytes / (rule.get('gpu_ms', 1e9) * 1e-3) / 1e9 / gbps:.0%}); best {best[0]} "
                      f"{best[1]*1e3:.1f} us ({nbytes / (best[1] * 1e-3) / 1e9 / gbps:.0%})", flush=True)
                for cfg, ms, diff in sorted(res, key=lambda x: x[1])[:8]:
                    print(f"    {str(cfg):>16} {ms*1e3:8.1f} us {nbytes / (ms * 1e-3) / 1e9 / gbps:6.0%}  diff {diff:.2e}")
                rows.append(dict(shape=sname, B=B, L=L, D=D, kind=kind, direction=direction, bytes=nbytes,
                                 results=[dict(config=c, gpu_ms=m, max_diff=d) for c, m, d in res]))
            del a, saved, ref_bwd
    doc = dict(env=common.env_info(), ceilings=ceil, rows=rows, seconds=round(time.time() - t0, 1))
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

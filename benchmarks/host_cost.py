"""Host cost of one call of each public op: fastmask against the same PyTorch expression.

On tiny tensors the device work is negligible, so the time per call is what the host spends to
issue it: argument checks, the backend choice, the autograd wiring and the launch. On the CPU
every public op runs the PyTorch reference (fastmask's "equivalent PyTorch code"), so the ratio
fastmask / torch is the price of going through fastmask (target: at most 1.3x). On a GPU the
fastmask column is the Triton path (``--backend triton``) and the torch column the same
reference expression on CUDA tensors.

A second table times the autograd wiring alone, with the same trivial body: a
``torch.library.custom_op`` pair (what torch.compile traces) against a
``torch.autograd.Function`` (what an eager call of a fast op now runs).

    python benchmarks/host_cost.py                      # CPU, prints the tables
    python benchmarks/host_cost.py --out benchmarks/results/host_cost_cpu.json
    python benchmarks/host_cost.py --device cuda --backend triton --out OUT.json   # on a GPU

Timing: the best of ``--repeat`` rounds of ``--calls`` calls (best-of, since a shared machine
only ever adds time); one torch thread; CUDA synchronised once per round, after the calls.
No test asserts these numbers: they are written down with device, versions and commit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (benchmarks/common.py: device name, versions, commit)

import fastmask  # noqa: E402
from fastmask import ops  # noqa: E402
from fastmask.ops import reference as R  # noqa: E402


def _inputs(device: str, dtype: torch.dtype, grad: bool):
    g = torch.Generator().manual_seed(0)

    def t(*shape, req=grad):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(req)

    B, N, K, D, H = 2, 16, 8, 64, 4
    ids = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)]).to(device)
    mask = ops.mask_from_ids(ids, N)
    return dict(
        B=B, N=N, K=K, D=D, H=H, x=t(B, N, D), y=t(B, N, D), xv=t(B, K, D), shift=t(B, D), scale=t(B, D),
        gate=t(B, D), qkv=t(B, N, 3, H, D // H), ids=ids, pos=t(N, D, req=False), mt=t(D),
        F=t(B, N, 8), xn=t(B, N, 8, req=False), yy=t(B, N, 8, req=False),
        sigma=(torch.rand(B, generator=g) + 0.1).to(device), mask=mask,
    )


def cases(a: dict) -> dict:
    """op -> (fastmask call, the same torch expression); both return what a loss would sum."""
    return {
        "layernorm_modulate": (lambda: ops.layernorm_modulate(a["x"], a["shift"], a["scale"]),
                               lambda: R.layernorm_modulate(a["x"], a["shift"], a["scale"])),
        "gated_residual": (lambda: ops.gated_residual(a["x"], a["y"], a["gate"]),
                           lambda: R.gated_residual(a["x"], a["y"], a["gate"])),
        "residual_layernorm_modulate": (
            lambda: ops.residual_layernorm_modulate(a["x"], a["y"], a["gate"], a["shift"], a["scale"])[1],
            lambda: R.residual_layernorm_modulate(a["x"], a["y"], a["gate"], a["shift"], a["scale"])[1]),
        "gather_tokens": (lambda: ops.gather_tokens(a["x"], a["ids"], a["pos"], check_ids=False),
                          lambda: R.gather_tokens(a["x"], a["ids"], a["pos"])),
        "unmask_tokens": (lambda: ops.unmask_tokens(a["xv"], a["ids"], a["mt"], a["N"], a["pos"], check_ids=False),
                          lambda: R.unmask_tokens(a["xv"], a["ids"], a["mt"], a["N"], a["pos"])),
        "attention": (lambda: ops.attention(a["qkv"]), lambda: R.attention(a["qkv"])),
        "dsm_mae_loss": (lambda: ops.dsm_mae_loss(a["F"], a["xn"], a["yy"], a["sigma"], a["mask"], check_values=False),
                         lambda: R.dsm_mae_loss(a["F"], a["xn"], a["yy"], a["sigma"], a["mask"])),
    }


def best_us(fns, calls: int, repeat: int, sync) -> list[float]:
    """Best time per call (us) of each function; the rounds of the functions alternate, so a
    busy spell of a shared machine falls on all of them alike."""
    for fn in fns:
        for _ in range(max(20, calls // 10)):
            fn()
    sync()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            best[i] = min(best[i], (time.perf_counter() - t0) / calls * 1e6)
    return best


def _fwd_bwd(fn):
    def run():
        fn().float().sum().backward()

    return run


def _twice(x: Tensor, backend: str) -> Tensor:
    return x * 2


def _trivial_op(name: str):
    """A custom op computing ``x * 2`` (the trivial body both wirings share)."""
    op = torch.library.custom_op(f"fastmask_bench::{name}", mutates_args=())(_twice)
    op.register_fake(lambda x, backend: torch.empty_like(x))
    return op


def wiring_rows(calls: int, repeat: int) -> list[dict]:
    """custom_op pair vs autograd.Function around the same trivial body (CPU)."""
    twice, twice_bwd = _trivial_op("twice"), _trivial_op("twice_backward")

    def setup(ctx, inputs, output):
        ctx.backend = inputs[1]

    twice.register_autograd(lambda ctx, g: (twice_bwd(g, ctx.backend), None), setup_context=setup)

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, backend):
            ctx.backend = backend
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2, None

    x = torch.randn(4, 4, requires_grad=True)
    nosync = lambda: None  # noqa: E731
    rows = []
    for mode, wrap, n in (("forward", lambda f: f, calls), ("forward+backward", _fwd_bwd, calls // 3)):
        co, fn = best_us([wrap(lambda: twice(x, "triton")), wrap(lambda: Twice.apply(x, "triton"))], n, repeat,
                         nosync)
        rows.append({"mode": mode, "custom_op_us": round(co, 2), "autograd_function_us": round(fn, 2),
                     "saved_us": round(co - fn, 2)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", help="fastmask backend for the fastmask column (auto, triton, ...)")
    p.add_argument("--calls", type=int, default=600, help="calls per round")
    p.add_argument("--repeat", type=int, default=15, help="rounds (the best one counts)")
    p.add_argument("--out", help="write the rows and the environment to this JSON file (and a .md beside it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    rows = []
    for mode in ("forward", "forward+backward"):
        a = _inputs(dev, dtype, grad=mode != "forward")
        for op, (fm, ref) in cases(a).items():
            if mode != "forward":
                fm, ref = _fwd_bwd(fm), _fwd_bwd(ref)
            n = args.calls if mode == "forward" else max(args.calls // 3, 10)
            # (the default "auto" is timed as a program calls the ops: outside any backend() block)
            with (fastmask.backend(args.backend) if args.backend != "auto" else contextlib.nullcontext()):
                t_fm, t_ref = best_us([fm, ref], n, args.repeat, sync)
            with fastmask.backend(args.backend), ops.record_choices() as ran:
                fm()
            rows.append({"op": op, "mode": mode, "fastmask_us": round(t_fm, 2), "torch_us": round(t_ref, 2),
                         "ratio": round(t_fm / t_ref, 3), "backend": ",".join(sorted(ran.get(op, ())))})
    wiring = wiring_rows(args.calls, args.repeat)
    env = common.env_info()
    lines = [f"Host cost per call ({env['device']}, torch {env['torch']}, {dtype}, 1 thread, "
             f"commit {env.get('commit')}, {env['date']})", "",
             "| op | mode | fastmask backend | fastmask (us) | same torch expression (us) | ratio |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['mode']} | {r['backend']} | {r['fastmask_us']:.1f} | {r['torch_us']:.1f} | "
              f"{r['ratio']:.2f}x |" for r in rows]
    lines += ["", "Autograd wiring around the same trivial body (CPU):", "",
              "| mode | custom_op pair (us) | autograd.Function (us) | saved (us) |", "|---|---|---|---|"]
    lines += [f"| {w['mode']} | {w['custom_op_us']:.1f} | {w['autograd_function_us']:.1f} | {w['saved_us']:.1f} |"
              for w in wiring]
    table = "\n".join(lines)
    print(table)
    worst = max(r["ratio"] for r in rows)
    print(f"\nworst ratio: {worst:.2f}x (target <= 1.3x on the CPU)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"env": env, "rows": rows, "wiring": wiring}, indent=1) + "\n")
        out.with_suffix(".md").write_text(table + f"\n\nworst ratio: {worst:.2f}x\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

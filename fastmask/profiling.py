"""Where a training step spends its time, per op kind, and its model FLOP utilisation: ``fastmask profile``.

    fastmask profile --config XL/2 --input-size 32 --batch 64 --mask-ratio 0.5 \\
        --backend auto --steps 5 --trace step.json

runs a few training steps (forward, backward, AdamW step; bf16 autocast on a GPU) under
``torch.profiler`` and prints the time per op kind -- matmul, attention, norm/modulate,
gather/unmask, loss, optimizer, other -- with its share of the step, the step time, images/s
and the model FLOP utilisation against a measured bf16 matmul rate. ``--trace`` writes a
Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev).

How time is attributed: while profiling, every public fastmask op (``fastmask.ops.*``) runs
inside a ``fastmask.op.<name>`` profiler range; an event inside such a range -- or inside the
backward of an autograd node created there (matched by sequence number) -- belongs to that
op's kind, whatever the backend (reference or fused kernels). Outside them, matmul-like ATen
ops (mm, addmm, bmm, convolution) count as matmul, the optimizer's ranges as optimizer, the
rest as other. Each event counts its self time: device (kernel) time on a GPU, CPU time on
the CPU. Under ``--compile`` Inductor fuses across these boundaries, so most of the time
lands in "other"; profile eagerly to see the split.

The FLOP count behind MFU is :func:`fastmask.models.traced_flops` (any family); the benchmark suite's
training setups are in ``benchmarks/setups.py``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from . import ops as _ops
from .models import ARCHITECTURES, EDMPrecond, compile_model, traced_flops
from .ops import dispatch as _dispatch
from .ops import registry

CATEGORIES = registry.CATEGORIES
# The fused ops' categories come from their declarations; the two mask helpers are plain torch.
_OP_CATEGORY = {**registry.categories(), "random_mask": "gather/unmask", "mask_from_ids": "gather/unmask"}
_RANGE_PREFIX = "fastmask.op."
_OPTIMIZER_RANGES = ("fastmask.optimizer", "Optimizer.step#", "Optimizer.zero_grad#")
_MATMUL_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::matmul",
    "aten::linear",
    "aten::convolution",
    "aten::_convolution",
    "aten::cudnn_convolution",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_addmm_activation",
)


# ----------------------------------------------------------------------------- attribution
def op_ranges():
    """Wrap every public fastmask op in a ``fastmask.op.<name>`` profiler range: the ops open
    it themselves (:func:`fastmask.ops.op_ranges`)."""
    return _ops.op_ranges()


def _self_time_us(evt, on_gpu: bool) -> float:
    if on_gpu:
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        return float(t)
    return float(evt.self_cpu_time_total)


def _is_cpu_event(evt) -> bool:
    dt = getattr(evt, "device_type", None)
    return dt is None or str(dt).endswith("CPU")


def _under_matmul(e, depth: int = 4) -> bool:
    """The event is a matmul-like ATen op, or runs inside one (on a GPU the kernel time may
    sit on the cudaLaunchKernel / cuBLAS runtime call below the ATen op)."""
    while e is not None and depth >= 0:
        if e.name in _MATMUL_OPS:
            return True
        e, depth = e.cpu_parent, depth - 1
    return False


def categorize(events, on_gpu: bool, detail: dict | None = None) -> dict[str, float]:
    """Self time (us) per category of a profiler's events (see the module docstring).

    ``detail``, if given, is filled with {category: {event name: us}}.
    """
    events = [e for e in events if _is_cpu_event(e)]
    # forward autograd sequence numbers created inside an op range -> that op's category
    seq_cat: dict[int, str] = {}
    range_cat: dict[int, str | None] = {}

    def own_category(e):
        name = e.name
        if name.startswith(_RANGE_PREFIX):
            return _OP_CATEGORY.get(name[len(_RANGE_PREFIX):])
        if name.startswith("fastmask::"):  # the custom ops of the fused backends (and backwards)
            base = name[len("fastmask::"):].split(".")[0].removesuffix("_backward")
            return _OP_CATEGORY.get(base)
        if name.startswith(_OPTIMIZER_RANGES):
            return "optimizer"
        return None

    def enclosing(e):
        """Category from the nearest categorising ancestor (or the event itself)."""
        chain = []
        cur = e
        while cur is not None:
            if cur.id in range_cat:
                cat = range_cat[cur.id]
                break
            chain.append(cur)
            cat = own_category(cur)
            if cat is None and cur.name.startswith("autograd::engine::evaluate_function"):
                cat = seq_cat.get(getattr(cur, "sequence_nr", -1))
                if cat is None:  # the backward of a node made outside every op range
                    break
            if cat is not None:
                break
            cur = cur.cpu_parent
        for c in chain:
            range_cat[c.id] = cat
        return cat

    # Every forward op records the autograd sequence number current at its start; the op that
    # creates the node numbered s is the last one (in time) to record s (ops that create no
    # node record the next number without taking it). Backward nodes carry their s.
    events.sort(key=lambda e: e.time_range.start)
    for e in events:
        if "evaluate_function" in e.name or getattr(e, "sequence_nr", -1) < 0:
            continue
        seq_cat[e.sequence_nr] = enclosing(e)
    range_cat.clear()
    totals = {c: 0.0 for c in CATEGORIES}
    for e in events:
        t = _self_time_us(e, on_gpu)
        if t <= 0:
            continue
        cat = enclosing(e)
        if cat is None:
            cat = "matmul" if _under_matmul(e) else "other"
        elif cat not in ("attention", "loss", "optimizer") and _under_matmul(e):
            cat = "matmul"  # a matmul launched inside e.g. a norm range is still a matmul
        totals[cat] += t
        if detail is not None:
            d = detail.setdefault(cat, {})
            d[e.name] = d.get(e.name, 0.0) + t
    return totals


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``fastmask profile``."""
    from .presets import field_check
    from .values import COUNT, DEVICE, RATIO, Check, arg_type

    count, ratio = arg_type(COUNT, "count"), arg_type(RATIO, "ratio")
    parser.add_argument("--config", default="XL/2", help="model config: XL/2, L/2, B/2, S/2, Digits/2, T/2 ... (default XL/2)")
    parser.add_argument("--model", choices=tuple(ARCHITECTURES), default="maskdit",
                        help="model family (fastmask.models.ARCHITECTURES; default maskdit)")
    parser.add_argument("--input-size", type=arg_type(field_check("image_size"), "count"), default=32, help="latent side: 32 for 256x256 images, 64 for 512x512")
    parser.add_argument("--in-channels", type=arg_type(field_check("channels"), "count"), default=4, help="input channels (4 for SD-VAE latents)")
    parser.add_argument("--num-classes", type=count, default=1000, help="classes of the label embedding")
    parser.add_argument("--batch", type=arg_type(field_check("batch_size"), "count"), default=None, help="batch size (default 64 on a GPU, 8 on the CPU)")
    parser.add_argument("--mask-ratio", type=ratio, default=0.5, help="fraction of tokens dropped (MaskDiT)")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default="auto", help="op backend")
    parser.add_argument("--compile", choices=("none", "blocks", "model"), default="none", help="torch.compile scope")
    parser.add_argument("--steps", type=count, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=arg_type(Check(int, lo=0, hi=1_000_000), "count"), default=2, help="steps before profiling")
    parser.add_argument("--device", type=arg_type(DEVICE, "device"), default="auto",
                        help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on the GPU")
    parser.add_argument("--trace", default=None, help="write a Chrome trace (JSON) here")
    parser.add_argument("--json", default=None, help="write the per-kind table and step figures (JSON) here")
    parser.add_argument("--top", type=arg_type(Check(int, lo=0, hi=1_000_000), "count"), default=0,
                        help="also list the N ops with the most self time")
    return parser


def _matmul_peak_tflops(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return 2 * n**3 / (times[len(times) // 2] * 1e-3) / 1e12


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run(args: argparse.Namespace) -> int:
    """``fastmask profile``: profile, print the per-kind table (and write --trace / --json); 0."""
    from .values import check_out_file

    check_out_file(args.trace, "--trace")  # before profiling: a bad path fails at once
    check_out_file(args.json, "--json")
    result = profile(args)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _training_step(args: argparse.Namespace, dev: torch.device, batch: int, amp: bool):
    """(model, step, mask ratio): ``step()`` runs one training step (forward, backward, AdamW)
    of ``args.model``/``args.config`` on one fixed random batch."""
    from . import backend

    torch.manual_seed(0)
    with dev:  # parameters initialised on the device (fast for XL); numpy-made buffers are not:
        build = ARCHITECTURES[args.model].build
        net = EDMPrecond(build(args.config, input_size=args.input_size, in_channels=args.in_channels,
                               num_classes=args.num_classes)).to(dev)  # so move the rest
        y = torch.randn(batch, args.in_channels, args.input_size, args.input_size)
        labels = torch.randint(0, args.num_classes, (batch,))
    if args.compile != "none":
        compile_model(net, args.compile)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0, **({"fused": True} if dev.type == "cuda" else {}))
    ratio = args.mask_ratio if ARCHITECTURES[args.model].masks else 0.0

    def step():
        with backend(args.backend):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                loss = net.loss(y, labels, mask_ratio=ratio).mean()
            loss.backward()
        with torch.profiler.record_function("fastmask.optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return net, step, ratio


def profile(args: argparse.Namespace) -> dict:
    """Profile ``args.steps`` training steps; print the per-kind table; return it as a dict."""
    from .values import resolve_device

    dev = resolve_device(args.device or "auto")
    on_gpu = dev.type == "cuda"
    batch = args.batch or (64 if on_gpu else 8)
    net, step, ratio = _training_step(args, dev, batch, amp=on_gpu and not args.no_amp)
    for _ in range(max(args.warmup, 1 if args.compile != "none" else 0)):
        step()
    _sync(dev)

    # wall time per step, without the profiler's overhead; which backend each op ran on
    with _dispatch.record_choices() as ran:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(dev)
        step_s = (time.perf_counter() - t0) / args.steps

    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with op_ranges(), torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            with torch.profiler.record_function("fastmask.step"):
                step()
        _sync(dev)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    totals = categorize(prof.events(), on_gpu)
    busy = sum(totals.values()) / args.steps / 1e3  # ms per step
    per_image = traced_flops(args.model, args.config, input_size=args.input_size, in_channels=args.in_channels,
                             num_classes=args.num_classes, mask_ratio=ratio)
    flops = {k: v * batch for k, v in per_image.items()}
    peak = _matmul_peak_tflops(dev)
    tflops = flops["train_step"] / step_s / 1e12
    result = {
        "config": args.config,
        "model": args.model,
        "device": torch.cuda.get_device_name(dev) if on_gpu else "cpu",
        "batch": batch,
        "input_size": args.input_size,
        "mask_ratio": ratio,
        "backend": args.backend,
        "compile": args.compile,
        "step_ms": step_s * 1e3,
        "images_per_s": batch / step_s,
        "measured_ms_per_step": busy,
        "time_basis": "GPU kernel time" if on_gpu else "CPU self time",
        "categories": {k: {"ms": v / args.steps / 1e3, "share": v / max(sum(totals.values()), 1e-9)} for k, v in totals.items()},
        "flops_per_step": flops["train_step"],
        "flops_per_image": per_image["train_step"],
        "tflops": tflops,
        "matmul_peak_tflops": peak,
        "mfu_pct": 100 * tflops / peak if peak else None,
        "trace": args.trace,
        "backends": {op: "+".join(sorted(names)) for op, names in sorted(ran.items())},
    }
    _print(result, prof if args.top else None, args.top, on_gpu)
    return result


def _print(r: dict, prof, top: int, on_gpu: bool) -> None:
    print(
        f"fastmask profile: {r['model']} {r['config']} input {r['input_size']} batch {r['batch']} "
        f"mask ratio {r['mask_ratio']} backend {r['backend']} compile {r['compile']} on {r['device']}"
    )
    print(f"step {r['step_ms']:.2f} ms ({r['images_per_s']:.1f} images/s); {r['time_basis']} per step {r['measured_ms_per_step']:.2f} ms")
    if r.get("backends"):
        print("ops ran on: " + ", ".join(f"{op}={b}" for op, b in r["backends"].items()))
    print(f"{'kind':<15}{'ms/step':>10}{'share':>9}")
    for k in CATEGORIES:
        c = r["categories"][k]
        print(f"{k:<15}{c['ms']:>10.3f}{100 * c['share']:>8.1f}%")
    mfu = f", MFU {r['mfu_pct']:.1f}% of a measured {r['matmul_peak_tflops']:.0f} TFLOP/s bf16 matmul" if r["mfu_pct"] else ""
    print(f"model FLOPs per step {r['flops_per_step'] / 1e9:.4g} GFLOP ({r['flops_per_image'] / 1e9:.4g} GFLOP per "
          f"image) -> {r['tflops'] * 1e3:.4g} GFLOP/s{mfu}")
    if prof is not None:
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=top))
    if r["trace"]:
        print(f"Chrome trace: {r['trace']}")


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="fastmask profile", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

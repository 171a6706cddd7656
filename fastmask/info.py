"""``fastmask info``: versions, GPUs, the backends and their build state, and for a model
config, device and dtype which backend each op would take and why every other one would not.

Nothing runs and nothing of the model's size is allocated: the example tensors are fake
tensors (shape, dtype and the requested device, no memory), built with the model's real shapes,
and the dispatcher is asked the same question it answers before every call
(:func:`fastmask.ops.dispatch.choice`, :func:`fastmask.ops.dispatch.not_supported_reasons`).
So it runs on a machine without a GPU, for ``--device cuda`` too.
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LATENT_CHANNELS = 4  # the Stable Diffusion VAE's latents, as in DiT and MaskDiT

_BACKEND_ROLE = {
    "torch": "the PyTorch reference (fastmask.ops.reference)",
    "triton": "Triton kernels (fastmask.kernels)",
    "cuda": "CUDA C++ kernels (csrc/, fastmask.cuda_ext)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .presets import field_check
    from .values import RATIO, arg_type

    p.add_argument("--model", default="XL/2", type=arg_type(field_check("model"), "model"),
                   help="MaskDiT config whose op shapes are checked (default XL/2)")
    p.add_argument("--device", default=None, help="device type: cuda or cpu (default: cuda if one is visible, else cpu)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activation dtype (default bf16)")
    p.add_argument("--batch", type=arg_type(field_check("batch_size"), "count"), default=64,
                   help="batch size (default 64)")
    p.add_argument("--mask-ratio", type=arg_type(RATIO, "ratio"), default=0.5,
                   help="share of tokens dropped (default 0.5)")
    p.add_argument("--input-size", type=arg_type(field_check("image_size"), "count"), default=32,
                   help="latent side length (default 32: 256 px images)")


def _versions() -> list[str]:
    from . import __version__

    lines = [f"fastmask {__version__}", f"python {platform.python_version()} ({sys.platform})"]
    lines.append(f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda} build" if torch.version.cuda else ", CPU-only build"))
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # absent or broken: the triton backend's reason says the same
        lines.append(f"triton not importable ({type(e).__name__}: {e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("GPU: none visible to torch")
    return lines


def _backends() -> list[str]:
    from ._env import backend_spec, interpreting
    from .ops import dispatch

    lines = ["backends:"]
    for name, reason in dispatch.available_backends().items():
        mod = dispatch._module(name)
        where = ""
        if not isinstance(mod, str):
            dts = ", ".join(str(d).replace("torch.", "") for d in mod.DTYPES)
            where = f"; devices {', '.join(mod.DEVICE_TYPES)}; dtypes {dts}"
        state = "ready" if reason is None else f"NOT available: {reason.split(': ', 1)[-1]}"
        lines.append(f"  {name:<7} {_BACKEND_ROLE[name]}{where}")
        lines.append(f"          {state}")
    lines.append(f"  TRITON_INTERPRET={'1' if interpreting() else '0'}, "
                 f"FASTMASK_BACKEND={backend_spec() or '(unset: automatic choice)'}")
    return lines


def example_calls(model: str, device: str, dtype: torch.dtype, batch: int, mask_ratio: float, input_size: int):
    """``[(op, label, tensors)]``: the tensors each op of a MaskDiT training step passes to the
    dispatcher, as fake tensors of the real shapes on ``device`` (no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .models.configs import model_kwargs
    from .ops import num_kept, registry

    try:
        kw = model_kwargs(model, masked=True)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    if input_size < 1 or input_size % kw["patch_size"]:
        raise ValueError(f"--input-size: expected a positive multiple of the patch size {kw['patch_size']}, got {input_size}")
    if batch < 1:
        raise ValueError(f"--batch: expected a positive batch size, got {batch}")
    p = kw["patch_size"]
    B, N, P = batch, (input_size // p) ** 2, p * p * LATENT_CHANNELS
    K = num_kept(N, mask_ratio)
    stages = (
        ("encoder", K, kw["hidden_size"], kw["num_heads"]),
        ("decoder", N, kw["decoder_hidden_size"], kw["decoder_num_heads"]),
        ("output", N, kw["decoder_hidden_size"], kw["decoder_num_heads"]),
    )
    calls = []
    with FakeTensorMode():
        def t(*shape, dt=None):
            return torch.empty(*shape, device=device, dtype=dt or dtype)

        for part, L, D, H in stages:  # each declared op says what it sees in each stage
            e = registry.Example(part=part, B=B, N=N, K=K, L=L, D=D, H=H, P=P, t=t)
            # the token ops open their stage (gather before the encoder, unmask before the decoder)
            for op, decl in sorted(registry.OPS.items(), key=lambda kv: kv[1].category != "gather/unmask"):
                got = decl.example(e) if decl.example is not None else None
                if got is not None:
                    calls.append((op, *got))
    return calls


def _plan(args, device: str, dtype: torch.dtype) -> list[str]:
    from .ops import dispatch

    calls = example_calls(args.model, device, dtype, args.batch, args.mask_ratio, args.input_size)
    dname = {v: k for k, v in DTYPES.items()}[dtype]
    build = {n: getattr(m, "unavailable_reason", lambda: None)() for n in dispatch.BACKENDS
             if not isinstance(m := dispatch._module(n), str)}
    lines = [f"MaskDiT {args.model}, batch {args.batch}, mask ratio {args.mask_ratio}, {args.input_size}x{args.input_size} "
             f"latents, {dname} on {device}: the backend each op takes"]
    for op, label, tensors in calls:
        try:
            chosen, _ = dispatch.choice(op, *tensors)
            head = f"  {op:<28} {label:<48} -> {chosen}"
        except dispatch.BackendUnavailable as e:
            chosen, head = None, f"  {op:<28} {label:<48} -> ERROR: {e}"
        lines.append(head)
        for name in dispatch.BACKENDS:
            if name == chosen:
                continue
            reasons = dispatch.not_supported_reasons(name, op, tensors)
            reasons = ["not built (see above)" if r == build.get(name) else r for r in reasons]
            if reasons:
                lines.append(f"      {name}: " + "; ".join(reasons))
            elif name == "torch":
                lines.append("      torch: runs every call; used when no faster backend can")
            else:
                lines.append(f"      {name}: could run it; {chosen} comes first in the preference order")
    return lines


def _flops(args) -> list[str]:
    """FLOPs per image of a training step of every model family at this config."""
    from .models import ARCHITECTURES, traced_flops

    lines = [f"FLOPs per image of a training step (forward + backward = 3x forward), {args.model}, "
             f"{args.input_size}x{args.input_size} latents (traced on the meta device):"]
    rows = {}
    for fam, arch in ARCHITECTURES.items():
        ratio = arch.train_defaults.get("mask_ratio", args.mask_ratio) if arch.masks else 0.0
        rows[fam] = ratio, traced_flops(fam, args.model, input_size=args.input_size, mask_ratio=ratio)["train_step"]
    dense = rows.get("dit", (0, 0))[1]
    for fam, (ratio, f) in rows.items():
        vs = f", {f / dense:.2f}x dit" if dense else ""
        lines.append(f"  {fam:<10} mask ratio {ratio:<5g} {f / 1e9:9.1f} GFLOP{vs}")
    return lines


def run(args) -> int:
    device = args.device if args.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu or cuda, got {device!r}")
    dtype = DTYPES[args.dtype]
    plan = _plan(args, device, dtype)  # first, so that a bad flag fails before anything is printed
    print("\n".join(_versions() + [""] + _backends() + [""] + plan + [""] + _flops(args)))
    return 0


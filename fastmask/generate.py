"""``fastmask sample``: samples of a checkpoint as PNGs, latents, or one ``.npz`` for FID.

    fastmask sample --checkpoint runs/digits --per-class 8
    fastmask sample --checkpoint imagenet256-guidance.pt --vae ema --preset maskdit256 --npz in256.npz
    torchrun --nproc_per_node=8 -m fastmask sample --checkpoint ... --vae ... --preset maskdit256 --npz ...

A latent model's samples are decoded with ``--vae`` (a diffusers AutoencoderKL, see
:mod:`fastmask.vae`) into PNGs; without it they stay latents (``latents.npy``). ``--npz FILE``
also writes every image into one ``.npz`` in the layout ADM's evaluator reads (``arr_0``: uint8
[N, H, W, 3]; plus ``labels``). A FID run (``--npz`` without a count) draws the class-balanced
50,000 samples of the published protocol (50 per ImageNet class). Under torchrun each rank draws
one contiguous range of the samples and writes its part, then rank 0 merges the parts into the
final files (streamed, so the merge holds one part in memory at a time). The noise of sample i
depends only on (``--seed``, i), so the result does not depend on the number of ranks or the
batch size.

Presets (``--preset``) are the published sampler settings: EDM Heun with 40 steps (79 network
evaluations) and classifier-free guidance 1.5 on all channels, as the MaskDiT paper and its
released checkpoints report FID with (README of github.com/Anima-Lab/MaskDiT: "the guidance scale
is set to 1.5 by default"; FID-50k 2.28 at 256x256 and 2.50 at 512x512 with guidance, 5.69 and
10.79 without). Flags given explicitly override the preset.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .values import MAX_SAMPLES, check_out_file, make_out_dir, resolve_device

FID_SAMPLES = 50_000
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_PER_CLASS = 18, 1.5, 8
GRID_MAX = 1024  # grid.png only for sample sets up to this size

SAMPLE_PRESETS = {
    "maskdit256": dict(steps=40, guidance=1.5, latent_size=32,
                       note="MaskDiT ImageNet 256x256 with guidance: published FID-50k 2.28"),
    "maskdit256-unguided": dict(steps=40, guidance=1.0, latent_size=32,
                                note="MaskDiT ImageNet 256x256 without guidance: published FID-50k 5.69"),
    "maskdit512": dict(steps=40, guidance=1.5, latent_size=64,
                       note="MaskDiT ImageNet 512x512 with guidance: published FID-50k 2.50"),
    "maskdit512-unguided": dict(steps=40, guidance=1.0, latent_size=64,
                                note="MaskDiT ImageNet 512x512 without guidance: published FID-50k 10.79"),
    # github.com/willisma/SiT README: SiT-XL/2 256x256 FID-50K 2.06, IS 270.27; the sampler is
    # the maintainer's answer in willisma/SiT issue #18: "second-order Heun ODE solver with 125
    # steps (250 NFEs) and 1.5 cfg scale" (guidance on channels 0-2, as SiT's forward_with_cfg)
    "sit256": dict(steps=125, guidance=1.5, latent_size=32, objective="flow",
                   note="SiT-XL/2 ImageNet 256x256, flow ODE Heun 250 NFE: published FID-50K 2.06"),
}


def presets_help() -> str:
    return "; ".join(f"{k}: {v['steps']} Heun steps, guidance {v['guidance']} ({v['note']})" for k, v in SAMPLE_PRESETS.items())


def add_arguments(parser) -> None:
    """The flags of ``fastmask sample``."""
    from .presets import field_check
    from .values import COUNT, arg_type
    from .sampling import add_loading_arguments

    parser.description = (
        "Draw samples with the EDM Heun sampler and classifier-free guidance. Pixel models write one PNG per sample "
        "plus grid.png; latent models write latents.npy (the scaled VAE latents z, decode with z / 0.18215) and "
        "labels.npy, or with --vae decoded PNGs; --npz also writes one .npz for FID (`fastmask fid`). "
        "Distributed: torchrun --nproc_per_node=N -m fastmask sample ...")
    count = arg_type(COUNT, "count")
    add_loading_arguments(parser, "a fastmask .safetensors checkpoint or run folder, or a published .pt",
                          guidance=None, steps=None)
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--labels", default=None, help="comma-separated class labels, e.g. 0,1,2,2 (-1: unconditional)")
    g.add_argument("--per-class", type=count, default=None, help=f"this many samples of every class (default {DEFAULT_PER_CLASS})")
    g.add_argument("--num", type=count, default=None,
                   help="number of samples (of a class-conditional model: class-balanced)")
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--batch-size", type=arg_type(field_check("batch_size"), "count"), default=64, help="samples per network batch")
    parser.add_argument("--key", default=None, help="entry of a published checkpoint to load (e.g. ema, net)")
    parser.add_argument("--sampler", choices=("heun", "euler", "dopri5", "sde"), default=None,
                        help="flow models only: ODE Heun (default; 2 network calls a step), ODE Euler, dopri5 (needs "
                        "torchdiffeq) or SiT's SDE (Euler-Maruyama, diffusion 1 - t, drift-only last step 0.04)")
    parser.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                        help="flow models only: guide only for flow times LO <= t <= HI (0 noise, 1 data)")
    parser.add_argument("--parameterization", choices=("auto", "edm", "ddpm", "flow"), default="auto",
                        help="published checkpoints: edm (MaskDiT), ddpm (DiT eps-prediction) or flow (SiT velocity); "
                        "auto picks by architecture (and SiT by its file name or stored arguments)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow torch.load to unpickle arbitrary objects")
    parser.add_argument("--vae", default=None, metavar="PATH_OR_ID",
                        help="decode latent samples to images with this diffusers AutoencoderKL (local folder, hub id "
                        "when online, or mse/ema for stabilityai/sd-vae-ft-mse/-ema)")
    parser.add_argument("--npz", default=None, metavar="FILE.npz",
                        help="also write all images into one .npz (arr_0 uint8 [N, H, W, 3], as ADM's evaluator reads); "
                        f"without a sample count this is a FID run: {FID_SAMPLES} class-balanced samples")
    parser.add_argument("--no-png", action="store_true", help="write no PNG files (with --npz: only the .npz)")
    parser.add_argument("--preset", choices=list(SAMPLE_PRESETS), default=None,
                        help="published sampler settings: " + presets_help())


def resolve_settings(args, info: dict) -> dict:
    """steps, guidance and the labels (or unconditional count) of a sample command."""
    p = SAMPLE_PRESETS.get(args.preset) if getattr(args, "preset", None) else None
    if p is not None and info.get("kind") != "latents":
        raise UsageError(f"--preset {args.preset}: made for {p['latent_size']}x{p['latent_size']} latents, but the "
                         f"checkpoint's model works on pixels {tuple(info['shape'])}")
    if p is not None and info.get("kind") == "latents" and info["shape"][1] != p["latent_size"]:
        raise UsageError(
            f"--preset {args.preset}: made for {p['latent_size']}x{p['latent_size']} latents, but the checkpoint's "
            f"model takes {info['shape'][1]}x{info['shape'][2]}"
        )
    if p is not None and p.get("objective", "edm") != info.get("objective", "edm"):
        raise UsageError(f"--preset {args.preset}: made for a {p.get('objective', 'edm')} model, but the checkpoint "
                         f"is a {info.get('objective', 'edm')} model")
    steps = args.steps if args.steps is not None else (p["steps"] if p else DEFAULT_STEPS)
    guidance = args.guidance if args.guidance is not None else (p["guidance"] if p else DEFAULT_GUIDANCE)
    if steps < 1:
        raise UsageError(f"--steps: expected at least 1, got {steps}")
    K = info["num_classes"]
    fid_run = getattr(args, "npz", None) is not None
    labels, num, per_class = None, None, False
    if (args.num or 0) > MAX_SAMPLES:
        raise UsageError(f"--num: {args.num} samples asked for; at most {MAX_SAMPLES} in one command")
    if args.labels is not None:
        labels = parse_labels(args.labels, K)
    elif K > 0:
        if args.per_class is not None:
            if args.per_class < 1:
                raise UsageError(f"--per-class: expected at least 1, got {args.per_class}")
            if K * args.per_class > MAX_SAMPLES:
                raise UsageError(f"--per-class: {K} classes x {args.per_class} = {K * args.per_class} samples asked "
                                 f"for; at most {MAX_SAMPLES} in one command")
            labels, per_class = torch.arange(K).repeat_interleave(args.per_class), True
        elif args.num is not None:
            if args.num < 1:
                raise UsageError(f"--num: expected at least 1, got {args.num}")
            labels = _balanced(K, args.num)
        elif fid_run:
            labels = _balanced(K, FID_SAMPLES)
        else:
            labels, per_class = torch.arange(K).repeat_interleave(DEFAULT_PER_CLASS), True
    else:
        num = args.num or args.per_class or (FID_SAMPLES if fid_run else DEFAULT_PER_CLASS)
        if num < 1:
            raise UsageError(f"--num: expected at least 1, got {num}")
    flow = {}
    if getattr(args, "sampler", None):
        flow["method"] = args.sampler
    gi = getattr(args, "guidance_interval", None)
    if gi is not None:
        try:
            lo, hi = (float(v) for v in str(gi).split(","))
        except ValueError:
            raise UsageError(f"--guidance-interval: expected LO,HI (two numbers), got {gi!r}") from None
        if not 0 <= lo <= hi <= 1:
            raise UsageError(f"--guidance-interval: expected 0 <= LO <= HI <= 1, got {lo}, {hi}")
        flow["interval"] = (lo, hi)
    if flow and info.get("objective", "edm") != "flow":
        raise UsageError("--sampler / --guidance-interval: only for flow-matching models; this checkpoint is "
                         "sampled with EDM Heun")
    return {"steps": steps, "guidance": guidance, "labels": labels, "num": num if labels is None else len(labels),
            "preset": args.preset if p else None, "per_class": per_class, "flow": flow,
            "path_drop_guidance": bool(getattr(args, "path_drop_guidance", False))}


def _balanced(K: int, total: int) -> torch.Tensor:
    from .sampling import balanced_labels

    return balanced_labels(K, total)


def parse_labels(text: str, K: int) -> torch.Tensor:
    from .sampling import parse_labels as parse

    return parse(text, K)


def _open_part(path: Path, n: int, sample_shape, dtype):
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *sample_shape))


def _merge_npz(parts: list[Path], labels: np.ndarray | None, dest: Path) -> None:
    """Concatenate .npy parts (in order) into ``dest`` as arr_0 (+ labels), streamed part by part."""
    import zipfile

    arrays = [np.load(p, mmap_mode="r") for p in parts]
    n = sum(len(a) for a in arrays)
    shape, dtype = (n, *arrays[0].shape[1:]), arrays[0].dtype
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            )
            for a in arrays:
                for s in range(0, len(a), 1024):
                    f.write(np.ascontiguousarray(a[s : s + 1024]).tobytes())
        if labels is not None:
            with zf.open("labels.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64))
    os.replace(tmp, dest)


def _vae_decoder(path, info: dict, dev):
    """``--vae``: the function that decodes the latent model's samples to images."""
    from . import vae as vae_mod

    if info["kind"] != "latents":
        raise UsageError(f"--vae: the checkpoint's model works on pixels ({info['shape']}), there is nothing to decode")
    vae = vae_mod.load_vae(path, device=dev, dtype=torch.float32)
    if vae_mod.latent_channels(vae) != info["shape"][0]:
        raise UsageError(f"--vae: the VAE has {vae_mod.latent_channels(vae)} latent channels, the model "
                         f"{info['shape'][0]}")
    scale = float(getattr(vae.config, "scaling_factor", None) or vae_mod.SCALE_FACTOR)

    def decode(z):
        return vae_mod.decode(vae, z, scale)

    return decode


def run(args) -> int:
    from .sampling import check_path_drop_guidance, generate, load_model, rank_range, save_grid, to_uint8
    from .train import distributed_info

    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint: no such file or folder {args.checkpoint!r}")
    resolve_device(args.device)  # a device that cannot run is a one-line error naming --device
    rank, world, dev = distributed_info(args.device)
    make_out_dir(args.out)  # before the (slow) model load: a bad --out fails at once
    check_out_file(args.npz, "--npz", ".npz")
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if rank == 0 else (lambda m: None)
    net, info = load_model(args.checkpoint, use_ema=args.weights == "ema", device=dev, key=args.key,
                           parameterization=args.parameterization, trust_pickle=args.trust_pickle)
    st = resolve_settings(args, info)
    check_path_drop_guidance(args, net)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected at least 1, got {args.batch_size}")
    decode = _vae_decoder(args.vae, info, dev) if args.vae else None
    images = info["kind"] == "pixels" or decode is not None
    out = Path(args.out)
    parts_dir = out / ".parts"
    n, labels = st["num"], st["labels"]
    start, stop = rank_range(n, rank, world)
    say(f"fastmask: sampling {n} {'images' if images else 'latents'} ({st['steps']} Heun steps, guidance "
        f"{st['guidance']}{', preset ' + st['preset'] if st['preset'] else ''}) on {world} rank(s)")
    t0 = time.perf_counter()
    part = parts_dir / f"part-{rank:05d}-of-{world:05d}.npy"
    mm = None
    keep = not images or args.npz or (n <= GRID_MAX and not args.no_png)
    for idx, x in generate(net, labels, info["shape"], start, stop, steps=st["steps"], guidance=st["guidance"],
                           seed=args.seed, batch_size=args.batch_size, device=dev, amp=dev.type == "cuda",
                           decode=decode, flow=st["flow"], path_drop_guidance=st["path_drop_guidance"]):
        if images:
            u8 = to_uint8(x).numpy()
            if not args.no_png:
                _write_pngs(u8, idx, labels, out)
            arr = u8
        else:
            arr = x.numpy().astype(np.float32)
        if keep:
            if mm is None:
                mm = _open_part(part, stop - start, arr.shape[1:], arr.dtype)
            mm[idx[0] - start : idx[-1] + 1 - start] = arr
    if mm is not None:
        mm.flush()
        del mm
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return 0
    parts = [parts_dir / f"part-{r:05d}-of-{world:05d}.npy" for r in range(world) if rank_range(n, r, world)[1] >
             rank_range(n, r, world)[0]]
    lab_np = labels.numpy() if labels is not None else None
    written = []
    if keep and parts:
        if images and args.npz:
            _merge_npz(parts, lab_np, Path(args.npz))
            written.append(str(args.npz))
        if not images:
            all_lat = np.concatenate([np.load(p) for p in parts])
            np.save(out / "latents.npy", all_lat)
            written.append(str(out / "latents.npy"))
            if lab_np is not None:
                np.save(out / "labels.npy", lab_np)
        elif n <= GRID_MAX and not args.no_png:
            allx = np.concatenate([np.load(p, mmap_mode="r") for p in parts])
            x = torch.from_numpy(allx).permute(0, 3, 1, 2).float() / 127.5 - 1
            K = info["num_classes"]
            rows = K if st["per_class"] else max(1, int(n**0.5))
            save_grid(x, out / "grid.png", rows=rows, upscale=1 if allx.shape[1] >= 64 else 4)
            written.append(str(out / "grid.png"))
    shutil.rmtree(parts_dir, ignore_errors=True)
    dt = time.perf_counter() - t0
    what = f"{n} PNGs" if images and not args.no_png else f"{n} samples"
    say(f"fastmask: wrote {what} to {out}{' and ' + ', '.join(written) if written else ''} ({dt:.1f} s)")
    return 0


def _write_pngs(u8: np.ndarray, idx: torch.Tensor, labels, out: Path) -> None:
    from PIL import Image

    for a, i in zip(u8, idx.tolist()):
        tag = f"_class{int(labels[i])}" if labels is not None else ""
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a[..., :3]).save(out / f"sample_{i:05d}{tag}.png")

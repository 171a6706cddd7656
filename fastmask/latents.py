"""``fastmask latents``: an image folder -> VAE-moment shards that ``fastmask train --data latents`` reads.

    fastmask latents --images /data/imagenet/train --out latents/in256 --resolution 256
    torchrun --nproc_per_node=8 -m fastmask latents --images ... --out ... --resolution 512 --flip

Input: an ImageNet-layout folder (one sub-folder per class; labels are the sorted sub-folder
names' indices) or a flat folder with ``--labels FILE`` (lines ``relative/path label``, comma or
space separated). Preprocessing is ADM/DiT's: halve the image with a box filter while its short
side is at least twice the target, resize the short side to the target with bicubic
resampling, centre-crop a square. ``--flip`` also stores the horizontal mirror of every image
(after the originals of its shard), as MaskDiT's extraction did.

Output, in ``--out``: shards ``shard-00000.npy`` (posterior moments [n, 2C, h, w]: C mean
channels, then C log-variance channels) with ``shard-00000.labels.npy`` next to it (exactly the
layout :class:`fastmask.data.LatentShardDataset` memory-maps), a ``shard-00000.json`` written
last (its presence marks the shard finished; a rerun skips finished shards) and, once every
shard is finished, ``manifest.json`` (counts, skipped files, classes, resolution, latent shape,
scale factor, VAE id and weight hash) that ``fastmask train`` checks against its config.
Unreadable or corrupt images are skipped, counted and listed. Under torchrun each rank takes one
contiguous range of shards; the last rank to finish writes the manifest.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

FORMAT = "fastmask-latents-v1"
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------- inputs
def list_images(root, labels_file=None, unconditional: bool = False):
    """(files [Path], labels [int], class names) of an image folder.

    Class sub-folders -> labels are the indices of the sorted folder names. A flat folder needs
    ``labels_file`` (or ``unconditional``: every label -1)."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--images: {str(root)!r} is not a folder")
    if labels_file is not None:
        lf = Path(labels_file)
        if not lf.is_file():
            raise UsageError(f"--labels: no such file {str(lf)!r}")
        pairs = []
        for n, line in enumerate(lf.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace(",", " ").split()
            try:
                name, lab = " ".join(parts[:-1]), int(parts[-1])
            except (ValueError, IndexError):
                raise UsageError(f"--labels: {lf}:{n}: expected 'relative/path label', got {line!r}") from None
            if not name or lab < 0:
                raise UsageError(f"--labels: {lf}:{n}: expected 'relative/path label' with a label >= 0, got {line!r}")
            pairs.append((name, lab))
        if not pairs:
            raise UsageError(f"--labels: {str(lf)!r} lists no images")
        pairs.sort()
        files = [root / name for name, _ in pairs]
        labels = [lab for _, lab in pairs]
        classes = [str(i) for i in range(max(labels) + 1)]
        return files, labels, classes
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files, labels = [], []
        for i, c in enumerate(classes):
            fs = sorted(f for f in (root / c).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            files += fs
            labels += [i] * len(fs)
        if not files:
            raise UsageError(f"--images: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {str(root)!r}")
        return files, labels, classes
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise UsageError(f"--images: no images and no class sub-folders in {str(root)!r}")
    if not unconditional:
        raise UsageError(
            f"--images: {str(root)!r} has no class sub-folders; give --labels FILE (lines 'name label') "
            "or --unconditional"
        )
    return files, [-1] * len(files), []


def center_crop_resize(im, size: int):
    """ADM/DiT preprocessing of a PIL image: box-filter halvings while the short side is at least
    2 * size, bicubic resize of the short side to ``size``, centre crop -> uint8 [size, size, 3]."""
    from PIL import Image

    im = im.convert("RGB")
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
    a = np.asarray(im)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return np.array(a[top : top + size, left : left + size])  # a writable copy


class _Images(torch.utils.data.Dataset):
    """Item i: (uint8 [3, S, S] or an empty tensor when unreadable, label, i)."""

    def __init__(self, files, labels, size: int):
        self.files, self.labels, self.size = files, labels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                a = center_crop_resize(im, self.size)
            x = torch.from_numpy(a).permute(2, 0, 1).contiguous()
        except Exception:  # unreadable, truncated, not an image: skipped and counted
            x = torch.empty(0, dtype=torch.uint8)
        return x, self.labels[i], i


def _collate(items):
    return items


# --------------------------------------------------------------------------- shards
def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def rank_shards(num_shards: int, rank: int, world: int) -> range:
    """The contiguous range of shard indices rank ``rank`` of ``world`` extracts."""
    return range(num_shards * rank // world, num_shards * (rank + 1) // world)


def _shard_stem(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}"


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(out: Path, k: int, moments: list, labels: list, info: dict) -> None:
    from .checkpoint_io import atomic_write_json

    stem = _shard_stem(out, k)
    if moments:
        _atomic_save_npy(stem.with_name(stem.name + ".labels.npy"), np.asarray(labels, dtype=np.int64))
        _atomic_save_npy(stem.with_name(stem.name + ".npy"), np.stack(moments))
    atomic_write_json(stem.with_name(stem.name + ".json"), info)  # last: marks the shard finished


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def settings_key(s: dict) -> dict:
    """The settings a resumed extraction must share with the shards already written."""
    return {k: s[k] for k in ("num_images", "resolution", "flip", "shard_size", "vae_hash", "storage_dtype")}


# --------------------------------------------------------------------------- extraction
RESOLUTION_RULE = "any multiple of 8 from 8 to 4096 (ImageNet: 256 or 512)"


def check_resolution(resolution) -> int:
    """The centre-crop size, checked by the one rule that ``--resolution``'s help states."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 8 <= resolution <= 4096 or resolution % 8:
        raise UsageError(f"--resolution: expected {RESOLUTION_RULE}; got {resolution}")
    return resolution


def _device_and_precision(device, precision: str) -> tuple[torch.device, str]:
    """``auto`` resolved: this rank's GPU (LOCAL_RANK) or the CPU; bf16 on a GPU, else fp32."""
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % max(torch.cuda.device_count(), 1)}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise UsageError(f"--precision: expected auto, bf16 or fp32, got {precision!r}")
    return device, precision


def extract(
    images,
    out,
    *,
    vae=None,
    vae_name: str | None = None,
    resolution: int = 256,
    labels_file=None,
    unconditional: bool = False,
    flip: bool = False,
    shard_size: int = 10_000,
    batch_size: int = 64,
    workers: int = 4,
    precision: str = "auto",
    storage_dtype: str = "float32",
    device="auto",
    rank: int | None = None,
    world: int | None = None,
    progress: bool | None = None,
    log=None,
) -> dict:
    """Extract VAE moments of an image folder into shards (see the module doc). ``vae`` is a
    loaded ``AutoencoderKL`` or None (then ``vae_name`` is loaded). Returns a summary dict
    (the manifest when this call finished the last shard)."""
    from tqdm import tqdm

    from . import vae as vae_mod

    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    check_resolution(resolution)
    if shard_size < 1:
        raise UsageError(f"--shard-size: expected at least 1, got {shard_size}")
    if batch_size < 1:
        raise UsageError(f"--batch-size: expected at least 1, got {batch_size}")
    if storage_dtype not in ("float32", "float16"):
        raise UsageError(f"--storage: expected float32 or float16, got {storage_dtype!r}")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    device, precision = _device_and_precision(device, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    files, labels, classes = list_images(images, labels_file, unconditional)
    vae, source = _load_vae(vae, vae_name, device, dtype)
    f = vae_mod.downsample_factor(vae)
    if resolution % f:
        raise UsageError(f"--resolution: {resolution} is not divisible by the VAE's downsampling factor {f}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "format": FORMAT,
        "images_root": str(Path(images).resolve()),
        "num_images": len(files),
        "resolution": resolution,
        "latent_size": resolution // f,
        "latent_channels": vae_mod.latent_channels(vae),
        "scale_factor": float(getattr(vae.config, "scaling_factor", vae_mod.SCALE_FACTOR) or vae_mod.SCALE_FACTOR),
        "vae": source,
        "vae_hash": vae_mod.vae_hash(vae),
        "flip": bool(flip),
        "shard_size": shard_size,
        "storage_dtype": storage_dtype,
        "preprocessing": "ADM centre crop (box halvings, bicubic resize of the short side, centre square)",
        "num_classes": len(classes),
        "classes": classes,
    }
    ranges = shard_ranges(len(files), shard_size)
    mine = rank_shards(len(ranges), rank, world)
    pending = _pending_shards(out, mine, settings)
    if not pending:
        say(f"fastmask latents: rank {rank}: all {len(mine)} shards already finished")
    else:
        say(f"fastmask latents: rank {rank}/{world}: {len(pending)} of {len(mine)} shards to extract "
            f"({sum(ranges[k][1] - ranges[k][0] for k in pending)} images) on {device}, {precision}")
        _extract_shards(files, labels, ranges, pending, out, vae, settings, batch_size, workers, device,
                        storage_dtype, flip, progress, rank, tqdm)
    return finalize(out, settings, len(ranges), say)


def _load_vae(vae, vae_name: str | None, device, dtype):
    """(the VAE on ``device`` in ``dtype``, where it came from): ``vae`` as given, or loaded from ``vae_name``."""
    from . import vae as vae_mod

    if vae is None or vae_name is not None:
        source = vae_mod.vae_source(vae_name)
    else:
        source = getattr(vae.config, "_name_or_path", "") or "AutoencoderKL given in code"
    if vae is None:
        vae = vae_mod.load_vae(vae_name, device=device, dtype=dtype)
    else:
        vae = vae_mod.prepare(vae, device, dtype)
    return vae, source


def _pending_shards(out: Path, mine, settings: dict) -> list[int]:
    """This rank's shards not finished yet; a finished one written with other settings is refused."""
    pending = []
    for k in mine:
        info = _read_json(_shard_stem(out, k).with_name(f"shard-{k:05d}.json"))
        if info is None:
            pending.append(k)
        elif info.get("settings") != settings_key(settings):
            raise UsageError(
                f"--out: {str(out)!r} holds shards written with other settings (resolution, flip, shard size, "
                "VAE weights or image count differ); use a new --out folder"
            )
    return pending


def _extract_shards(files, labels, ranges, pending, out, vae, settings, batch_size, workers, device, storage_dtype,
                    flip, progress, rank, tqdm):
    from . import vae as vae_mod

    ds = _Images(files, labels, settings["resolution"])
    order = [i for k in pending for i in range(*ranges[k])]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, order), batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda",
    )
    np_dtype = np.float16 if storage_dtype == "float16" else np.float32
    shard_of = {}
    for k in pending:
        for i in range(*ranges[k]):
            shard_of[i] = k
    buf = {k: {"orig": [], "flip": [], "labels": [], "skipped": [], "t0": None} for k in pending}
    bar = tqdm(total=len(order), desc=f"latents rank {rank}", unit="img", disable=progress is False,
               position=rank, leave=True)
    t0 = time.perf_counter()
    try:
        for batch in loader:
            good = [(x, y, i) for x, y, i in batch if x.numel() > 0]
            for x, y, i in batch:
                if x.numel() == 0:
                    buf[shard_of[i]]["skipped"].append(str(files[i]))
            if good:
                x = torch.stack([g[0] for g in good]).to(device, non_blocking=True).float() / 127.5 - 1.0
                m = vae_mod.encode_moments(vae, x).cpu().numpy().astype(np_dtype)
                mf = vae_mod.encode_moments(vae, x.flip(-1)).cpu().numpy().astype(np_dtype) if flip else None
                for j, (_, y, i) in enumerate(good):
                    b = buf[shard_of[i]]
                    b["orig"].append(m[j])
                    b["labels"].append(int(y))
                    if flip:
                        b["flip"].append(mf[j])
            bar.update(len(batch))
            last = batch[-1][2]
            for k in [k for k in list(buf) if ranges[k][1] - 1 <= last]:
                b = buf.pop(k)
                moments = b["orig"] + b["flip"]
                labs = b["labels"] + (b["labels"] if flip else [])
                info = {
                    "shard": k,
                    "images": list(ranges[k]),
                    "count": len(moments),
                    "encoded_images": len(b["orig"]),
                    "skipped": len(b["skipped"]),
                    "skipped_files": b["skipped"],
                    "settings": settings_key(settings),
                }
                _write_shard(out, k, moments, labs, info)
    finally:
        bar.close()
    return time.perf_counter() - t0


def finalize(out, settings: dict, num_shards: int, say=None) -> dict:
    """Write ``manifest.json`` once every shard is finished; returns it (or a progress summary)."""
    from .checkpoint_io import atomic_write_json

    out = Path(out)
    infos = [_read_json(out / f"shard-{k:05d}.json") for k in range(num_shards)]
    done = [i for i in infos if i is not None]
    if len(done) < num_shards:
        msg = f"{len(done)} of {num_shards} shards finished; the manifest is written when all are (rerun to resume)"
        if say:
            say(f"fastmask latents: {msg}")
        return {"complete": False, "finished_shards": len(done), "num_shards": num_shards}
    skipped_files = [f for i in done for f in i.get("skipped_files", [])]
    manifest = {
        **settings,
        "complete": True,
        "count": sum(i["count"] for i in done),
        "encoded_images": sum(i["encoded_images"] for i in done),
        "skipped": len(skipped_files),
        "skipped_files": skipped_files[:1000],
        "num_shards": num_shards,
        "shards": [f"shard-{k:05d}.npy" for k, i in enumerate(done) if i["count"] > 0],
    }
    atomic_write_json(out / MANIFEST, manifest)
    if say:
        say(f"fastmask latents: wrote {manifest['count']} latents ({manifest['encoded_images']} images"
            f"{', with flips' if manifest['flip'] else ''}; {manifest['skipped']} unreadable images skipped) "
            f"in {num_shards} shards; manifest {out / MANIFEST}")
    return manifest


# --------------------------------------------------------------------------- training-side check
def check_manifest(cfg) -> dict | None:
    """Check a latent data set's ``manifest.json`` (when the folder has one) against a training
    config: latent size = image_size, latent channels = channels, scale factor = latent_scale,
    extraction complete. Raises UsageError naming the manifest and the key that disagrees."""
    if getattr(cfg, "data", None) != "latents" or not cfg.data_path:
        return None
    p = Path(cfg.data_path)
    folder = p if p.is_dir() else p.parent
    mpath = folder / MANIFEST
    if not mpath.exists():
        if p.is_dir() and any(folder.glob("shard-*.json")):
            raise UsageError(
                f"--data-path: {str(folder)!r} holds an unfinished extraction (shards but no {MANIFEST}); "
                "rerun the same `fastmask latents` command to finish it"
            )
        return None
    m = _read_json(mpath)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UsageError(f"--data-path: {str(mpath)!r} is not a fastmask latents manifest")
    if not m.get("complete"):
        raise UsageError(f"--data-path: {str(mpath)!r} says the extraction is not complete; rerun `fastmask latents`")
    checks = [
        ("image_size", cfg.image_size, m["latent_size"], "latent_size"),
        ("channels", cfg.channels, m["latent_channels"], "latent_channels"),
    ]
    for key, have, want, mkey in checks:
        if have != want:
            raise UsageError(
                f"{key}: the config says {have} but {str(mpath)} has {mkey}={want} "
                f"({m['resolution']}px images); set --set {key}={want}"
            )
    if not math.isclose(float(cfg.latent_scale), float(m["scale_factor"]), rel_tol=1e-6):
        raise UsageError(
            f"latent_scale: the config says {cfg.latent_scale} but {str(mpath)} has scale_factor="
            f"{m['scale_factor']} (VAE {m['vae']}); set --set latent_scale={m['scale_factor']}"
        )
    nc = getattr(cfg, "num_classes", None)
    if nc is not None and nc > 0 and m.get("num_classes") and nc < m["num_classes"]:
        raise UsageError(f"num_classes: the config says {nc} but {str(mpath)} has {m['num_classes']} classes")
    return m


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    from .presets import field_check
    from .values import COUNT, DEVICE, Check, arg_type

    parser.add_argument("--images", required=True, metavar="DIR",
                        help="image folder: one sub-folder per class (ImageNet layout), or flat with --labels")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    parser.add_argument("--labels", default=None, metavar="FILE",
                        help="labels of a flat folder: lines 'relative/path label' (comma or space separated)")
    parser.add_argument("--unconditional", action="store_true", help="a flat folder without labels (label -1)")
    parser.add_argument("--vae", default=None, metavar="PATH_OR_ID",
                        help="diffusers AutoencoderKL: a local folder or a hub id (online); 'mse'/'ema' for "
                        "stabilityai/sd-vae-ft-mse / -ema (default: stabilityai/sd-vae-ft-mse, scale 0.18215)")
    def resolution(text: str) -> int:
        import argparse

        value = arg_type(Check(int), "count")(text)
        try:
            return check_resolution(value)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    parser.add_argument("--resolution", type=resolution, default=256,
                        help=f"centre-crop size in pixels: {RESOLUTION_RULE}")
    parser.add_argument("--flip", action="store_true", help="also store the horizontal mirror of every image")
    parser.add_argument("--shard-size", type=arg_type(COUNT, "count"), default=10_000, help="images per shard (also the resume unit)")
    parser.add_argument("--batch-size", type=arg_type(field_check("batch_size"), "count"), default=64, help="images per VAE batch")
    parser.add_argument("--workers", type=arg_type(Check(int, lo=0, hi=1024), "count"), default=4, help="image-decoding worker processes")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="VAE compute precision (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--storage", choices=("float32", "float16"), default="float32", help="dtype of stored moments")
    parser.add_argument("--device", type=arg_type(DEVICE, "device"), default="auto",
                        help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="tqdm progress bar")


def run(args) -> int:
    from .values import make_out_dir, resolve_device

    resolve_device(args.device)  # before the (slow) VAE load: a bad --device or --out fails at once
    make_out_dir(args.out)
    res = extract(
        args.images, args.out, vae_name=args.vae, resolution=args.resolution, labels_file=args.labels,
        unconditional=args.unconditional, flip=args.flip, shard_size=args.shard_size, batch_size=args.batch_size,
        workers=args.workers, precision=args.precision, storage_dtype=args.storage, device=args.device,
        progress={"auto": None, "on": True, "off": False}[args.progress],
    )
    if res.get("complete"):
        print(json.dumps({k: res[k] for k in ("count", "encoded_images", "skipped", "num_classes", "resolution",
                                              "latent_size", "scale_factor", "vae", "vae_hash")}, indent=2))
    return 0

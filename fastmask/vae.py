"""The Stable Diffusion KL-f8 VAE (diffusers ``AutoencoderKL``): load, encode to moments, decode.

MaskDiT and DiT train in the latent space of this VAE: a 256x256 image becomes 4 x 32 x 32
latents, a 512x512 image 4 x 64 x 64, and the diffusion model sees ``z = 0.18215 * latent``.
DiT's sampling scripts default to the ft-MSE fine-tune ``stabilityai/sd-vae-ft-mse``; the
ft-EMA one (``stabilityai/sd-vae-ft-ema``) has the same encoder. Both are accepted by name, as
``mse`` / ``ema``, as a hub id (when the machine is online) or as a local folder holding the
diffusers files (``config.json`` + ``diffusion_pytorch_model.safetensors``).

diffusers is an optional dependency (``pip install 'fastmask-dit[latents]'``), imported only
when a VAE is loaded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from .errors import UsageError

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
SHORT_NAMES = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}
SCALE_FACTOR = 0.18215
EXTRA_HINT = "pip install 'fastmask-dit[latents]' (or: pip install diffusers)"


def require_diffusers():
    """The diffusers module, or a UsageError that says which extra to install."""
    try:
        import diffusers
    except ImportError as e:
        raise UsageError(f"--vae: the VAE needs the optional package diffusers ({e}); {EXTRA_HINT}") from None
    return diffusers


def resolve_name(name: str | None) -> str:
    """``None``/``mse``/``ema`` -> the hub id; anything else unchanged."""
    if not name:
        return DEFAULT_VAE
    return SHORT_NAMES.get(name, name)


def load_vae(name_or_path: str | None = None, *, device="cpu", dtype: torch.dtype = torch.float32, flag: str = "--vae"):
    """A diffusers ``AutoencoderKL`` in eval mode, from a local folder or a hub id.

    A local folder is read without touching the network. A hub id is fetched by diffusers when
    the machine is online (or found in the local hub cache); failing that, the error names
    ``flag`` and says to pass a local folder instead.
    """
    diffusers = require_diffusers()
    name = resolve_name(name_or_path)
    p = Path(name).expanduser()
    try:
        if p.exists():
            if not p.is_dir() or not (p / "config.json").exists():
                raise UsageError(
                    f"{flag}: {str(p)!r} is not a diffusers AutoencoderKL folder (expected config.json and "
                    "diffusion_pytorch_model.safetensors in it)"
                )
            vae = diffusers.AutoencoderKL.from_pretrained(str(p), torch_dtype=dtype, low_cpu_mem_usage=False)
        else:
            vae = diffusers.AutoencoderKL.from_pretrained(name, torch_dtype=dtype, low_cpu_mem_usage=False)
    except UsageError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"{flag}: could not load the VAE {name!r} ({first}); give a local folder with the diffusers files, "
            "or a hub id on a machine that is online"
        ) from None
    return vae.to(device=device).eval().requires_grad_(False)


def prepare(vae, device, dtype: torch.dtype):
    """``vae`` on ``device`` in ``dtype`` (cast only when it differs), eval mode, no grads."""
    p = next(vae.parameters())
    if p.dtype != dtype:
        vae = vae.to(dtype=dtype)
    return vae.to(device=device).eval().requires_grad_(False)


def vae_source(name_or_path: str | None) -> str:
    """What a manifest records as the VAE: the absolute folder, or the hub id."""
    name = resolve_name(name_or_path)
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def vae_hash(vae) -> str:
    """sha256 of the VAE's weights (names, shapes and fp32 values, in name order): the same
    weights give the same hash whatever folder or hub id they came from."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def downsample_factor(vae) -> int:
    """Pixels per latent cell along one side (8 for the KL-f8 VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae) -> int:
    return int(vae.config.latent_channels)


@torch.no_grad()
def encode_moments(vae, images: Tensor) -> Tensor:
    """Posterior moments [B, 2C, h, w] (mean, then log-variance as diffusers clamps it to
    [-30, 20]) of images [B, 3, H, W] in [-1, 1]; computed in the VAE's dtype, returned fp32."""
    p = next(vae.parameters())
    dist = vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1).float()


@torch.no_grad()
def decode(vae, z: Tensor, scale: float = SCALE_FACTOR) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] (fp32, clamped) from scaled latents ``z`` (what the
    diffusion model samples): the VAE decodes ``z / scale``."""
    p = next(vae.parameters())
    x = vae.decode(z.to(device=p.device, dtype=p.dtype) / scale).sample
    return x.float().clamp(-1, 1)

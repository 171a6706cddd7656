"""EDM Heun sampler (Karras et al. 2022, Algorithm 1 with S_churn = 0) with classifier-free guidance.

sigma_i = (sigma_max^(1/rho) + i/(S-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i < S, then 0;
x_0 = sigma_0 * noise; Euler step to sigma_{i+1} and, unless sigma_{i+1} = 0, the Heun correction.
S steps cost 2S - 1 network calls. Guidance: the conditional and the null-label inputs run as one
batch and D = D_uncond + scale * (D_cond - D_uncond) on all channels.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None) -> Tensor:
    """[steps + 1] noise levels, from sigma_max down to sigma_min, then a final 0 (float64)."""
    if steps < 1:
        raise ValueError(f"steps: expected at least 1 sampling step, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(steps, dtype=torch.float64, device=device)
    denom = max(steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def null_labels(labels: Tensor) -> Tensor:
    """The "no label" version of ``labels``: -1 for integer labels, all-zero rows for one-hot."""
    if labels.dim() == 2:
        return torch.zeros_like(labels)
    return torch.full_like(labels, -1)


def guided_denoiser(net, guidance: float = 1.0, path_drop_guidance: bool = False):
    """D(x, sigma, labels) with classifier-free guidance ``guidance`` (1 = plain conditional), on
    all channels, or on the first ``net.guide_channels`` where the net sets it (a published DiT:
    3, as DiT's forward_with_cfg; D is affine in eps, so guiding D's channels guides eps's).
    ``path_drop_guidance``: SPRINT's PDG, the unconditional branch also drops the deep path
    (:func:`fastmask.flow_sampling.guidance_context`)."""
    from .flow_sampling import guidance_context

    guidance_context(net, path_drop_guidance)  # refuses a model without a deep path now

    def denoise(x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None or guidance == 1.0:
            return net(x, sigma, labels)
        with guidance_context(net, path_drop_guidance):
            both = net(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, null_labels(labels)]))
        cond, uncond = both.chunk(2)
        g = uncond + guidance * (cond - uncond)
        k = getattr(net, "guide_channels", None)  # a published DiT guides channels 0-2 only
        if k is not None and k < g.shape[1]:
            g = torch.cat([g[:, :k], cond[:, k:]], 1)
        return g

    return denoise


@torch.no_grad()
def heun_sample(
    net,
    noise: Tensor,
    labels: Tensor | None = None,
    *,
    steps: int = 18,
    guidance: float = 1.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    amp: bool = False,
    path_drop_guidance: bool = False,
) -> Tensor:
    """Deterministic EDM Heun sampling from ``noise`` [B, C, H, W] (unit Gaussian). ``net`` is an
    EDM denoiser D(x, sigma [B], labels) such as :class:`fastmask.models.EDMPrecond`. The ODE state
    is kept in float32; ``amp`` runs the network under bf16 autocast (CUDA). A flow-matching
    model (``net.objective == "flow"``) is integrated from t = 0 to 1 by Heun on a fixed grid of
    ``steps`` steps instead (:func:`fastmask.flow_sampling.flow_sample`). ``path_drop_guidance``:
    SPRINT's Path-Drop Guidance in place of plain classifier-free guidance (:func:`guided_denoiser`)."""
    if getattr(net, "objective", "edm") == "flow":
        from .flow_sampling import flow_sample

        return flow_sample(net, noise, labels, method="heun", steps=steps, guidance=guidance,
                           guide_channels=getattr(net, "guide_channels", None), amp=amp,
                           path_drop_guidance=path_drop_guidance)
    denoise = guided_denoiser(net, guidance, path_drop_guidance)
    # a denoiser may support only a range of sigma (DDPM-trained DiT: about 0.01 .. 157)
    sigma_min = max(sigma_min, getattr(net, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(net, "sigma_max", float("inf")))
    t = edm_sigmas(steps, sigma_min, sigma_max, rho, device=noise.device)
    B = noise.shape[0]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    x = noise.float() * t[0].float()
    with ctx:
        for i in range(steps):
            t_cur, t_next = t[i].float(), t[i + 1].float()
            d_cur = (x - denoise(x, t_cur.expand(B), labels).float()) / t_cur
            x_next = x + (t_next - t_cur) * d_cur
            if i < steps - 1:  # t_next > 0: second-order correction
                d_next = (x_next - denoise(x_next, t_next.expand(B), labels).float()) / t_next
                x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
            x = x_next
    return x


def sample(
    net,
    labels: Tensor | None,
    shape: tuple[int, int, int],
    *,
    num: int | None = None,
    steps: int = 18,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    device="cpu",
    amp: bool = False,
    path_drop_guidance: bool = False,
) -> Tensor:
    """Samples [B, C, H, W] for ``labels`` [B] (or ``num`` unconditional ones), in chunks of
    ``batch_size``. The noise of sample i depends only on (seed, i), not on the chunking.
    ``path_drop_guidance``: SPRINT's PDG in place of plain guidance (:func:`heun_sample`)."""
    n = labels.shape[0] if labels is not None else num
    if n is None or n < 1:
        raise ValueError("labels: give class labels [B] or a sample count (num)")
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=g)
    out = []
    was_training = getattr(net, "training", False)
    if hasattr(net, "eval"):
        net.eval()
    try:
        for s in range(0, n, batch_size):
            lab = labels[s : s + batch_size].to(device) if labels is not None else None
            out.append(
                heun_sample(net, noise[s : s + batch_size].to(device), lab, steps=steps, guidance=guidance, amp=amp,
                            path_drop_guidance=path_drop_guidance).cpu()
            )
    finally:
        if was_training:
            net.train()
    return torch.cat(out)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images [B, C, H, W] -> uint8 [B, H, W, C]."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def save_grid(images: Tensor, path, rows: int, upscale: int = 4, pad: int = 1) -> None:
    """Save [-1, 1] images [rows * cols, C, H, W] as one PNG grid (row-major), each image
    enlarged ``upscale`` times with nearest-neighbour so small samples stay legible."""
    from PIL import Image

    n, C, H, W = images.shape
    cols = (n + rows - 1) // rows
    u8 = to_uint8(images).numpy()
    Hs, Ws = H * upscale, W * upscale
    canvas = torch.full(((Hs + pad) * rows + pad, (Ws + pad) * cols + pad, C), 255, dtype=torch.uint8).numpy()
    for k in range(n):
        r, c = divmod(k, cols)
        tile = u8[k].repeat(upscale, axis=0).repeat(upscale, axis=1)
        y0, x0 = pad + r * (Hs + pad), pad + c * (Ws + pad)
        canvas[y0 : y0 + Hs, x0 : x0 + Ws] = tile
    Image.fromarray(canvas[..., 0] if C == 1 else canvas[..., :3]).save(path)


def save_images(images: Tensor, folder, labels: Tensor | None = None, prefix: str = "sample") -> list[str]:
    """One PNG per sample: ``<prefix>_<i>_class<label>.png``."""
    import os

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    u8 = to_uint8(images).numpy()
    paths = []
    for i, a in enumerate(u8):
        tag = f"_class{int(labels[i])}" if labels is not None and labels.dim() == 1 else ""
        p = os.path.join(folder, f"{prefix}_{i:05d}{tag}.png")
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a[..., :3]).save(p)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- loading models
def load_model(path, *, use_ema: bool = True, device="cpu", key: str | None = None, parameterization: str = "auto",
               trust_pickle: bool = False):
    """A denoiser D(x, sigma, labels) from a checkpoint, and facts about it.

    ``path``: a fastmask training checkpoint (``.safetensors``, a checkpoint folder or a run
    folder), or a published MaskDiT/DiT state dict (``.pt``/``.pth``, via
    :func:`fastmask.models.from_published`). Published MaskDiT checkpoints are EDM models;
    published DiT checkpoints are DDPM eps-prediction models and are wrapped by
    :class:`DDPMDenoiser`; published SiT checkpoints (the DiT layout; recognised by a file name
    starting with ``SiT`` or stored arguments naming a SiT model) are flow models, wrapped by
    :class:`FlowPrecond` (``parameterization`` overrides: ``edm``, ``ddpm`` or ``flow``).
    Returns ``(net, info)`` with info = {num_classes, shape (C, H, W), kind (pixels|latents), source}.
    """
    from pathlib import Path

    from .errors import UsageError
    from .models import DDPMDenoiser, DiT, EDMPrecond, FlowPrecond, build_model, from_published

    p = Path(path)
    if p.is_dir() or p.suffix == ".safetensors":
        from .checkpoint_io import load_checkpoint
        from .presets import TrainConfig

        if key is not None:
            raise UsageError(f"--key: {key!r} selects an entry of a published .pt file; {str(p)!r} is a fastmask "
                             "checkpoint (use --weights ema|model)")
        ck = load_checkpoint(p)
        cfg = TrainConfig.from_dict(ck["config"])
        extra = ck["extra"]
        shape = tuple(extra.get("data_shape") or (cfg.channels, cfg.image_size, cfg.image_size))
        num_classes = extra.get("num_classes", cfg.num_classes or 0)
        net = build_model(cfg, shape, num_classes)
        sd = ck["ema"] if (use_ema and ck["ema"] is not None) else ck["model"]
        try:
            net.load_state_dict(sd)
        except RuntimeError as e:
            raise UsageError(f"checkpoint: {str(ck['path'])!r} does not fit the model its config describes: "
                             f"{str(e).splitlines()[0]}") from None
        info = {"num_classes": num_classes, "shape": shape, "kind": extra.get("data_kind", "pixels"),
                "source": str(ck["path"]), "step": ck["step"], "weights": "ema" if use_ema and ck["ema"] else "model",
                "objective": cfg.objective}
        return net.to(device).eval(), info
    if not p.exists():
        raise ValueError(f"checkpoint: {str(p)!r} does not exist")
    from .models import load_published_file

    obj = load_published_file(p, trust_pickle=trust_pickle)  # released files: tensors + argparse.Namespace
    net = from_published(obj, key=key)
    if parameterization == "auto":
        parameterization = "ddpm" if isinstance(net, DiT) else "edm"
        if isinstance(net, DiT) and _is_sit(p, obj):
            parameterization = "flow"
    if parameterization not in ("edm", "ddpm", "flow"):
        raise ValueError(f"parameterization: expected auto, edm, ddpm or flow, got {parameterization!r}")
    if parameterization == "flow":  # SiT: v(x_t, t), t in [0, 1]; its code guides channels 0-2 only
        den = FlowPrecond(net)
        den.guide_channels = 3
    else:
        den = EDMPrecond(net) if parameterization == "edm" else DDPMDenoiser(net)
        if parameterization == "ddpm":
            den.guide_channels = 3
    C, s = net.in_channels, net.input_size
    info = {"num_classes": net.num_classes, "shape": (C, s, s), "kind": "latents" if C == 4 else "pixels",
            "source": str(p), "parameterization": parameterization,
            "objective": "flow" if parameterization == "flow" else "edm"}
    return den.to(device).eval(), info


def _is_sit(path, obj) -> bool:
    """A SiT release: the file name (``SiT-XL-2-256x256.pt``) or train.py's stored ``args.model``."""
    from .models.checkpoint import stored_args

    if path.name.lower().startswith("sit"):
        return True
    return str(stored_args(obj).get("model", "")).startswith("SiT")


# --------------------------------------------------------------------------- fastmask sample
def add_loading_arguments(p, what: str, *, guidance: float | None = 1.5, steps: int | None = 18, seed: int = 0) -> None:
    """--checkpoint, --weights, --device and the sampler's --guidance, --steps and --seed, shared by
    ``fastmask sample`` and ``fastmask eval`` (``None``: the run's config)."""
    from .presets import field_check
    from .values import DEVICE, arg_type

    run = "the run's config"
    p.add_argument("--checkpoint", required=True, help=what)
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA weights (default) or the raw ones")
    p.add_argument("--device", type=arg_type(DEVICE, "device"), default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--guidance", type=arg_type(field_check("guidance"), "scale"), default=guidance,
                   help=f"classifier-free guidance scale, 1: none (default: {run if guidance is None else guidance})")
    p.add_argument("--steps", type=arg_type(field_check("sample_steps"), "count"), default=steps,
                   help=f"EDM Heun steps, 2 * steps - 1 network calls; 40 for published FIDs (default: "
                   f"{run if steps is None else steps})")
    p.add_argument("--seed", type=arg_type(field_check("seed"), "seed"), default=seed,
                   help=f"noise seed; sample i depends only on seed and i (default: {seed})")
    p.add_argument("--path-drop-guidance", action="store_true",
                   help="SPRINT models only: Path-Drop Guidance, the guided prediction's unconditional branch also "
                   "drops the deep path (the official PDG; cheaper than plain guidance)")


def check_path_drop_guidance(args, net) -> None:
    """``--path-drop-guidance`` needs a model with a deep path to drop (SPRINT): a one-line error otherwise."""
    from .errors import UsageError

    model = getattr(net, "model", net)
    if getattr(args, "path_drop_guidance", False) and not hasattr(model, "path_drop_guidance"):
        raise UsageError(f"--path-drop-guidance: only for SPRINT models; {str(args.checkpoint)!r} holds a "
                         f"{type(model).__name__}")




def parse_labels(text: str, num_classes: int) -> Tensor:
    """The class labels of ``--labels`` ("0,1,2,2"; -1: unconditional), checked against the model."""
    from .errors import UsageError

    K = num_classes
    items = text.split(",")
    if text.strip() and not all(v.strip() for v in items):
        raise UsageError(f"--labels: expected comma-separated integers, got an empty entry in {text!r}")
    try:
        labels = torch.tensor([int(v) for v in items if v.strip()], dtype=torch.long)
    except ValueError:
        raise UsageError(f"--labels: expected comma-separated integers, got {text!r}") from None
    if len(labels) == 0:
        raise UsageError("--labels: no labels given")
    if K == 0 and bool((labels >= 0).any()):
        raise UsageError("--labels: the model is unconditional; use --num")
    if bool(((labels < -1) | (labels >= max(K, 1))).any()):
        raise UsageError(f"--labels: expected values in [-1, {K - 1}] for this {K}-class model")
    return labels


# --------------------------------------------------------------------------- large sample sets
def block_noise(indices: Tensor, shape: tuple[int, ...], seed: int, block: int = 1024) -> Tensor:
    """Unit Gaussian noise [len(indices), *shape] where the noise of sample i depends only on
    (seed, i): samples come in blocks of ``block`` indices, block b drawn from a generator seeded
    by (seed, b). So any split of a sample set over ranks or batches draws the same noise."""
    idx = indices.cpu().long()
    out = torch.empty((len(idx), *shape))
    for b in torch.unique(idx // block).tolist():
        g = torch.Generator().manual_seed((seed % 2**31) * 2**21 + int(b))
        noise = torch.randn((block, *shape), generator=g)
        sel = (idx // block) == b
        out[sel] = noise[idx[sel] - b * block]
    return out


def balanced_labels(num_classes: int, total: int) -> Tensor:
    """``total`` class labels, every class ``total // num_classes`` or one more times
    (label of sample i: i mod num_classes), e.g. 50 of each ImageNet class for a 50k FID set."""
    if num_classes < 1 or total < 1:
        raise ValueError(f"total: expected a positive count of samples of {num_classes} classes, got {total}")
    return torch.arange(total) % num_classes


def rank_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous share [start, stop) of n samples that rank ``rank`` of ``world`` draws."""
    return n * rank // world, n * (rank + 1) // world


@torch.no_grad()
def generate(
    net,
    labels: Tensor | None,
    shape: tuple[int, int, int],
    start: int,
    stop: int,
    *,
    steps: int = 40,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    device="cpu",
    amp: bool = False,
    decode=None,
    flow: dict | None = None,
    path_drop_guidance: bool = False,
):
    """Yield (indices [b], outputs [b, ...] on the CPU) for samples ``start`` .. ``stop - 1`` of a
    sample set whose labels are ``labels`` (all of them, or None: unconditional). ``decode``
    (optional) maps a batch of sampled latents to images on the device (the VAE decoder), so
    only images leave the device. ``flow``: settings of a flow model's sampler
    (:func:`fastmask.flow_sampling.flow_sample`'s ``method``, ``interval``; default Heun, as
    :func:`heun_sample` runs it); the SDE's noise of a batch is seeded by (seed, its first index).
    ``path_drop_guidance``: SPRINT's PDG in place of plain guidance."""
    for s in range(start, stop, batch_size):
        idx = torch.arange(s, min(s + batch_size, stop))
        lab = labels[idx].to(device) if labels is not None else None
        noise = block_noise(idx, shape, seed).to(device)
        if flow and getattr(net, "objective", "edm") == "flow":
            from .flow_sampling import flow_sample

            kw = dict(flow)
            if kw.get("method") == "sde":
                kw["generator"] = torch.Generator(device=device).manual_seed(seed * 1_000_003 + int(idx[0]))
            x = flow_sample(net, noise, lab, steps=steps, guidance=guidance,
                            guide_channels=getattr(net, "guide_channels", None), amp=amp,
                            path_drop_guidance=path_drop_guidance, **kw)
        else:
            x = heun_sample(net, noise, lab, steps=steps, guidance=guidance, amp=amp,
                            path_drop_guidance=path_drop_guidance)
        if decode is not None:
            x = decode(x)
        yield idx, x.cpu()

"""``fastmask fid``: FID (and optionally Inception Score, precision/recall) of generated images.

    fastmask fid --samples samples/in256/samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
        --inception weights-inception-2015-12-05-6726825d.pth --isc --prc

Built on torch-fidelity (``pip install 'fastmask-dit[fid]'``), the maintained implementation
whose InceptionV3 is a port of the TensorFlow graph (2015-12-05) that the published FID protocol
uses (TTUR's FID code and ADM's evaluator, which MaskDiT and DiT report), including its
TF-style bilinear resize to 299x299 (torch-fidelity documents its metrics' agreement with those
reference implementations). Features: the 2048-d pool features for FID and precision/recall, the
unbiased logits for IS. Nothing is downloaded: ``--inception`` is a local weights file in
torch-fidelity's layout (its release file ``weights-inception-2015-12-05-6726825d.pth``).

Inputs (``--samples`` and ``--ref``): a folder of images (searched recursively), an ``.npz``
whose ``arr_0`` is uint8 images [N, H, W, 3] (the layout ADM's evaluator and
``fastmask sample --npz`` use), or, for ``--ref`` only, precomputed statistics: an ``.npz``
with ``mu`` [2048] and ``sigma`` [2048, 2048], such as ADM's reference batches
(``VIRTUAL_imagenet256_labeled.npz`` holds images and statistics; FID then uses its statistics,
precision/recall its images). Those statistics were computed with the TensorFlow network;
torch-fidelity's port reproduces its features to float rounding.

The digits demo keeps its own classifier-feature Frechet distance (:mod:`fastmask.evaluate`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
EXTRA_HINT = "pip install 'fastmask-dit[fid]' (or: pip install torch-fidelity)"
POOL, LOGITS = "2048", "logits_unbiased"


def require_torch_fidelity():
    try:
        import torch_fidelity
    except ImportError as e:
        raise UsageError(f"fid: FID needs the optional package torch-fidelity ({e}); {EXTRA_HINT}") from None
    return torch_fidelity


# --------------------------------------------------------------------------- the formula
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians (float64), computed by
    torch-fidelity's ``fid_statistics_to_metric`` (trace of the matrix square root from the
    eigenvalues of S1 S2)."""
    require_torch_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"statistics: expected mu [D] and sigma [D, D] of the same D, got mu {mu1.shape} / {mu2.shape}, "
            f"sigma {s1.shape} / {s2.shape}"
        )
    return float(fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)[KEY_METRIC_FID])


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) of features [N, D], float64 (unbiased covariance, as in
    TTUR/ADM/torch-fidelity)."""
    f = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


# --------------------------------------------------------------------------- inputs
class ImageSource:
    """uint8 images [B, 3, H, W] in batches from a folder, an ``.npz`` (``arr_0`` NHWC) or an
    array/tensor [N, H, W, C] uint8."""

    def __init__(self, spec, flag: str = "--samples", limit: int | None = None):
        self.flag, self.files, self.array = flag, None, None
        if isinstance(spec, (np.ndarray, torch.Tensor)):
            self.array = np.asarray(spec)
            self.name = f"array {self.array.shape}"
        else:
            p = Path(spec)
            self.name = str(p)
            if p.is_dir():
                self.files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
                if not self.files:
                    raise UsageError(f"{flag}: no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {str(p)!r}")
            elif p.suffix == ".npz" and p.is_file():
                with _open_npz(p, flag) as z:
                    if "arr_0" not in z.files:
                        raise UsageError(f"{flag}: {str(p)!r} has no image array 'arr_0' (keys: {z.files})")
                    try:
                        self.array = z["arr_0"]
                    except Exception as e:
                        raise UsageError(f"{flag}: cannot read the images arr_0 of {str(p)!r} ({type(e).__name__})") from None
            elif p.suffix == ".npy" and p.is_file():
                self.array = np.load(p, mmap_mode="r")
            else:
                raise UsageError(f"{flag}: {str(p)!r} is not a folder of images or an .npz/.npy file")
        if self.array is not None:
            a = self.array
            if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] not in (1, 3):
                raise UsageError(f"{flag}: expected uint8 images [N, H, W, 3] in {self.name}, got {a.dtype} {a.shape}")
        if limit is not None:
            if limit > len(self):
                raise UsageError(f"--num: asked for {limit} images but {self.name} has {len(self)}")
            if self.files is not None:
                self.files = self.files[:limit]
            else:
                self.array = self.array[:limit]

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self.array)

    def check_files(self) -> None:
        """Open every image file (headers and data checked, nothing decoded into memory): an
        unreadable one is named now rather than in the middle of an Inception pass."""
        from PIL import Image

        for f in self.files or ():
            try:
                with Image.open(f) as im:
                    im.verify()
            except Exception as e:
                raise UsageError(f"{self.flag}: cannot read image {str(f)!r} ({type(e).__name__})") from None

    def _load(self, f) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(f) as im:
                return np.asarray(im.convert("RGB"))
        except Exception as e:
            raise UsageError(f"{self.flag}: cannot read image {str(f)!r} ({type(e).__name__})") from None

    def batches(self, batch_size: int):
        n = len(self)
        for s in range(0, n, batch_size):
            if self.files is not None:
                imgs = [self._load(f) for f in self.files[s : s + batch_size]]
                groups: dict = {}
                for a in imgs:  # images of different sizes go through the network separately
                    groups.setdefault(a.shape, []).append(a)
                for arrs in groups.values():
                    yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
            else:
                a = np.asarray(self.array[s : s + batch_size])
                if a.shape[-1] == 1:
                    a = np.repeat(a, 3, axis=-1)
                yield torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def _open_npz(p: Path, flag: str):
    try:
        return np.load(p)
    except Exception as e:
        raise UsageError(f"{flag}: cannot read {str(p)!r} as an .npz file ({type(e).__name__})") from None


def read_stats(path, flag: str = "--ref") -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) from an ``.npz`` holding ``mu`` and ``sigma`` (ADM reference batches,
    ``fastmask fid --save-stats``), or None when it has none. Statistics that are not mu [D]
    and sigma [D, D] of finite numbers, or a file that does not read, are refused naming ``flag``."""
    p = Path(path)
    if p.suffix != ".npz" or not p.is_file():
        return None
    with _open_npz(p, flag) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            return None
        try:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        except Exception as e:
            raise UsageError(f"{flag}: cannot read the statistics mu/sigma in {str(p)!r} ({type(e).__name__})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise UsageError(f"{flag}: expected statistics mu [D] and sigma [D, D] in {str(p)!r}, got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{flag}: the statistics in {str(p)!r} hold NaN or infinite values")
    return mu, sigma


def has_images(path) -> bool:
    p = Path(path)
    if p.is_dir():
        return True
    if p.suffix == ".npz" and p.is_file():
        with _open_npz(p, "--ref") as z:
            return "arr_0" in z.files
    return p.suffix == ".npy" and p.is_file()


# --------------------------------------------------------------------------- features
def load_inception(path, device="cpu"):
    """torch-fidelity's InceptionV3 (TF-FID port) with weights from the local file ``path``;
    gives the pool features and the unbiased logits."""
    if not path:
        raise UsageError(
            "--inception: give the local InceptionV3 weights file (torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth); nothing is downloaded"
        )
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--inception: no such file {str(p)!r}")
    require_torch_fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS], feature_extractor_weights_path=str(p))
    except Exception as e:
        raise UsageError(
            f"--inception: {str(p)!r} is not an InceptionV3 weights file in torch-fidelity's layout "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None
    return net.to(device).eval()


@torch.no_grad()
def extract_features(source: ImageSource, extractor, *, batch_size: int = 50, device="cpu", progress=None) -> dict:
    """{'2048': [N, 2048], 'logits_unbiased': [N, 1008]} (float64 tensors on the CPU); works
    with any module that maps uint8 [B, 3, H, W] to a tuple (pool, logits) or to pool alone."""
    from tqdm import tqdm

    pools, logits = [], []
    bar = tqdm(total=len(source), desc=f"features {Path(source.name).name}", unit="img", disable=progress is not True)
    for x in source.batches(batch_size):
        out = extractor(x.to(device))
        if isinstance(out, (tuple, list)):
            pools.append(out[0].double().cpu())
            if len(out) > 1:
                logits.append(out[1].double().cpu())
        else:
            pools.append(out.double().cpu())
        bar.update(len(x))
    bar.close()
    feats = {POOL: torch.cat(pools)}
    if logits:
        feats[LOGITS] = torch.cat(logits)
    return feats


# --------------------------------------------------------------------------- metrics
def compute(
    samples,
    reference,
    *,
    inception=None,
    extractor=None,
    isc: bool = False,
    prc: bool = False,
    num: int | None = None,
    batch_size: int = 50,
    device="cpu",
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    save_stats=None,
    progress=None,
) -> dict:
    """FID between ``samples`` and ``reference`` (see the module doc for what each may be), plus
    Inception Score (``isc``) and precision/recall (``prc``). ``extractor`` replaces the
    Inception network loaded from ``inception`` (a module: uint8 images -> (pool, logits))."""
    require_torch_fidelity()
    src = ImageSource(samples, "--samples", limit=num)
    # The reference is read and checked whole before any feature is extracted: a corrupt one
    # is reported at once, not after the samples' Inception pass.
    ref_stats = read_stats(reference) if not isinstance(reference, (np.ndarray, torch.Tensor)) else None
    if ref_stats is None and not isinstance(reference, (np.ndarray, torch.Tensor)):
        rp = Path(reference)
        if not rp.exists():
            raise UsageError(f"--ref: no such file or folder {str(rp)!r}")
    need_ref_images = ref_stats is None or prc
    if need_ref_images and not isinstance(reference, (np.ndarray, torch.Tensor)) and not has_images(reference):
        raise UsageError(f"--ref: {str(reference)!r} holds statistics only; precision/recall (--prc) needs its images")
    ref_src = None
    if need_ref_images:
        ref_src = ImageSource(reference, "--ref")
        ref_src.check_files()
        if len(ref_src) < 2:
            raise UsageError(f"--ref: FID needs at least 2 reference images, {ref_src.name} has {len(ref_src)}")
    if ref_stats is not None and extractor is None and ref_stats[0].shape[0] != int(POOL):
        raise UsageError(f"--ref: its statistics have {ref_stats[0].shape[0]} features, the Inception pool gives {POOL}")
    if len(src) < 2:
        raise UsageError(f"--samples: FID needs at least 2 images, {src.name} has {len(src)}")
    if extractor is None:
        extractor = load_inception(inception, device)
    feats = extract_features(src, extractor, batch_size=batch_size, device=device, progress=progress)
    mu, sigma = statistics(feats[POOL])
    result = {"num_samples": len(src), "samples": src.name}
    ref_feats = None
    if need_ref_images:
        ref_feats = extract_features(ref_src, extractor, batch_size=batch_size, device=device, progress=progress)
        result["num_reference"] = len(ref_src)
    if ref_stats is not None:
        mu_r, sigma_r = ref_stats
        result["reference_statistics"] = "precomputed (mu, sigma)"
    else:
        mu_r, sigma_r = statistics(ref_feats[POOL])
        result["reference_statistics"] = "computed from the reference images"
    if mu_r.shape != mu.shape:
        raise UsageError(f"--ref: its statistics have {mu_r.shape[0]} features, the network gives {mu.shape[0]}")
    result["reference"] = str(reference) if not isinstance(reference, (np.ndarray, torch.Tensor)) else "array"
    result["fid"] = frechet_distance(mu, sigma, mu_r, sigma_r)
    if isc:
        result.update(_inception_score(feats, len(src), isc_splits))
    if prc:
        result.update(_precision_recall(feats, ref_feats, len(src), prc_neighborhood))
    if save_stats:
        np.savez(save_stats, mu=mu, sigma=sigma)
        result["saved_stats"] = str(save_stats)
    return result


def _inception_score(feats: dict, n: int, splits: int) -> dict:
    if LOGITS not in feats:
        raise UsageError("--isc: the feature network gives no logits")
    from torch_fidelity.metric_isc import isc_features_to_metric

    if n < splits:
        raise UsageError(f"--isc: needs at least --isc-splits={splits} samples, got {n}")
    r = isc_features_to_metric(feats[LOGITS], splits=splits)
    return {"inception_score_mean": float(r["inception_score_mean"]),
            "inception_score_std": float(r["inception_score_std"])}


def _precision_recall(feats: dict, ref_feats: dict, n: int, neighborhood: int) -> dict:
    from torch_fidelity.metric_prc import prc_features_to_metric

    k = min(neighborhood, n - 1, len(ref_feats[POOL]) - 1)
    r = prc_features_to_metric(feats[POOL].float(), ref_feats[POOL].float(), prc_neighborhood=k,
                               prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {"precision": float(r["precision"]), "recall": float(r["recall"]), "prc_neighborhood": k}


# --------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    from .presets import field_check
    from .values import DEVICE, MAX_SAMPLES, Check, arg_type

    parser.add_argument("--samples", required=True, metavar="PATH",
                        help="generated images: a folder, or an .npz with arr_0 uint8 [N, H, W, 3]")
    parser.add_argument("--ref", required=True, metavar="PATH",
                        help="reference: a folder, an .npz of images (arr_0), or statistics (.npz with mu, sigma; "
                        "ADM reference batches have both)")
    parser.add_argument("--inception", default=None, metavar="FILE",
                        help="local InceptionV3 weights in torch-fidelity's layout "
                        "(weights-inception-2015-12-05-6726825d.pth); required, nothing is downloaded")
    parser.add_argument("--isc", action="store_true", help="also the Inception Score of the samples")
    parser.add_argument("--isc-splits", type=arg_type(Check(int, lo=1, hi=1000), "count"), default=10, help="splits of the Inception Score (10 as published)")
    parser.add_argument("--prc", action="store_true", help="also precision and recall (k=3 nearest neighbours)")
    parser.add_argument("--num", type=arg_type(Check(int, lo=1, hi=MAX_SAMPLES), "count"), default=None,
                        help="use only the first N samples")
    parser.add_argument("--batch-size", type=arg_type(field_check("batch_size"), "count"), default=50,
                        help="images per Inception batch")
    parser.add_argument("--save-stats", default=None, metavar="FILE.npz", help="write the samples' mu/sigma here")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the result as JSON")
    parser.add_argument("--device", type=arg_type(DEVICE, "device"), default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto", help="tqdm progress bar")


def run(args) -> int:
    from .values import check_out_file, resolve_device

    resolve_device(args.device)  # the flags first: a bad one fails before any image is read
    check_out_file(args.out, "--out")
    check_out_file(args.save_stats, "--save-stats", ".npz")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected at least 1, got {args.batch_size}")
    device = str(resolve_device(args.device))
    progress = {"auto": sys.stderr.isatty(), "on": True, "off": False}[args.progress]
    res = compute(args.samples, args.ref, inception=args.inception, isc=args.isc, prc=args.prc, num=args.num,
                  batch_size=args.batch_size, device=device, isc_splits=args.isc_splits, save_stats=args.save_stats,
                  progress=progress)
    res["inception"] = str(args.inception)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out is not None:
        from .checkpoint_io import atomic_write_json

        atomic_write_json(args.out, res)
    return 0

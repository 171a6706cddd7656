"""Data sets for training: the built-in digits, VAE-latent shards, and image folders.

Every data set exposes ``len(ds)``, ``ds.shape`` (C, H, W of what the model sees),
``ds.num_classes`` and ``ds.batch(indices, eps=None) -> (x [B, C, H, W] float32, labels [B] int64)``.
The training loop picks the indices (:func:`batch_indices`) and, for latents, passes the
noise ``eps`` of the VAE posterior draw, so that every source of randomness is a function of
(seed, step, global sample index) and a run is identical on 1 or many ranks and after a resume.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LATENT_KEYS = ("moments", "latents", "x", "arr_0")
LABEL_KEYS = ("labels", "label", "y")


class DigitsDataset:
    """scikit-learn's digits (1,797 8x8 images, 10 classes), upsampled bilinearly to
    ``image_size`` and scaled from [0, 16] to [-1, 1]; all of it held in memory."""

    def __init__(self, image_size: int = 16, channels: int = 1):
        if channels != 1:
            raise ValueError(f"channels: the digits are grayscale, expected channels=1, got {channels}")
        if image_size < 8:
            raise ValueError(f"image_size: expected at least 8 for the 8x8 digits, got {image_size}")
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)  # [n, 1, 8, 8] in [0, 1]
        if image_size != 8:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = (x * 2 - 1).clamp(-1, 1).contiguous()
        self.labels = torch.from_numpy(d.target.astype(np.int64))
        self.num_classes = 10
        self.shape = tuple(self.images.shape[1:])
        self.kind = "pixels"

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Tensor, eps: Tensor | None = None):
        idx = indices.cpu()
        return self.images[idx], self.labels[idx]


class ImageFolderDataset:
    """root/<class name>/*.png|jpg...: classes are the sorted sub-folder names. Images are
    converted to grayscale (channels=1) or RGB (channels=3), centre-cropped to a square, resized
    to ``image_size`` and scaled to [-1, 1]. Loaded lazily with PIL (decoded once, then cached)."""

    def __init__(self, root: str, image_size: int = 32, channels: int = 3, cache: bool = True):
        if channels not in (1, 3):
            raise ValueError(f"channels: image folders give 1 (grayscale) or 3 (RGB) channels, got {channels}")
        path = Path(root)
        if not path.is_dir():
            raise ValueError(f"data_path: image folder {str(path)!r} does not exist or is not a folder")
        classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise ValueError(
                f"data_path: {str(path)!r} has no class sub-folders; expected root/<class>/<image files>"
            )
        from PIL import Image

        self.files: list[Path] = []
        self.skipped: list[Path] = []  # files that PIL cannot open (header check), left out
        labels = []
        for i, c in enumerate(classes):
            files = sorted(f for f in (path / c).rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            for f in files:
                try:
                    with Image.open(f) as im:  # reads the header only
                        ok = im.size[0] > 0 and im.size[1] > 0
                except Exception:
                    ok = False
                if ok:
                    self.files.append(f)
                    labels.append(i)
                else:
                    self.skipped.append(f)
        if not self.files:
            extra = f" ({len(self.skipped)} unreadable, e.g. {str(self.skipped[0])!r})" if self.skipped else ""
            raise ValueError(
                f"data_path: no images ({', '.join(IMAGE_EXTENSIONS)}) that can be opened in the class folders of "
                f"{str(path)!r}"
                + extra
            )
        self.classes = classes
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(classes)
        self.image_size, self.channels = image_size, channels
        self.shape = (channels, image_size, image_size)
        self.kind = "pixels"
        self._cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
                a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        except (OSError, ValueError, SyntaxError) as e:  # a file whose header is fine but data are not
            raise ValueError(f"{self.files[i]}: cannot decode the image ({type(e).__name__}: {e})") from None
        t = torch.from_numpy(a.reshape(self.image_size, self.image_size, self.channels)).permute(2, 0, 1).contiguous()
        if self._cache is not None:
            self._cache[i] = t
        return t

    def batch(self, indices: Tensor, eps: Tensor | None = None):
        idx = indices.cpu().tolist()
        return torch.stack([self._load(i) for i in idx]), self.labels[indices.cpu()]


class LatentShardDataset:
    """VAE-latent shards as MaskDiT stores them: posterior moments [n, 2C, h, w] (the first C
    channels the mean, the last C the log-variance) plus integer labels [n].

    ``path`` is one file or a folder of files:
      * ``.npz`` with the moments under one of ``moments``/``latents``/``x`` and the labels under
        ``labels``/``label``/``y`` (a file without labels is unconditional: labels -1);
      * ``.npy`` holding the moments, with the labels in ``<stem>.labels.npy`` or
        ``<stem>_labels.npy`` next to it (files named ``*labels.npy`` are never read as moments).
    ``.npy`` files are memory-mapped. Each draw is z = scale * (mean + exp(logvar / 2) * eps).
    """

    def __init__(self, path: str, channels: int = 4, image_size: int | None = None, scale: float = 0.18215):
        p = Path(path)
        if not p.exists():
            raise ValueError(f"data_path: latent shard path {str(p)!r} does not exist")
        if p.is_dir():
            files = sorted(
                f for f in p.iterdir() if f.suffix in (".npy", ".npz") and not f.name.endswith("labels.npy")
            )
            if not files:
                raise ValueError(f"data_path: no .npy/.npz latent shards in folder {str(p)!r}")
        else:
            if p.suffix not in (".npy", ".npz"):
                raise ValueError(f"data_path: expected a .npy/.npz latent shard or a folder of them, got {str(p)!r}")
            files = [p]
        self.channels, self.scale = channels, scale
        self.moments: list[np.ndarray] = []
        labels = []
        for f in files:
            m, y = _load_shard(f)
            if m.dtype not in (np.float16, np.float32, np.float64):
                raise ValueError(f"{f}: expected floating-point moments, got dtype {m.dtype}")
            if m.ndim != 4:
                raise ValueError(f"{f}: expected moments of shape [n, {2 * channels}, h, w], got shape {m.shape}")
            if m.shape[1] != 2 * channels:
                raise ValueError(
                    f"{f}: expected {2 * channels} moment channels (mean and log-variance of {channels} latent "
                    f"channels), got {m.shape[1]} (shape {m.shape}); set channels={m.shape[1] // 2} if that is meant"
                )
            if m.shape[0] == 0:
                raise ValueError(f"{f}: the shard holds no samples (shape {m.shape})")
            if self.moments and m.shape[1:] != self.moments[0].shape[1:]:
                raise ValueError(f"{f}: shape {m.shape[1:]} differs from the first shard's {self.moments[0].shape[1:]}")
            if y is None:
                y = np.full(m.shape[0], -1, dtype=np.int64)
            y = np.asarray(y)
            if y.ndim != 1:
                raise ValueError(f"{f}: expected labels of shape [{m.shape[0]}] (class indices), got shape {y.shape}")
            if y.shape[0] != m.shape[0]:
                raise ValueError(f"{f}: {m.shape[0]} latents but {y.shape[0]} labels")
            self.moments.append(m)
            labels.append(_int_labels(f, y))
        h, w = self.moments[0].shape[2:]
        if h != w:
            raise ValueError(f"{files[0]}: expected square latents, got {h}x{w}")
        if image_size is not None and h != image_size:
            raise ValueError(f"{files[0]}: latents are {h}x{w} but image_size={image_size}; set image_size={h}")
        self.labels = torch.from_numpy(np.concatenate(labels))
        self.num_classes = int(self.labels.max().item()) + 1 if (self.labels >= 0).any() else 0
        if self.num_classes > MAX_INFERRED_CLASSES:
            i = int(self.labels.argmax())
            f = files[int(np.searchsorted(np.cumsum([len(v) for v in labels]), i, side="right"))]
            raise ValueError(
                f"{f}: holds the label {self.num_classes - 1}; labels must be class indices in [0, num_classes) "
                f"(-1 = unlabelled); set num_classes if {self.num_classes} classes are really meant"
            )
        self.offsets = np.cumsum([0] + [m.shape[0] for m in self.moments])
        self.shape = (channels, h, w)
        self.kind = "latents"

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, indices: Tensor, eps: Tensor | None = None):
        idx = indices.cpu().numpy()
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        rows = [self.moments[s][i - self.offsets[s]] for s, i in zip(shard, idx)]
        m = torch.from_numpy(np.stack(rows).astype(np.float32))
        mean, logvar = m.chunk(2, dim=1)
        if eps is None:
            eps = torch.zeros_like(mean)
        z = self.scale * (mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype))
        return z, self.labels[torch.from_numpy(idx)]


MAX_INFERRED_CLASSES = 1_000_000  # more classes than this inferred from labels is taken as bad data


def _int_labels(f, y: np.ndarray) -> np.ndarray:
    """Labels as int64 class indices; float labels must hold whole numbers (no truncation)."""
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{f}: expected integer class labels, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            bad = y[~np.isfinite(y) | (y != np.round(y))][0]
            raise ValueError(f"{f}: labels must be whole class indices, found {bad} (dtype {y.dtype})")
        if y.size and (np.abs(y) > 2**62).any():
            raise ValueError(f"{f}: labels must be class indices, found {y[np.abs(y) > 2**62][0]}")
    y = y.astype(np.int64)
    if y.size and y.min() < -1:
        raise ValueError(f"{f}: labels must be class indices >= 0 (or -1 = unlabelled), found {int(y.min())}")
    return y


def check_labels(ds, num_classes: int) -> None:
    """Every label of ``ds`` must lie in [0, num_classes) (-1 = unlabelled is also allowed),
    checked before training rather than as an out-of-range index later."""
    labels = getattr(ds, "labels", None)
    if labels is None or num_classes <= 0 or len(labels) == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < -1 or hi >= num_classes:
        raise ValueError(
            f"num_classes: the data set has labels in [{lo}, {hi}] but num_classes={num_classes}; "
            f"labels must lie in [0, {num_classes}) (-1 = unlabelled)"
        )


def _load_shard(f: Path):
    try:
        if f.suffix == ".npz":
            with np.load(f) as z:
                key = next((k for k in LATENT_KEYS if k in z.files), None)
                if key is None:
                    raise ValueError(f"{f}: no moments array; expected one of the keys {LATENT_KEYS}, found {z.files}")
                lkey = next((k for k in LABEL_KEYS if k in z.files), None)
                return z[key], (z[lkey] if lkey else None)
        m = np.load(f, mmap_mode="r")
        for cand in (f.with_name(f.stem + ".labels.npy"), f.with_name(f.stem + "_labels.npy")):
            if cand.exists():
                return m, np.load(cand)
        return m, None
    except ValueError as e:
        if str(e).startswith(str(f)):
            raise
        raise ValueError(f"{f}: not a readable .npy/.npz latent shard ({e})") from None
    except Exception as e:  # torn or foreign files: OSError, EOFError, zipfile.BadZipFile ...
        raise ValueError(f"{f}: not a readable .npy/.npz latent shard ({type(e).__name__}: {e})") from None


def build_dataset(cfg):
    """The data set a :class:`fastmask.presets.TrainConfig` names."""
    if cfg.data == "digits":
        return DigitsDataset(cfg.image_size, cfg.channels)
    if cfg.data == "folder":
        return ImageFolderDataset(cfg.data_path, cfg.image_size, cfg.channels)
    if cfg.data == "latents":
        return LatentShardDataset(cfg.data_path, cfg.channels, cfg.image_size, cfg.latent_scale)
    raise ValueError(f"data: unknown data set {cfg.data!r}; expected digits, latents or folder")


class _EpochPermutations:
    """The concatenation of per-epoch random permutations of range(n), seeded by (seed, epoch):
    a pure function of its arguments, so a resumed or sharded run draws the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = None, None

    def perm(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def take(self, start: int, count: int) -> Tensor:
        out, pos = [], start
        while count > 0:
            epoch, off = divmod(pos, self.n)
            k = min(count, self.n - off)
            out.append(self.perm(epoch)[off : off + k])
            pos, count = pos + k, count - k
        return torch.cat(out)


def batch_indices(sampler: _EpochPermutations, step: int, global_batch: int, rank: int = 0, world: int = 1) -> Tensor:
    """Indices of this rank's share of global batch ``step`` (DistributedSampler-like: the global
    batch is the same for any number of ranks, each rank takes a contiguous slice of it)."""
    idx = sampler.take(step * global_batch, global_batch)
    per = global_batch // world
    return idx[rank * per : (rank + 1) * per]


def make_sampler(n: int, seed: int) -> _EpochPermutations:
    if n < 1:
        raise ValueError("data: the data set is empty")
    return _EpochPermutations(n, seed)


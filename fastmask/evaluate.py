"""An honest quality measure for the digits demo: a classifier trained on real digits.

* The classifier is scikit-learn's ``MLPClassifier`` (one hidden layer of 128 ReLU units) on the
  raw 16x16 pixels in [-1, 1], trained on a stratified 80% of the real digits; its accuracy on
  the held-out 20% is reported next to everything else, so the reader knows how much its
  labels can be trusted.
* Class-conditional samples are labelled by it: accuracy = fraction whose predicted class is
  the class they were generated for.
* Frechet distance (the FID formula) between Gaussian fits of real and generated images in the
  classifier's feature space, the 128 hidden-layer activations. The reference is the real
  training split; the same distance between the real held-out split and the training split is
  reported as the floor that a perfect generator would reach at that sample size.
"""
from __future__ import annotations

import numpy as np
import torch

FEATURES = "hidden layer (128 ReLU units) of an MLPClassifier trained on real 16x16 digits"


class DigitClassifier:
    """MLP on flattened pixels; ``features`` are its hidden-layer activations."""

    def __init__(self, seed: int = 0, hidden: int = 128):
        from sklearn.neural_network import MLPClassifier

        self.clf = MLPClassifier(
            hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=400, random_state=seed, early_stopping=False
        )
        self.seed = seed

    def fit(self, images: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.2) -> "DigitClassifier":
        from sklearn.model_selection import train_test_split

        X = _flat(images)
        y = labels.cpu().numpy()
        idx = np.arange(len(y))
        tr, te = train_test_split(idx, test_size=test_fraction, random_state=self.seed, stratify=y)
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        # one BLAS thread: multi-threaded OpenBLAS is many times slower on a busy machine
        with warnings.catch_warnings(), _one_blas_thread():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf.fit(X[tr], y[tr])
        self.train_idx, self.test_idx = tr, te
        self.test_accuracy = float((self.clf.predict(X[te]) == y[te]).mean())
        self.train_features = self.features(images[torch.from_numpy(tr)])
        self.test_features = self.features(images[torch.from_numpy(te)])
        return self

    def predict(self, images: torch.Tensor) -> np.ndarray:
        with _one_blas_thread():
            return self.clf.predict(_flat(images))

    def features(self, images: torch.Tensor) -> np.ndarray:
        X = _flat(images)
        return np.maximum(X @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1)


def _flat(images: torch.Tensor) -> np.ndarray:
    return images.detach().float().clamp(-1, 1).reshape(images.shape[0], -1).cpu().numpy().astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussian fits to features [n, d].

    Tr((S_a S_b)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric matrix S_a^(1/2) S_b S_a^(1/2) (same eigenvalues, numerically stable)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features: expected [n, d] arrays of the same d, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("features: need at least 2 samples on each side")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    sa_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sa_half @ sb @ sa_half
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * tr_sqrt)


def evaluate_samples(clf: DigitClassifier, samples: torch.Tensor, labels: torch.Tensor) -> dict:
    """Classifier accuracy (overall and per class) and Frechet distance of ``samples``."""
    pred = clf.predict(samples)
    y = labels.cpu().numpy()
    per_class = {int(c): float((pred[y == c] == c).mean()) for c in np.unique(y)}
    # the floor: real held-out digits, as many as there are samples (the estimate depends on n)
    n = min(len(y), len(clf.test_features))
    sub = np.random.default_rng(0).choice(len(clf.test_features), size=n, replace=False)
    return {
        "accuracy": float((pred == y).mean()),
        "per_class_accuracy": per_class,
        "frechet_distance": frechet_distance(clf.features(samples), clf.train_features),
        "frechet_distance_real_heldout_same_n": frechet_distance(clf.test_features[sub], clf.train_features),
        "num_samples": int(len(y)),
    }


def classifier_report(clf: DigitClassifier) -> dict:
    return {
        "model": "sklearn MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3) on 16x16 pixels in [-1, 1]",
        "train_size": int(len(clf.train_idx)),
        "heldout_size": int(len(clf.test_idx)),
        "heldout_accuracy_real": clf.test_accuracy,
        "frechet_features": FEATURES,
        "frechet_reference": "real training split of the classifier",
        "frechet_distance_real_heldout": frechet_distance(clf.test_features, clf.train_features),
    }


# --------------------------------------------------------------------------- run reports
def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """[num_classes * per_class] labels, class-major (0, 0, ..., 1, 1, ...)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def grid_order(labels: torch.Tensor, num_classes: int, per_row: int) -> torch.Tensor:
    """Indices of the first ``per_row`` samples of each class, class-major (rows = classes)."""
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_row] for c in range(num_classes)])


def sample_report(
    net,
    *,
    num_classes: int,
    shape: tuple,
    kind: str,
    out_dir,
    samples_per_class: int,
    grid_per_class: int,
    guidance: float,
    steps: int,
    seed: int,
    device,
    amp: bool = False,
    classifier: DigitClassifier | None = None,
    tag: str = "samples",
    batch_size: int = 250,
    npz: bool = False,
    path_drop_guidance: bool = False,
) -> dict:
    """Draw class-conditional samples with guidance (``path_drop_guidance``: SPRINT's PDG), save them (PNG grid for pixel models, .npy for
    latent models) and, with a ``classifier``, measure them. Returns a dict for metrics.json.
    ``npz``: pixel samples also go to ``<tag>.npz`` in the layout ``fastmask sample --npz`` writes
    (``arr_0`` uint8 [N, H, W, C], ``labels`` int64)."""
    import time
    from pathlib import Path

    from .sampling import sample, save_grid

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_class = max(samples_per_class, grid_per_class)
    labels = class_labels(num_classes, per_class) if num_classes > 0 else None
    n = None if labels is not None else max(per_class, 1) * 8
    t0 = time.perf_counter()
    x = sample(net, labels, shape, num=n, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, device=device, amp=amp,
               path_drop_guidance=path_drop_guidance)
    rep = {
        "guidance": guidance,
        **({"path_drop_guidance": True} if path_drop_guidance else {}),
        "sampler": (f"flow ODE Heun, {steps} steps ({2 * steps} network calls), t 0 -> 1"
                    if getattr(net, "objective", "edm") == "flow"
                    else f"EDM Heun, {steps} steps ({2 * steps - 1} network calls), sigma 80 -> 0.002, rho 7"),
        "sample_seconds": time.perf_counter() - t0,
    }
    if kind == "latents":
        np.save(out_dir / f"{tag}.npy", x.numpy())
        if labels is not None:
            np.save(out_dir / f"{tag}_labels.npy", labels.numpy())
        rep["files"] = [f"{tag}.npy"]
        return rep
    if labels is not None:
        idx = grid_order(labels, num_classes, grid_per_class)
        save_grid(x[idx], out_dir / f"{tag}.png", rows=num_classes)
    else:
        save_grid(x[: 8 * grid_per_class], out_dir / f"{tag}.png", rows=8)
    rep["files"] = [f"{tag}.png"]
    if npz:
        _save_npz(out_dir / f"{tag}.npz", x, labels)
        rep["files"].append(f"{tag}.npz")
    if classifier is not None and labels is not None:
        # every class gets samples_per_class samples in the measurement
        keep = torch.cat([torch.nonzero(labels == c).flatten()[:samples_per_class] for c in range(num_classes)])
        t1 = time.perf_counter()
        rep.update(evaluate_samples(classifier, x[keep], labels[keep]))
        rep["eval_seconds"] = time.perf_counter() - t1
    return rep


def _save_npz(path, images: torch.Tensor, labels: torch.Tensor | None) -> None:
    """[-1, 1] images -> ``path`` (.npz: arr_0 uint8 [N, H, W, C], and labels), written atomically."""
    import io

    from .checkpoint_io import atomic_write_bytes
    from .sampling import to_uint8

    arrays = {"arr_0": to_uint8(images).numpy()}
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def plot_loss_curve(log_path, png_path, title: str = "training loss") -> None:
    """Loss per logged interval against the step, phases coloured, from a run's log.jsonl."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r and "step" in r:
                rows.append(r)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for phase, name in ((1, "masked phase (DSM + MAE)"), (2, "unmasking fine-tune (DSM)")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("phase") == phase]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (batch mean)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


# --------------------------------------------------------------------------- fastmask eval
def add_arguments(e) -> None:
    """Options of ``fastmask eval``."""
    from .presets import field_check
    from .values import arg_type
    from .sampling import add_loading_arguments

    e.description = (
        "Sample every class of a digits model with guidance and label the samples with an MLP classifier trained on "
        "real digits; report its accuracy (and the classifier's own held-out accuracy on real digits) and the "
        "Frechet distance in the classifier's hidden-layer features.")
    add_loading_arguments(e, "a fastmask checkpoint file or run folder of a digits model", guidance=None, steps=None,
                          seed=1)
    e.add_argument("--samples-per-class", type=arg_type(field_check("samples_per_class"), "count"), default=50,
                   help="samples drawn and classified per class")
    e.add_argument("--out", default=None, help="output folder (default: the run folder); writes eval.json, eval_samples.png")


def run(args) -> int:
    """``fastmask eval``: sample, classify, write eval.json and eval_samples.png; the exit code."""
    import json
    import os
    import sys

    from .checkpoint_io import atomic_write_json, load_checkpoint, resolve
    from .data import DigitsDataset
    from .errors import UsageError
    from .presets import TrainConfig
    from .values import make_out_dir, resolve_device
    from .sampling import check_path_drop_guidance, load_model

    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint: no such file or folder {args.checkpoint!r}")
    path = resolve(args.checkpoint)
    cfg = TrainConfig.from_dict(load_checkpoint(path)["config"])
    dev = resolve_device(args.device)
    net, info = load_model(path, use_ema=args.weights == "ema", device=dev)
    check_path_drop_guidance(args, net)
    if cfg.data != "digits" or info["num_classes"] != 10 or info["shape"][0] != 1:
        raise UsageError(
            f"--checkpoint: eval measures class-conditional digits models; {str(path)!r} was trained on "
            f"data={cfg.data!r} with {info['num_classes']} classes and shape {info['shape']}"
        )
    out = make_out_dir(args.out if args.out is not None else (path.parent.parent if path.parent.name == "checkpoints" else path.parent))
    data = DigitsDataset(cfg.image_size, cfg.channels)
    clf = DigitClassifier(seed=cfg.seed).fit(data.images, data.labels)
    guidance = cfg.guidance if args.guidance is None else args.guidance
    steps = cfg.sample_steps if args.steps is None else args.steps
    rep = sample_report(
        net, num_classes=10, shape=info["shape"], kind="pixels", out_dir=out, samples_per_class=args.samples_per_class,
        grid_per_class=min(10, args.samples_per_class), guidance=guidance, steps=steps, seed=args.seed, device=dev,
        amp=dev.type == "cuda", classifier=clf, tag="eval_samples", path_drop_guidance=args.path_drop_guidance,
    )
    result = {"checkpoint": str(path), "step": info.get("step"), "weights": info.get("weights"),
              "classifier": classifier_report(clf), "samples": rep}
    atomic_write_json(out / "eval.json", result)
    print(json.dumps({k: rep[k] for k in ("accuracy", "frechet_distance", "guidance", "num_samples")}, indent=2))
    print(f"fastmask: wrote {out / 'eval.json'} and {out / 'eval_samples.png'}", file=sys.stderr, flush=True)
    return 0

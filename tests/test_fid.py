"""`fastmask fid`: the Frechet formula against independent computations, and the plumbing
(folders, .npz images, precomputed and ADM-style reference statistics, IS, precision/recall)
with a randomly initialised InceptionV3 in torch-fidelity's layout."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity", reason="fastmask fid needs the optional package torch-fidelity ([fid] extra)")
scipy_linalg = pytest.importorskip("scipy.linalg")

from fastmask.cli import main  # noqa: E402
from fastmask.errors import UsageError  # noqa: E402
from fastmask.fid import ImageSource, compute, frechet_distance, statistics  # noqa: E402
from tiny_models import random_inception_file  # noqa: E402


def _sqrtm_fid(mu1, s1, mu2, s2):
    """The textbook formula with scipy's matrix square root (independent of torch-fidelity)."""
    covmean = scipy_linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |mu1 - mu2|^2
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # commuting covariances (same eigenvectors): the same closed form in the rotated basis
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    # general SPD covariances: scipy's sqrtm
    s1, s2 = _spd(rng, d), _spd(rng, d, 2.0)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_sqrtm_fid(mu1, s1, mu2, s2), rel=1e-7)
    # identical Gaussians: 0; a pure mean shift: |shift|^2
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    assert frechet_distance(mu1, s1, mu1 + 2.0, s1) == pytest.approx(4.0 * d, rel=1e-8)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    with pytest.raises(ValueError, match="statistics"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_statistics_of_samples_from_known_gaussians():
    rng = np.random.default_rng(1)
    d, n = 4, 200_000
    m1, m2 = np.array([0.0, 1, 2, 3]), np.array([1.0, 1, 0, 3])
    sd1, sd2 = np.array([1.0, 2, 0.5, 1]), np.array([2.0, 1, 0.5, 3])
    x = m1 + sd1 * rng.normal(size=(n, d))
    y = m2 + sd2 * rng.normal(size=(n, d))
    want = ((m1 - m2) ** 2).sum() + ((sd1 - sd2) ** 2).sum()  # = 5 + 6 = 11
    got = frechet_distance(*statistics(x), *statistics(torch.from_numpy(y)))
    assert got == pytest.approx(want, abs=0.1)
    with pytest.raises(ValueError, match="features"):
        statistics(np.zeros((1, 3)))


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return random_inception_file(tmp_path_factory.mktemp("inc") / "inception.pth")


class TinyFeatures(torch.nn.Module):
    """A small random feature network with the Inception extractor's interface (uint8 images ->
    (pool features, logits)): the library path's plumbing at a fraction of InceptionV3's cost."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.fc = torch.nn.Linear(12, 10)

    def forward(self, x):
        pool = torch.relu(self.conv(x.float() / 127.5 - 1)).mean((2, 3))
        return pool, self.fc(pool)


@pytest.fixture(scope="module")
def small_net():
    return TinyFeatures().eval()


def _images(seed, n=8, shift=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (n, 1, 1, 3))
    return np.clip(base + rng.integers(0, 56, (n, 16, 16, 3)) + shift, 0, 255).astype(np.uint8)


def _folder(path, arr):
    from PIL import Image

    path.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arr):
        Image.fromarray(a).save(path / f"{i:03d}.png")
    return path


def test_inputs_folders_npz_and_reference_statistics(tmp_path, small_net):
    a, b = _images(0), _images(1, shift=40)
    np.savez(tmp_path / "a.npz", arr_0=a)
    fa = compute(_folder(tmp_path / "a", a), tmp_path / "a.npz", extractor=small_net)["fid"]
    assert abs(fa) < 1e-6  # the same images as a folder and as arr_0
    r = compute(tmp_path / "a.npz", _folder(tmp_path / "b", b), extractor=small_net, isc=True, isc_splits=2,
                prc=True, save_stats=tmp_path / "a_stats.npz")
    assert r["fid"] > 1e-3 and r["num_samples"] == 8 and r["num_reference"] == 8
    assert r["inception_score_mean"] >= 1.0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    # precomputed statistics as the reference give the FID of the images they came from
    np.savez(tmp_path / "b.npz", arr_0=b)
    rb = compute(tmp_path / "b.npz", tmp_path / "a_stats.npz", extractor=small_net)
    assert rb["reference_statistics"].startswith("precomputed") and rb["fid"] == pytest.approx(r["fid"], rel=1e-6)
    # an ADM reference batch holds images and statistics: FID uses the statistics, precision/recall the images
    z = np.load(tmp_path / "a_stats.npz")
    np.savez(tmp_path / "adm_ref.npz", arr_0=b, mu=z["mu"], sigma=z["sigma"])
    radm = compute(tmp_path / "a.npz", tmp_path / "adm_ref.npz", extractor=small_net, prc=True)
    assert abs(radm["fid"]) < 1e-6 and radm["precision"] == r["precision"] and radm["num_reference"] == 8
    assert compute(tmp_path / "a.npz", tmp_path / "b.npz", extractor=small_net, num=5)["num_samples"] == 5
    with pytest.raises(UsageError, match="--prc"):
        compute(tmp_path / "a.npz", tmp_path / "a_stats.npz", extractor=small_net, prc=True)
    with pytest.raises(UsageError, match="--samples"):
        ImageSource(tmp_path / "a_stats.npz")
    with pytest.raises(UsageError, match="--num"):
        ImageSource(tmp_path / "a.npz", limit=9)


def test_cli_with_an_inception_weights_file(tmp_path, inception, capsys):
    a, b = _images(2, n=2), _images(3, n=2, shift=60)  # InceptionV3 at 299x299 on a CPU: few images
    np.savez(tmp_path / "s.npz", arr_0=a)
    _folder(tmp_path / "ref", b)
    out = tmp_path / "fid.json"
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref"), "--inception",
                 str(inception), "--isc", "--isc-splits", "2", "--out", str(out), "--progress", "off"]) == 0
    r = json.loads(out.read_text())
    assert r["fid"] > 0 and r["num_samples"] == 2 and "inception_score_mean" in r
    assert json.loads(capsys.readouterr().out)["fid"] == r["fid"]
    # user errors: one line naming the flag, exit code 2
    for argv, flag in (
        (["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref")], "--inception"),
        (["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "nope"), "--inception", str(inception)], "--ref"),
        (["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref"), "--inception", str(tmp_path / "s.npz")],
         "--inception"),
    ):
        assert main(["fid", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], err


class _Spy(torch.nn.Module):
    """Counts feature passes (a stand-in for the Inception network)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_a_corrupt_reference_is_refused_before_any_inception_pass(tmp_path, small_net, monkeypatch, capsys):
    a = _images(0)
    np.savez(tmp_path / "s.npz", arr_0=a)
    d = 12
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "bad_shape.npz", mu=rng.normal(size=d), sigma=np.eye(d + 1))
    sig = np.eye(d)
    sig[0, 1] = np.nan
    np.savez(tmp_path / "nan.npz", mu=rng.normal(size=d), sigma=sig)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    np.savez(tmp_path / "float_images.npz", arr_0=a.astype(np.float32))
    np.savez(tmp_path / "adm_bad_images.npz", arr_0=a[..., :2], mu=rng.normal(size=d), sigma=np.eye(d))
    folder = _folder(tmp_path / "ref", _images(1))
    (folder / "007.png").write_bytes((folder / "007.png").read_bytes()[:40])  # a truncated image
    cases = [
        ("bad_shape.npz", {}, r"--ref: expected statistics mu \[D\] and sigma \[D, D\]"),
        ("nan.npz", {}, r"--ref: .*NaN"),
        ("garbage.npz", {}, r"--ref: cannot read .*garbage\.npz"),
        ("float_images.npz", {}, r"--ref: expected uint8 images"),
        ("adm_bad_images.npz", {"prc": True}, r"--ref: expected uint8 images"),
        ("ref", {}, r"--ref: cannot read image .*007\.png"),
    ]
    for ref, kw, msg in cases:
        spy = _Spy(small_net)
        with pytest.raises(UsageError, match=msg):
            compute(tmp_path / "s.npz", tmp_path / ref, extractor=spy, **kw)
        assert spy.calls == 0, ref
    # the command line too: one line naming --ref, no Inception network loaded, no feature pass
    import fastmask.fid as fid_mod

    def no_pass(*a, **k):
        raise AssertionError("an Inception pass ran before the reference was checked")

    monkeypatch.setattr(fid_mod, "extract_features", no_pass)
    monkeypatch.setattr(fid_mod, "load_inception", no_pass)
    for ref in ("bad_shape.npz", "ref"):
        assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / ref), "--inception",
                     str(tmp_path / "s.npz"), "--progress", "off"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--ref" in err[0], err

"""`fastmask latents`: image folder -> VAE-moment shards, with a tiny random AutoencoderKL."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="fastmask latents needs the optional package diffusers ([latents] extra)")

from fastmask.cli import main  # noqa: E402
from fastmask.data import LatentShardDataset  # noqa: E402
from fastmask.errors import UsageError  # noqa: E402
from fastmask.latents import center_crop_resize, check_manifest, extract, list_images  # noqa: E402
from fastmask.presets import TrainConfig  # noqa: E402
from fastmask.vae import encode_moments, load_vae, vae_hash  # noqa: E402
from tiny_models import tiny_vae, write_image_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(d)
    return d


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "imgs"
    write_image_folder(root, classes=3, per_class=3, size=(20, 16))
    (root / "class_1" / "broken.png").write_bytes(b"not an image at all")  # skipped and counted
    return root


def _direct_moments(vae, path, size, flip=False):
    from PIL import Image

    with Image.open(path) as im:
        a = center_crop_resize(im, size)
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1
    if flip:
        x = x.flip(-1)
    return encode_moments(vae, x)[0].numpy()


def test_center_crop_resize_takes_the_centre():
    from PIL import Image

    a = np.zeros((16, 48, 3), np.uint8)  # wide image: red | green | blue thirds
    a[:, :16, 0] = 255
    a[:, 16:32, 1] = 255
    a[:, 32:, 2] = 255
    out = center_crop_resize(Image.fromarray(a), 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert (out[:, :, 1] > 200).all() and (out[:, 1:-1, 0] < 40).all() and (out[:, 1:-1, 2] < 40).all()
    # a large image is box-halved first: 64x64 of one colour stays that colour at 16x16
    flat = np.full((64, 64, 3), 77, np.uint8)
    assert (center_crop_resize(Image.fromarray(flat), 16) == 77).all()
    g = Image.fromarray(np.full((20, 20), 9, np.uint8))  # grayscale becomes RGB
    assert center_crop_resize(g, 10).shape == (10, 10, 3)


def test_cli_extracts_shards_the_trainer_reads(tmp_path, images, vae_dir):
    out = tmp_path / "lat"
    args = ["latents", "--images", str(images), "--out", str(out), "--vae", str(vae_dir), "--resolution", "16",
            "--shard-size", "4", "--batch-size", "3", "--workers", "0", "--flip", "--progress", "off"]
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["num_images"] == 10 and m["encoded_images"] == 9 and m["skipped"] == 1
    assert m["skipped_files"][0].endswith("broken.png")
    assert m["count"] == 18 and m["latent_size"] == 8 and m["latent_channels"] == 4 and m["scale_factor"] == 0.18215
    assert m["classes"] == ["class_0", "class_1", "class_2"] and m["flip"] is True
    vae = load_vae(str(vae_dir))
    assert m["vae_hash"] == vae_hash(vae) and m["vae"] == str(vae_dir.resolve())

    ds = LatentShardDataset(str(out), channels=4, image_size=8)
    assert len(ds) == 18 and ds.num_classes == 3 and ds.shape == (4, 8, 8)
    # each stored row is the VAE's moments of the ADM-cropped image (originals, then the flips of a shard)
    files, labels, _ = list_images(images)
    good = [(f, y) for f, y in zip(files, labels) if f.name != "broken.png"]
    first_shard = np.load(out / "shard-00000.npy")
    first_labels = np.load(out / "shard-00000.labels.npy")
    n0 = sum(1 for f in files[:4] if f.name != "broken.png")
    assert first_shard.shape == (2 * n0, 8, 8, 8)
    for j in range(n0):
        np.testing.assert_allclose(first_shard[j], _direct_moments(vae, good[j][0], 16), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(first_shard[n0 + j], _direct_moments(vae, good[j][0], 16, flip=True),
                                   rtol=1e-5, atol=1e-5)
    assert first_labels.tolist() == [y for _, y in good[:n0]] * 2
    z, y = ds.batch(torch.tensor([0, 1]))
    torch.testing.assert_close(z, 0.18215 * torch.from_numpy(first_shard[:2, :4]))

    # the trainer accepts it, and refuses a config that does not fit the manifest
    cfg = TrainConfig(data="latents", data_path=str(out), image_size=8, channels=4)
    assert check_manifest(cfg)["count"] == 18
    with pytest.raises(UsageError, match="image_size"):
        check_manifest(TrainConfig(data="latents", data_path=str(out), image_size=32, channels=4))
    with pytest.raises(UsageError, match="latent_scale"):
        check_manifest(TrainConfig(data="latents", data_path=str(out), image_size=8, channels=4, latent_scale=0.5))
    from fastmask.train import Trainer

    with pytest.raises(UsageError, match="channels"):
        Trainer(TrainConfig(data="latents", data_path=str(out), image_size=8, channels=3, model="T/2", steps=1,
                            out=str(tmp_path / "run"), device="cpu"))


def test_resume_skips_finished_shards_and_ranks_split_the_work(tmp_path, images, vae_dir, monkeypatch):
    import fastmask.latents as L

    vae = tiny_vae()
    kw = dict(vae=vae, resolution=16, shard_size=3, batch_size=2, workers=0, progress=False, log=lambda m: None)
    ref = extract(images, tmp_path / "ref", **kw)
    assert ref["complete"] and ref["num_shards"] == 4

    # a run killed after its first shard: no manifest, the finished shard is kept
    real = L._write_shard
    calls = []

    def dying(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(L, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        extract(images, tmp_path / "r", **kw)
    monkeypatch.setattr(L, "_write_shard", real)
    out = tmp_path / "r"
    assert not (out / "manifest.json").exists() and (out / "shard-00000.json").exists()
    with pytest.raises(UsageError, match="unfinished"):
        check_manifest(TrainConfig(data="latents", data_path=str(out), image_size=8, channels=4))
    t0 = os.stat(out / "shard-00000.npy").st_mtime_ns
    written = []
    monkeypatch.setattr(L, "_write_shard", lambda o, k, *a, **kk: (written.append(k), real(o, k, *a, **kk)))
    res = extract(images, out, **kw)
    assert res["complete"] and written == [1, 2, 3] and os.stat(out / "shard-00000.npy").st_mtime_ns == t0
    for k in range(4):
        a, b = tmp_path / "ref" / f"shard-{k:05d}.npy", out / f"shard-{k:05d}.npy"
        assert a.exists() == b.exists()
        if a.exists():  # same values; the batch split differs, so allow float rounding
            np.testing.assert_allclose(np.load(a), np.load(b), rtol=1e-5, atol=1e-5)
    # other settings in the same folder are refused
    with pytest.raises(UsageError, match="--out"):
        extract(images, out, **{**kw, "resolution": 8})

    # two ranks, each its own contiguous range of shards; the last one writes the manifest
    r0 = extract(images, tmp_path / "dist", rank=0, world=2, **kw)
    assert not r0["complete"] and not (tmp_path / "dist" / "manifest.json").exists()
    r1 = extract(images, tmp_path / "dist", rank=1, world=2, **kw)
    assert r1["complete"] and r1["count"] == ref["count"] and r1["vae_hash"] == ref["vae_hash"]
    for k in range(4):
        a = tmp_path / "ref" / f"shard-{k:05d}.npy"
        if a.exists():
            np.testing.assert_allclose(np.load(a), np.load(tmp_path / "dist" / f"shard-{k:05d}.npy"), rtol=1e-5, atol=1e-5)


def test_flat_folder_with_labels_file(tmp_path, vae_dir):
    from PIL import Image

    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (tmp_path / "labels.txt").write_text("# name label\n0.png 4\n1.png,2\n2.png 4\n")
    files, labels, classes = list_images(root, tmp_path / "labels.txt")
    assert [f.name for f in files] == ["0.png", "1.png", "2.png"] and labels == [4, 2, 4] and len(classes) == 5
    with pytest.raises(UsageError, match="--labels"):
        list_images(root)
    assert list_images(root, unconditional=True)[1] == [-1, -1, -1]
    res = extract(root, tmp_path / "o", vae=tiny_vae(), labels_file=tmp_path / "labels.txt", resolution=8,
                  workers=0, progress=False, log=lambda m: None)
    assert res["count"] == 3 and np.load(tmp_path / "o" / "shard-00000.labels.npy").tolist() == [4, 2, 4]


def test_cli_user_errors_are_one_line(tmp_path, vae_dir, capsys):
    assert main(["latents", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--images" in err[0]
    (tmp_path / "a").mkdir()
    write_image_folder(tmp_path / "a", classes=1, per_class=1)
    assert main(["latents", "--images", str(tmp_path / "a"), "--out", str(tmp_path / "o"),
                 "--vae", str(tmp_path / "missing_vae_dir"), "--workers", "0"]) == 2
    assert "--vae" in capsys.readouterr().err
    assert main(["latents", "--images", str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--vae", str(vae_dir),
                 "--resolution", "12", "--workers", "0"]) == 2
    assert "--resolution" in capsys.readouterr().err


def test_missing_diffusers_names_the_extra(monkeypatch):
    from fastmask import vae as V

    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UsageError, match=r"\[latents\]"):
        V.load_vae("whatever")


def test_plain_import_stays_light():
    code = ("import sys, fastmask, fastmask.cli, fastmask.latents, fastmask.vae, fastmask.fid; fastmask.cli.build_parser(); "
            "bad = [m for m in ('diffusers', 'torch_fidelity', 'torchvision', 'scipy') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_resolution_help_states_the_rule_the_checks_apply(tmp_path, capsys):
    """--resolution takes any multiple of 8 (not only 256 or 512): its help says so, and the
    flag's parse and extract() accept exactly the values the help describes."""
    import argparse

    from fastmask.latents import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helptext = next(a.help for a in parser._actions if "--resolution" in a.option_strings)
    assert "any multiple of 8 from 8 to 4096" in helptext
    from fastmask.latents import check_resolution
    base = ["--images", str(tmp_path), "--out", str(tmp_path / "o")]
    for r in (8, 16, 24, 72, 264, 1000, 4096):
        assert parser.parse_args(base + ["--resolution", str(r)]).resolution == r == check_resolution(r)
    for r in (0, 4, 12, 260, 4100, 4104):
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--resolution", str(r)])
        assert "multiple of 8" in capsys.readouterr().err
        with pytest.raises(UsageError, match=r"--resolution: expected any multiple of 8"):
            extract(tmp_path, tmp_path / "o", vae=None, resolution=r)

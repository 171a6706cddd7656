"""The ImageNet pipeline end to end on CPU data, with tiny random stand-ins for the pretrained
networks: generated images -> `fastmask latents` (tiny AutoencoderKL) -> `fastmask train` (a few
steps) -> `fastmask sample --vae --npz` (decode) -> `fastmask fid` (random InceptionV3 weights file).
Also: a checkpoint in MaskDiT's released file layout sampled and scored the same way, the
published sampler presets, and sampling split over two ranks then merged."""
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("diffusers", reason="needs the optional package diffusers ([latents] extra)")
pytest.importorskip("torch_fidelity", reason="needs the optional package torch-fidelity ([fid] extra)")

sys.path.insert(0, str(Path(__file__).parent))

from fastmask.cli import main  # noqa: E402
from fastmask.errors import UsageError  # noqa: E402
from tiny_models import random_inception_file, tiny_vae, write_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    tiny_vae().save_pretrained(d / "vae")
    random_inception_file(d / "inception.pth")
    return d


def test_whole_chain_images_to_fid(tmp_path, assets, capsys):
    imgs = tmp_path / "images"
    write_image_folder(imgs, classes=2, per_class=4, size=(20, 18))
    lat = tmp_path / "latents"
    assert main(["latents", "--images", str(imgs), "--out", str(lat), "--vae", str(assets / "vae"),
                 "--resolution", "16", "--flip", "--workers", "0", "--progress", "off"]) == 0
    manifest = json.loads((lat / "manifest.json").read_text())
    assert manifest["count"] == 16 and manifest["latent_size"] == 8

    run = tmp_path / "run"
    assert main(["train", "--data", "latents", "--data-path", str(lat), "--image-size", "8", "--channels", "4",
                 "--model", "T/2", "--batch-size", "8", "--steps", "3", "--finetune-steps", "1", "--lr", "1e-3",
                 "--sample-steps", "2", "--samples-per-class", "1", "--no-eval", "--device", "cpu",
                 "--progress", "off", "--out", str(run)]) == 0
    assert (run / "checkpoints" / "latest.json").exists()
    # the trainer refuses a config that does not match the manifest
    assert main(["train", "--data", "latents", "--data-path", str(lat), "--image-size", "16", "--channels", "4",
                 "--model", "T/2", "--steps", "1", "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    assert "image_size" in capsys.readouterr().err

    samples = tmp_path / "samples"
    npz = tmp_path / "samples.npz"
    assert main(["sample", "--checkpoint", str(run), "--vae", str(assets / "vae"), "--per-class", "2",
                 "--steps", "2", "--npz", str(npz), "--out", str(samples), "--device", "cpu"]) == 0
    pngs = sorted(p.name for p in samples.glob("sample_*.png"))
    assert pngs == ["sample_00000_class0.png", "sample_00001_class0.png", "sample_00002_class1.png",
                    "sample_00003_class1.png"]
    with np.load(npz) as z:
        arr, labels = z["arr_0"], z["labels"]
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8 and labels.tolist() == [0, 0, 1, 1]
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(samples / pngs[2])), arr[2])  # PNGs and .npz hold the same images

    capsys.readouterr()
    assert main(["fid", "--samples", str(npz), "--ref", str(imgs), "--inception", str(assets / "inception.pth"),
                 "--progress", "off"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["num_samples"] == 4 and res["num_reference"] == 8


def _released_maskdit(path, num_classes=5):
    """A checkpoint in MaskDiT's released layout: {'net', 'ema', 'args'}, the EDM wrapper's
    'model.' prefix on every key. MaskDiT stores args as an argparse.Namespace; here it is a plain
    dict, which torch.load(weights_only=True) reads today."""
    from fastmask.models import EDMPrecond, maskdit

    torch.manual_seed(0)
    pre = EDMPrecond(maskdit("T/2", input_size=8, in_channels=4, num_classes=num_classes))
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = pre.state_dict()
    torch.save({"net": dict(sd), "ema": dict(sd), "args": {"model_type": "DiT-T/2", "num_classes": num_classes}}, path)
    return pre


def test_released_checkpoint_sample_and_score(tmp_path, assets, capsys):
    ck = tmp_path / "imagenet-maskdit.pt"
    _released_maskdit(ck)
    npz = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(ck), "--vae", str(assets / "vae"), "--num", "3", "--steps", "2",
                 "--npz", str(npz), "--no-png", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    assert not list((tmp_path / "s").glob("*.png"))
    with np.load(npz) as z:
        assert z["arr_0"].shape == (3, 16, 16, 3) and z["labels"].tolist() == [0, 1, 2]  # class-balanced
    # scored like any sample set (`fastmask fid` itself runs in the chain test above; here a small
    # random feature network keeps the test cheap)
    from fastmask.fid import compute
    from test_fid import TinyFeatures

    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    res = compute(npz, ref, extractor=TinyFeatures().eval())
    assert np.isfinite(res["fid"]) and res["num_samples"] == 3
    # a preset made for 32x32 latents refuses this 8x8 model
    assert main(["sample", "--checkpoint", str(ck), "--preset", "maskdit256", "--out", str(tmp_path / "p")]) == 2
    assert "--preset" in capsys.readouterr().err


def test_sample_presets_and_the_fid_default():
    from argparse import Namespace

    from fastmask.generate import FID_SAMPLES, SAMPLE_PRESETS, resolve_settings

    info = {"num_classes": 1000, "shape": (4, 32, 32), "kind": "latents"}
    base = dict(labels=None, per_class=None, num=None, steps=None, guidance=None, npz=None, preset=None)
    st = resolve_settings(Namespace(**{**base, "preset": "maskdit256", "npz": "x.npz"}), info)
    assert st["steps"] == 40 and st["guidance"] == 1.5 and st["num"] == FID_SAMPLES
    assert torch.bincount(st["labels"]).tolist() == [50] * 1000  # class-balanced 50k
    st = resolve_settings(Namespace(**{**base, "preset": "maskdit256-unguided", "guidance": 2.0, "per_class": 2}), info)
    assert st["steps"] == 40 and st["guidance"] == 2.0 and st["num"] == 2000  # explicit flags win
    assert SAMPLE_PRESETS["maskdit512"]["guidance"] == 1.5 and SAMPLE_PRESETS["maskdit512"]["latent_size"] == 64
    st = resolve_settings(Namespace(**base), info)
    assert st["steps"] == 18 and st["guidance"] == 1.5 and st["num"] == 8000
    with pytest.raises(UsageError, match="--preset"):
        resolve_settings(Namespace(**{**base, "preset": "maskdit512"}), info)
    unc = resolve_settings(Namespace(**{**base, "npz": "x.npz"}), {**info, "num_classes": 0})
    assert unc["labels"] is None and unc["num"] == FID_SAMPLES


def test_block_noise_does_not_depend_on_the_split():
    from fastmask.sampling import block_noise

    a = block_noise(torch.arange(0, 10), (2, 3), seed=5, block=4)
    b = torch.cat([block_noise(torch.arange(0, 3), (2, 3), 5, 4), block_noise(torch.arange(3, 10), (2, 3), 5, 4)])
    assert torch.equal(a, b) and not torch.equal(a[0], a[4])
    assert not torch.equal(block_noise(torch.arange(3), (2,), 6, 4), block_noise(torch.arange(3), (2,), 5, 4))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_worker(rank: int, world: int, port: int, ck: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        assert main(["sample", "--checkpoint", ck, "--per-class", "3", "--steps", "2", "--batch-size", "2",
                     "--out", out, "--device", "cpu"]) == 0
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_parts_and_merge(tmp_path):
    ck = tmp_path / "m.pt"
    _released_maskdit(ck, num_classes=3)
    mp.spawn(_sample_worker, args=(2, _free_port(), str(ck), str(tmp_path / "two")), nprocs=2, join=True)
    assert main(["sample", "--checkpoint", str(ck), "--per-class", "3", "--steps", "2", "--batch-size", "5",
                 "--out", str(tmp_path / "one"), "--device", "cpu"]) == 0
    a, b = np.load(tmp_path / "two" / "latents.npy"), np.load(tmp_path / "one" / "latents.npy")
    assert a.shape == (9, 4, 8, 8)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert np.load(tmp_path / "two" / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert not (tmp_path / "two" / ".parts").exists()


def test_npz_merge_streams_parts(tmp_path):
    from fastmask.generate import _merge_npz

    rng = np.random.default_rng(0)
    parts = []
    for r, n in enumerate((3, 0, 4)):
        p = tmp_path / f"p{r}.npy"
        np.save(p, rng.integers(0, 256, (n, 5, 6, 3), dtype=np.uint8))
        parts.append(p)
    _merge_npz(parts, np.arange(7), tmp_path / "all.npz")
    with np.load(tmp_path / "all.npz") as z:
        want = np.concatenate([np.load(p) for p in parts])
        assert np.array_equal(z["arr_0"], want) and z["labels"].tolist() == list(range(7))


def test_released_sit_checkpoint_samples_to_npz(tmp_path, assets):
    """`fastmask sample --checkpoint SiT-XL-2-256x256.pt --vae ... --npz`: a bare state dict of the
    published SiT architecture (random, tiny) samples with the flow Heun sampler and decodes."""
    from test_sit import PublishedSiT

    torch.manual_seed(0)
    ck = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(PublishedSiT(D=64, H=4, num_classes=5).state_dict(), ck)
    npz = tmp_path / "sit.npz"
    with pytest.warns(UserWarning, match="rows"):
        rc = main(["sample", "--checkpoint", str(ck), "--vae", str(assets / "vae"), "--num", "2", "--steps", "3",
                   "--npz", str(npz), "--no-png", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert rc == 0
    with np.load(npz) as z:
        assert z["arr_0"].shape == (2, 16, 16, 3) and z["labels"].tolist() == [0, 1]

"""Data sets: digits, latent shards, image folders; batch order shared by any number of ranks."""
import numpy as np
import pytest
import torch

from fastmask.data import (
    DigitsDataset,
    ImageFolderDataset,
    LatentShardDataset,
    batch_indices,
    build_dataset,
    make_sampler,
)
from fastmask.presets import get_preset


def test_digits_shape_range_labels():
    ds = DigitsDataset(16, 1)
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.shape == (1, 16, 16)
    x, y = ds.batch(torch.arange(5))
    assert x.shape == (5, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and ds.images.min() == -1 and ds.images.max() == 1
    assert y.tolist() == [0, 1, 2, 3, 4]


def test_digits_rejects_rgb():
    with pytest.raises(ValueError, match="channels"):
        DigitsDataset(16, 3)


def test_batch_order_is_the_same_for_any_world_size():
    s = make_sampler(37, seed=3)
    for step in range(12):  # crosses several epochs (batch 8 of 37)
        whole = batch_indices(s, step, 8)
        parts = torch.cat([batch_indices(make_sampler(37, 3), step, 8, rank=r, world=2) for r in range(2)])
        assert torch.equal(whole, parts)
    epoch0 = torch.cat([batch_indices(make_sampler(40, 1), k, 8) for k in range(5)])
    assert sorted(epoch0.tolist()) == list(range(40))  # one epoch covers every sample once


def _moments(n, c=4, h=8, seed=0):
    g = np.random.default_rng(seed)
    return g.standard_normal((n, 2 * c, h, h)).astype(np.float32)


def test_latent_npz_draw_formula(tmp_path):
    m = _moments(6)
    np.savez(tmp_path / "a.npz", moments=m, labels=np.arange(6))
    ds = LatentShardDataset(str(tmp_path / "a.npz"), channels=4, image_size=8)
    assert len(ds) == 6 and ds.shape == (4, 8, 8) and ds.num_classes == 6
    eps = torch.randn(3, 4, 8, 8)
    z, y = ds.batch(torch.tensor([4, 0, 2]), eps=eps)
    mm = torch.from_numpy(m[[4, 0, 2]])
    want = 0.18215 * (mm[:, :4] + torch.exp(mm[:, 4:] / 2) * eps)
    torch.testing.assert_close(z, want)
    assert y.tolist() == [4, 0, 2]


def test_latent_folder_of_npy_shards_with_label_files(tmp_path):
    for i, n in enumerate((3, 5)):
        np.save(tmp_path / f"shard{i}.npy", _moments(n, seed=i))
        np.save(tmp_path / f"shard{i}.labels.npy", np.full(n, i))
    ds = LatentShardDataset(str(tmp_path), channels=4)
    assert len(ds) == 8 and ds.num_classes == 2
    _, y = ds.batch(torch.tensor([0, 2, 3, 7]))
    assert y.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no .npy/.npz"),
        (lambda p: np.save(p / "c.npy", _moments(2, c=3)) or p / "c.npy", r"expected 8 moment channels.*got 6"),
        (lambda p: np.save(p / "d.npy", np.zeros((2, 8, 4), np.float32)) or p / "d.npy", r"expected moments of shape"),
        (lambda p: np.save(p / "e.npy", np.zeros((0, 8, 4, 4), np.float32)) or p / "e.npy", "no samples"),
        (lambda p: np.savez(p / "f.npz", other=_moments(2)) or p / "f.npz", "no moments array"),
        (lambda p: np.savez(p / "g.npz", moments=_moments(2), labels=np.arange(3)) or p / "g.npz", "2 latents but 3"),
    ],
)
def test_latent_errors_name_the_path(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(ValueError, match=match) as e:
        LatentShardDataset(str(path), channels=4)
    assert str(path.name) in str(e.value) or "data_path" in str(e.value)


def test_latent_image_size_mismatch(tmp_path):
    np.save(tmp_path / "a.npy", _moments(2, h=8))
    with pytest.raises(ValueError, match="image_size=8"):
        LatentShardDataset(str(tmp_path / "a.npy"), channels=4, image_size=32)


def _image_folder(root, classes=("cat", "dog"), per=3, size=(20, 12)):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per):
            a = np.full((size[1], size[0], 3), 40 * (c + i), np.uint8)
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    root = _image_folder(tmp_path / "imgs")
    ds = ImageFolderDataset(str(root), image_size=8, channels=3)
    assert len(ds) == 6 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    x, y = ds.batch(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 1]
    assert x.min() >= -1 and x.max() <= 1
    g = ImageFolderDataset(str(root), image_size=8, channels=1)
    assert g.batch(torch.tensor([1]))[0].shape == (1, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"))
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(str(tmp_path / "flat"))
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path / "noimg"))
    with pytest.raises(ValueError, match="channels"):
        ImageFolderDataset(str(tmp_path / "noimg"), channels=4)


def test_build_dataset_needs_a_path():
    cfg = get_preset("folder")
    with pytest.raises(ValueError, match="data_path"):
        cfg.validate()
    cfg = get_preset("digits")
    assert isinstance(build_dataset(cfg), DigitsDataset)

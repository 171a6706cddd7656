"""Small random-weight stand-ins for the large pretrained models of the ImageNet pipeline
(built in the tests: nothing is downloaded). Each builder imports its optional package lazily."""
from __future__ import annotations

import numpy as np
import torch


def tiny_vae(seed: int = 0, blocks: int = 2):
    """A randomly initialised diffusers AutoencoderKL: 4 latent channels, downsampling factor
    2 ** (blocks - 1), a few thousand parameters."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(8 * 2**i for i in range(blocks)),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    return vae.eval()


def random_inception_file(path, seed: int = 0):
    """Save a randomly initialised torch-fidelity InceptionV3 (the FID network's layout) as a
    weights file that ``fastmask fid --inception`` loads like the real one."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    real_load = cls.load_state_dict
    cls.load_state_dict = lambda self, sd, *a, **k: None  # keep the random initialisation
    real_url = fe.load_state_dict_from_url
    fe.load_state_dict_from_url = lambda *a, **k: {}  # and never touch the network
    try:
        torch.manual_seed(seed)
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=None)
    finally:
        cls.load_state_dict = real_load
        fe.load_state_dict_from_url = real_url
    for m in net.modules():  # variance-preserving init, so that random features do not vanish with depth
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features**-0.5)
    torch.save(net.state_dict(), path)
    return path


def write_image_folder(root, classes: int = 3, per_class: int = 3, size=(20, 16), seed: int = 0):
    """root/class_<k>/img_<i>.png with smooth random colour images whose mean colour depends on
    the class; returns the list of written files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for k in range(classes):
        d = root / f"class_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size
            base = np.array([80 + 60 * k, 200 - 50 * k, 40 + 30 * i], dtype=np.float64)
            a = base + rng.normal(0, 25, (h, w, 3))
            im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
            f = d / f"img_{i}.png"
            im.save(f)
            files.append(f)
    return files

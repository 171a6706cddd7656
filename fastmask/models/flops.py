"""The explicit FLOP count of a DiT/MaskDiT forward (matmuls and attention), behind the model
FLOP utilisation (MFU) that ``fastmask profile`` and the benchmarks report."""
from __future__ import annotations

import torch

from ..ops.tokens import num_kept


def _block_flops(blk, L: int) -> dict:
    """Matmul FLOPs of one MaskedDiTBlock on L tokens, per sample (2 FLOPs per multiply-add)."""
    D = blk.hidden_size
    qkv = blk.attn.qkv
    # GELU MLP: fc1 (D -> F) and fc2; SwiGLU: w12 (D -> 2F) and w3, i.e. 3 matmuls of D x F
    hidden = blk.mlp.fc1.out_features if hasattr(blk.mlp, "fc1") else blk.mlp.w3.in_features * 3 / 2
    ada = blk.adaLN_modulation[1]
    return {
        "qkv": 2 * L * D * qkv.out_features,
        "attn": 4 * L * L * D,  # q k^T and p v: 2 L^2 hd each, per head
        "proj": 2 * L * D * D,
        "mlp": 2 * L * D * hidden * 2,
        "adaLN": 2 * ada.in_features * ada.out_features,
    }


def _final_flops(layer, L: int) -> int:
    lin, ada = layer.linear, layer.adaLN_modulation[1]
    return 2 * L * lin.in_features * lin.out_features + 2 * ada.in_features * ada.out_features


def count_flops(model, batch: int = 1, mask_ratio: float = 0.0) -> dict:
    """Matmul + attention FLOPs of one forward of a DiT or MaskDiT (the network inside an
    EDMPrecond is unwrapped), and of one training step (x3: forward + backward).

    Counted: patch embedding, conditioning MLPs (timestep MLP, class Linear), every block
    (qkv, attention q k^T and p v, proj, MLP, adaLN Linear), MaskDiT's decoder_layer, the
    decoder blocks on all N tokens, the final layer. Not counted: norms, softmax, element-wise
    ops (a few % at most). Returns {"parts": {...}, "forward": F, "train_step": 3 F} in FLOPs
    for the whole batch.
    """
    net = getattr(model, "model", model)
    N = net.num_patches
    p = net.patch_size
    masked = hasattr(net, "decoder_blocks")
    K = num_kept(N, mask_ratio) if masked and mask_ratio > 0 else N
    conv = net.x_embedder.proj
    parts: dict[str, float] = {}
    parts["patch_embed"] = 2 * N * conv.in_channels * p * p * conv.out_channels
    t = net.t_embedder.mlp
    cond = 2 * (t[0].in_features * t[0].out_features + t[2].in_features * t[2].out_features)
    emb = getattr(net.y_embedder, "embedding_table", None)
    if isinstance(emb, torch.nn.Linear):
        cond += 2 * emb.in_features * emb.out_features
    parts["conditioning"] = cond

    def add_blocks(prefix, blocks, L):
        for blk in blocks:
            for k, v in _block_flops(blk, L).items():
                parts[f"{prefix}.{k}"] = parts.get(f"{prefix}.{k}", 0) + v

    add_blocks("blocks", net.blocks, K)
    if masked:
        parts["decoder_layer"] = _final_flops(net.decoder_layer, K)
        add_blocks("decoder_blocks", net.decoder_blocks, N)
    parts["final_layer"] = _final_flops(net.final_layer, N)
    parts = {k: v * batch for k, v in parts.items()}
    fwd = sum(parts.values())
    return {"parts": parts, "forward": fwd, "train_step": 3 * fwd, "tokens": {"N": N, "K": K}}


def traced_flops(family: str, config: str, *, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                 mask_ratio: float = 0.0, batch: int = 2) -> dict:
    """FLOPs per image of one training forward of any registered family (``fastmask.models.ARCHITECTURES``),
    counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device: every matmul,
    convolution and attention the forward really runs (the PyTorch reference ops; no memory, no
    data). For DiT and MaskDiT it equals :func:`count_flops`, which ``tests/test_models.py``
    checks. Returns {"forward": F, "train_step": 3 F} per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..ops.checks import trusted_values
    from ..ops.dispatch import backend
    from .configs import ARCHITECTURES
    from .edm import EDMPrecond

    if family not in ARCHITECTURES:
        raise ValueError(f"family: unknown model family {family!r}; expected one of {list(ARCHITECTURES)}")
    meta = torch.device("meta")
    with meta:
        net = ARCHITECTURES[family].build(config, input_size=input_size, in_channels=in_channels,
                                          num_classes=num_classes)
        edm = EDMPrecond(net).to(meta)  # buffers made with numpy start on the CPU
        y = torch.randn(batch, in_channels, input_size, input_size)
        labels = torch.randint(0, max(num_classes, 1), (batch,)) if num_classes > 0 else None
        sigma = torch.ones(batch)
    edm.train()
    ratio = mask_ratio if ARCHITECTURES[family].masks else 0.0
    with FlopCounterMode(display=False) as counter, trusted_values(), backend("torch"), torch.no_grad():
        edm(y, sigma, labels, mask_ratio=ratio)
    fwd = counter.get_total_flops() / batch
    return {"forward": fwd, "train_step": 3 * fwd}

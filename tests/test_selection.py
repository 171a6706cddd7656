"""Token strategies: K per method as the published code rounds it, draws a function of the
generator, the structured mask against a loop written from SPRINT's description."""
from __future__ import annotations

import pytest
import torch

from fastmask import ops
from fastmask.ops.selection import RandomRatioTokens, RandomTokens, RoutedTokens, StructuredTokens


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_tokens_are_maskdit_masks():
    ids = RandomTokens(0.5).draw(3, 16, generator=gen(1))
    want = ops.random_mask(3, 16, 0.5, generator=gen(1))[0]
    assert torch.equal(ids, want)
    assert RandomTokens(0.0).draw(3, 16, generator=gen(1)) is None and RandomTokens(0.0).keeps_all(16)


def test_k_rounding_differs_between_tread_and_the_others():
    # SPEC-ROUTING: N = 64 at 0.3 keeps 45 in TREAD (N - int(N rate)), 44 elsewhere (int(N (1 - r)))
    assert RoutedTokens(0.3).num_kept(64) == 45
    assert RandomTokens(0.3).num_kept(64) == 44
    ids = RoutedTokens(0.3).draw(2, 64, generator=gen(2))
    assert ids.shape == (2, 45)
    assert all(len(set(r.tolist())) == 45 for r in ids)


def _structured_loop(batch, side, g, s, generator):
    """SPRINT's structured mask written out: groups in raster order, per group top-s of uniform
    noise (the same draws: one [B, groups, g*g] tensor)."""
    groups = side // g
    noise = torch.rand(batch, groups * groups, g * g, generator=generator)
    out = []
    for b in range(batch):
        row = []
        for gi in range(groups * groups):
            gy, gx = divmod(gi, groups)
            for p in noise[b, gi].topk(s).indices.tolist():
                py, px = divmod(p, g)
                row.append((gy * g + py) * side + gx * g + px)
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("ratio,side", [(0.75, 16), (0.5, 8), (0.625, 8), (0.875, 16)])
def test_structured_tokens_match_the_description(ratio, side):
    st = StructuredTokens(ratio)
    N = side * side
    ids = st.draw(3, N, generator=gen(3))
    g, s = {0.5: (2, 2), 0.625: (4, 6), 0.75: (2, 1), 0.875: (4, 2)}[ratio]
    assert ids.shape == (3, st.num_kept(N)) == (3, (N // (g * g)) * s)
    assert torch.equal(ids, _structured_loop(3, side, g, s, gen(3)))
    for r in ids:  # s kept in every g x g group, all distinct
        assert len(set(r.tolist())) == r.numel()
        counts = torch.zeros(side // g, side // g, dtype=torch.long)
        for i in r.tolist():
            counts[(i // side) // g, (i % side) // g] += 1
        assert (counts == s).all()
    assert StructuredTokens(0.75).num_kept(256) == 64  # SPRINT: 256 tokens at 0.75 keep 64


def test_structured_tokens_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="ratio"):
        StructuredTokens(0.3)
    with pytest.raises(ValueError, match="num_tokens"):
        StructuredTokens(0.75).draw(1, 60, generator=gen())
    with pytest.raises(ValueError, match="num_tokens"):
        StructuredTokens(0.625).draw(1, 36, generator=gen())  # side 6 is not a multiple of 4


def test_random_ratio_tokens_draw_k_per_batch_from_the_generator():
    st = RandomRatioTokens(0.3, 0.5)
    ks = {st.draw(2, 64, generator=gen(s)).shape[1] for s in range(20)}
    assert ks <= set(range(int(64 * 0.5), int(64 * 0.7) + 1)) and len(ks) > 1
    assert torch.equal(st.draw(2, 64, generator=gen(7)), st.draw(2, 64, generator=gen(7)))
    with pytest.raises(ValueError, match="hi"):
        RandomRatioTokens(0.5, 0.3)
    with pytest.raises(ValueError, match="mask_ratio"):
        RandomTokens(1.0)


def test_models_take_a_strategy_where_they_take_a_ratio():
    from fastmask import EDMPrecond, maskdit

    from helpers import randomise

    torch.manual_seed(0)
    net = EDMPrecond(randomise(maskdit("T/2", input_size=8, in_channels=2, num_classes=3), std=0.02))
    y, labels = torch.randn(2, 2, 8, 8), torch.tensor([0, 1])
    a = net.loss(y, labels, mask_ratio=0.5, generator=gen(5))
    b = net.loss(y, labels, mask_ratio=RandomTokens(0.5), generator=gen(5))
    assert torch.equal(a, b)  # a ratio is MaskDiT's random strategy, draw for draw
    loss = net.loss(y, labels, mask_ratio=StructuredTokens(0.75), generator=gen(5)).mean()
    loss.backward()
    assert torch.isfinite(loss)
    _, mask = net.model.forward_tokens(y, torch.ones(2), labels, mask_ratio=StructuredTokens(0.75), generator=gen(6))
    assert mask.shape == (2, 16) and (mask.sum(1) == 12).all()  # 4 of 16 tokens kept, one per 2x2 group


def test_a_model_family_is_one_registry_line(tmp_path):
    from fastmask import presets
    from fastmask.models import ARCHITECTURES, build_model, maskdit, register_architecture

    assert set(ARCHITECTURES) >= {"maskdit", "dit"}
    register_architecture("maskdit_copy", maskdit, masks=True, help="a test family")
    presets.CHECKS.clear()  # the arch key's choices are read from the registry when first checked
    try:
        cfg = presets.update(presets.get_preset("digits"), {"arch": "maskdit_copy", "model": "T/2"}, "test")
        net = build_model(cfg, (cfg.channels, cfg.image_size, cfg.image_size), 10)
        assert type(net.model).__name__ == "MaskDiT"
        with pytest.raises(ValueError, match="registered twice"):
            register_architecture("dit", maskdit, masks=True, help="")
    finally:
        del ARCHITECTURES["maskdit_copy"]
        presets.CHECKS.clear()

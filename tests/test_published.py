"""Published checkpoints as released, and the published models' behaviour."""
import argparse
import os

import pytest
import torch
from helpers import randomise

from fastmask import ops
from fastmask.errors import UsageError
from fastmask.models import (
    DiT,
    EDMPrecond,
    MaskDiT,
    dit,
    from_published,
    infer_config,
    load_published,
    load_published_file,
    maskdit,
)


def tiny_maskdit(**kw):
    return maskdit("T/2", input_size=8, in_channels=4, num_classes=5, **kw)


def _released(tmp_path, pre, **args):
    """A file in the layout of the released MaskDiT checkpoints: net / ema / args (a Namespace)."""
    f = tmp_path / "maskdit.pt"
    ns = argparse.Namespace(model_type="DiT-T/2", num_classes=5, mae_loss_coef=0.1, class_dropout_prob=0.1, **args)
    torch.save({"net": pre.state_dict(), "ema": pre.state_dict(), "args": ns, "step": 100}, f)
    return f


def test_released_layout_loads_without_trusting_pickles(tmp_path):
    pre = EDMPrecond(randomise(tiny_maskdit())).eval()
    f = _released(tmp_path, pre, num_heads=4, decoder_num_heads=2)
    with pytest.raises(Exception):  # what the README example did: plain weights_only torch.load refuses it
        torch.load(f)
    obj = load_published_file(f)
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].num_heads == 4
    net = EDMPrecond(tiny_maskdit()).eval()
    load_published(net, str(f))  # a path works directly
    x, s, y = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 2.0]), torch.tensor([1, 3])
    torch.testing.assert_close(net(x, s, y), pre(x, s, y))
    rebuilt = from_published(f)  # head counts from the stored arguments
    assert isinstance(rebuilt, MaskDiT) and rebuilt.num_heads == 4 and rebuilt.blocks[0].attn.num_heads == 4


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_malicious_global_is_still_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pre = EDMPrecond(tiny_maskdit())
    f = tmp_path / "evil.pt"
    torch.save({"net": pre.state_dict(), "args": _Evil()}, f)
    with pytest.raises(UsageError, match=r"evil\.pt.*could not be loaded safely.*--trust-pickle"):
        load_published_file(f)
    with pytest.raises(UsageError, match="evil.pt"):
        load_published(EDMPrecond(tiny_maskdit()), str(f))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_maskdit_without_mae_has_no_mask_token_and_is_still_a_maskdit():
    src = randomise(tiny_maskdit()).eval()
    sd = {k: v for k, v in src.state_dict().items() if k != "mask_token"}
    m = from_published({"ema": sd, "args": argparse.Namespace(num_heads=4, decoder_num_heads=2)})
    assert isinstance(m, MaskDiT) and torch.equal(m.mask_token, torch.zeros_like(m.mask_token))
    into = tiny_maskdit()
    load_published(into, sd)
    assert torch.count_nonzero(into.mask_token) == 0
    with torch.no_grad():
        src.mask_token.zero_()
    x, t, y = torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([0, 4])
    torch.testing.assert_close(m.eval()(x, t, y), src(x, t, y))


def _shapes_only(width, heads_in_name=None, depth=1, rows=None):
    sd = {
        "x_embedder.proj.weight": torch.zeros(width, 4, 2, 2),
        "pos_embed": torch.zeros(1, 16, width),
        "blocks.0.attn.qkv.weight": torch.zeros(3 * width, width),
        "final_layer.linear.weight": torch.zeros(16, width),
    }
    if rows is not None:
        sd["y_embedder.embedding_table.weight"] = torch.zeros(rows, width)
    return sd


def test_head_count_comes_from_stored_args_or_is_required():
    assert infer_config(_shapes_only(384))["num_heads"] == 6  # DiT-S width
    assert infer_config(_shapes_only(1152))["num_heads"] == 16
    assert infer_config(_shapes_only(320))["num_heads"] is None  # no width // 64 guess (would say 5)
    got = infer_config({"model": _shapes_only(320), "args": argparse.Namespace(model_type="DiT-XL/2")})
    assert got["num_heads"] == 16
    got = infer_config({"model": _shapes_only(320), "args": {"num_heads": 10}})
    assert got["num_heads"] == 10
    d = randomise(dit("T/2", input_size=8, in_channels=4, num_classes=0, hidden_size=96, num_heads=3))
    with pytest.raises(ValueError, match=r"num_heads: .*width 96.*pass num_heads="):
        from_published(d.state_dict())
    assert from_published(d.state_dict(), num_heads=3).blocks[0].attn.num_heads == 3
    assert infer_config(dit("T/2", input_size=8, in_channels=4).state_dict())["num_heads"] == 4  # fastmask's T


def test_dit_without_null_row_uses_stored_args_or_reports_the_ambiguity():
    src = randomise(dit("T/2", input_size=8, in_channels=4, num_classes=5, class_dropout_prob=0.0)).eval()
    sd = dict(src.state_dict())
    sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][:5]  # no null row
    released = {"model": sd, "args": argparse.Namespace(num_classes=5, class_dropout_prob=0.0, num_heads=4)}
    m = from_published(released)
    assert m.num_classes == 5 and m.class_dropout_prob == 0.0
    x, t, y = torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([0, 4])
    torch.testing.assert_close(m.eval()(x, t, y), src(x, t, y))
    with pytest.warns(UserWarning, match="5 rows are read as 4 classes plus the null label.*num_classes=5"):
        assert infer_config(sd)["num_classes"] == 4
    assert from_published(sd, num_heads=4, num_classes=5).num_classes == 5
    assert infer_config(_shapes_only(64, rows=1001))["num_classes"] == 1000  # ImageNet: no warning needed


def test_published_behaviour_labels_masking_kept_tokens():
    m = randomise(tiny_maskdit())
    x, t, y = torch.randn(3, 4, 8, 8), torch.zeros(3), torch.tensor([0, 1, 2])
    null = torch.full((3,), -1)
    # eval mode: a mask ratio alone does not mask; explicit ids still do
    m.eval()
    tokens, mask = m.forward_tokens(x, t, y, mask_ratio=0.5)
    assert mask is None
    torch.testing.assert_close(tokens, m.forward_tokens(x, t, y)[0])
    ids = ops.random_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(0))[0]
    assert m.forward_tokens(x, t, y, ids_keep=ids)[1] is not None
    # class_labels=None: unconditional
    torch.testing.assert_close(m(x, t, None), m(x, t, null))
    # train mode: labels are dropped with class_dropout_prob (here always), or where forced
    m.train()
    m.class_dropout_prob = 1.0
    torch.testing.assert_close(m(x, t, y, ids_keep=ids), m(x, t, null, ids_keep=ids))
    m.class_dropout_prob = 0.0
    forced = m(x, t, y, ids_keep=ids, force_drop_ids=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(forced, m(x, t, torch.tensor([-1, 1, -1]), ids_keep=ids))
    m.eval()
    m.class_dropout_prob = 1.0
    torch.testing.assert_close(m(x, t, y), m(x, t, y))  # eval: no random drop
    assert not torch.allclose(m(x, t, y), m(x, t, null))
    # kept tokens: int(N * (1 - ratio)) as in the published code
    assert ops.num_kept(100, 0.9) == int(100 * (1 - 0.9)) == 9
    assert ops.num_kept(256, 0.5) == 128 and ops.num_kept(256, 0.75) == 64
    assert ops.random_mask(2, 100, 0.9)[0].shape == (2, 9)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        tiny_maskdit(class_dropout_prob=1.5)


def test_edm_label_dropout_in_train_mode_reaches_a_users_own_loop():
    torch.manual_seed(0)
    net = EDMPrecond(randomise(tiny_maskdit(class_dropout_prob=1.0)))
    y, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = net.loss(y, labels, mask_ratio=0.5, generator=g())
    b = net.loss(y, torch.full((2,), -1), mask_ratio=0.5, generator=g())
    torch.testing.assert_close(a, b)

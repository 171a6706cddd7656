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
    # train mode: MaskDiT's model drops no label by itself (its published training loop does),
    # only where forced; a DiT drops with class_dropout_prob (here always), as DiT's model does
    m.train()
    m.class_dropout_prob = 1.0
    torch.testing.assert_close(m(x, t, y, ids_keep=ids), m.eval()(x, t, y, ids_keep=ids))
    m.train()
    d = randomise(dit("T/2", input_size=8, in_channels=4, num_classes=5, class_dropout_prob=1.0)).train()
    torch.testing.assert_close(d(x, t, y), d(x, t, null))
    d.class_dropout_prob = 0.0
    assert not torch.allclose(d(x, t, y), d(x, t, null))
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
    # a DiT drops inside the model in train mode (as DiT's model); a MaskDiT leaves it to the loop
    torch.manual_seed(0)
    net = EDMPrecond(randomise(dit("T/2", input_size=8, in_channels=4, num_classes=5, class_dropout_prob=1.0)))
    y, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = net.loss(y, labels, mask_ratio=0.0, generator=g())
    b = net.loss(y, torch.full((2,), -1), mask_ratio=0.0, generator=g())
    torch.testing.assert_close(a, b)
    net = EDMPrecond(randomise(tiny_maskdit(class_dropout_prob=1.0)))
    a = net.loss(y, labels, mask_ratio=0.5, generator=g())
    b = net.loss(y, torch.full((2,), -1), mask_ratio=0.5, generator=g())
    assert not torch.allclose(a, b)
    c = net.loss(y, labels, mask_ratio=0.5, generator=g(), force_drop_ids=torch.tensor([1, 1]))
    torch.testing.assert_close(c, b)


class _PublishedStyleMaskDiT(torch.nn.Module):
    """MaskDiT as its published code computes it, written out here in plain torch on the same
    parameter names: labels are one-hot rows through a bias-free Linear and never dropped by
    the model (the published training loop zeroes the rows it drops)."""

    def __init__(self, sd, heads, dec_heads, patch, channels):
        super().__init__()
        self.w = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in sd.items()}
        self.heads, self.dec_heads, self.p, self.C = heads, dec_heads, patch, channels

    def _lin(self, name, x):
        return torch.nn.functional.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _block(self, pre, x, c, heads):
        F = torch.nn.functional
        D = x.shape[-1]
        mod = self._lin(pre + "adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)  # noqa: E731
        h = ln(x) * (1 + mod[1].unsqueeze(1)) + mod[0].unsqueeze(1)
        B, L, _ = h.shape
        q, k, v = self._lin(pre + "attn.qkv", h).reshape(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5).softmax(-1) @ v
        x = x + mod[2].unsqueeze(1) * self._lin(pre + "attn.proj", att.transpose(1, 2).reshape(B, L, D))
        h = ln(x) * (1 + mod[4].unsqueeze(1)) + mod[3].unsqueeze(1)
        m = self._lin(pre + "mlp.fc2", F.gelu(self._lin(pre + "mlp.fc1", h), approximate="tanh"))
        return x + mod[5].unsqueeze(1) * m

    def _final(self, pre, x, c):
        F = torch.nn.functional
        shift, scale = self._lin(pre + "adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
        h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return self._lin(pre + "linear", h)

    def forward_tokens(self, x, t, y_onehot, ids_keep):
        F, w = torch.nn.functional, self.w
        h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=self.p)
        h = h.flatten(2).transpose(1, 2) + w["pos_embed"]
        half = 128
        freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half) / half)
        args = t.float()[:, None] * freqs[None]
        temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        c = self._lin("t_embedder.mlp.2", F.silu(self._lin("t_embedder.mlp.0", temb)))
        c = c + y_onehot @ w["y_embedder.embedding_table.weight"].t()  # no dropout in the model
        B, N, D = h.shape
        h = torch.gather(h, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        for i in range(sum(k.endswith("attn.qkv.weight") and k.startswith("blocks.") for k in w)):
            h = self._block(f"blocks.{i}.", h, c, self.heads)
        h = self._final("decoder_layer.", h, c)
        Dd = h.shape[-1]
        full = w["mask_token"].expand(B, N, Dd).clone()
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd), h) + w["decoder_pos_embed"]
        for i in range(sum(k.endswith("attn.qkv.weight") and k.startswith("decoder_blocks.") for k in w)):
            full = self._block(f"decoder_blocks.{i}.", full, c, self.dec_heads)
        return self._final("final_layer.", full, c)


@pytest.mark.parametrize("route", ["maskdit", "from_published"])
def test_train_mode_forward_and_loss_equal_the_published_maskdit(tmp_path, route):
    """MaskDiT's published model never drops labels (its loop does): in train mode fastmask's
    MaskDiT, built directly or from a released file, gives the published model's forward and loss
    on the same inputs; the published loop's own label dropout is the only one."""
    from fastmask.models.dit import patchify

    src = randomise(tiny_maskdit(class_dropout_prob=0.5))
    if route == "from_published":
        net = EDMPrecond(from_published(_released(tmp_path, EDMPrecond(src), num_heads=4, decoder_num_heads=2)))
    else:
        net = EDMPrecond(src)
    net.model.class_dropout_prob = 0.5
    pub = _PublishedStyleMaskDiT(src.state_dict(), 4, 2, 2, 4)
    net.train()
    B = 8
    torch.manual_seed(1)
    y, labels = torch.randn(B, 4, 8, 8), torch.randint(0, 5, (B,))
    onehot = torch.nn.functional.one_hot(labels, 5).float()
    # the published loop: y = y * (rand >= p) on the one-hot labels, then the model
    onehot = onehot * (torch.rand(B, 1, generator=torch.Generator().manual_seed(5)) >= 0.5)
    assert 0 < int((onehot.sum(1) == 0).sum()) < B
    sigma, noise = torch.rand(B) * 2 + 0.1, torch.randn(B, 4, 8, 8)
    ids = ops.random_mask(B, 16, 0.5, generator=torch.Generator().manual_seed(2))[0]
    x_noisy = y + noise * sigma.view(-1, 1, 1, 1)
    c_in, c_noise = 1 / torch.sqrt(sigma**2 + 0.25), torch.log(sigma) / 4
    F_pub = pub.forward_tokens(x_noisy * c_in.view(-1, 1, 1, 1), c_noise, onehot, ids)
    for _ in range(3):  # the global RNG draws nothing in fastmask's model: every call agrees
        F_ours, mask = net.model.forward_tokens(x_noisy * c_in.view(-1, 1, 1, 1), c_noise, onehot, ids_keep=ids)
        torch.testing.assert_close(F_ours, F_pub, atol=1e-5, rtol=1e-5)
    loss_pub = ops.reference.dsm_mae_loss(F_pub, patchify(x_noisy, 2), patchify(y, 2), sigma, mask, mae_coef=0.1)
    loss, _, _ = net.loss_given(y, onehot, sigma, noise, ids, mae_coef=0.1)
    torch.testing.assert_close(loss, loss_pub, atol=1e-5, rtol=1e-5)
    # the same through the trainer's path: its own draws passed as force_drop_ids
    drop = onehot.sum(1) == 0
    forced, _, _ = net.loss_given(y, labels, sigma, noise, ids, mae_coef=0.1, force_drop_ids=drop)
    torch.testing.assert_close(forced, loss_pub, atol=1e-5, rtol=1e-5)

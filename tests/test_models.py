"""MaskDiT / DiT models: structure from the papers, zero init, masking, checkpoints."""
import pytest
import torch
from helpers import randomise

import fastmask
from fastmask import ops
from fastmask.models import DiT, EDMPrecond, MaskDiT, dit, from_published, infer_config, load_published, maskdit
from fastmask.models import patchify, unpatchify


@pytest.fixture(autouse=True)
def torch_backend():
    with fastmask.backend("torch"):
        yield


def tiny(**kw):
    return maskdit("T/2", input_size=8, in_channels=3, num_classes=5, **kw)


def test_patchify_order_and_inverse():
    p, C = 2, 3
    x = torch.arange(1 * C * 4 * 4, dtype=torch.float32).reshape(1, C, 4, 4)
    t = patchify(x, p)
    assert t.shape == (1, 4, p * p * C)
    # token 1 = (row 0, col 1); its values ordered (p_row, p_col, channel)
    expect = torch.stack([x[0, c, 0 + pr, 2 + pc] for pr in range(p) for pc in range(p) for c in range(C)])
    assert torch.equal(t[0, 1], expect)
    assert torch.equal(unpatchify(t, p, C), x)


def test_configs_and_parameter_counts():
    with torch.device("meta"):  # counts only: no memory, no init time
        m = maskdit("XL/2")
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(730e6, rel=0.01)
    assert m.blocks[0].attn.head_dim == 72 and m.decoder_blocks[0].attn.head_dim == 32
    assert len(m.blocks) == 28 and len(m.decoder_blocks) == 8 and m.decoder_hidden_size == 512
    with torch.device("meta"):
        d = dit("XL/2", learn_sigma=True)
    assert sum(p.numel() for p in d.parameters()) == pytest.approx(675e6, rel=0.01)
    for name, (depth, D) in {"S/4": (12, 384), "B/8": (12, 768), "L/2": (24, 1024)}.items():
        m = dit(name, input_size=16)
        assert len(m.blocks) == depth and m.hidden_size == D
    with pytest.raises(ValueError, match="config"):
        maskdit("Q/2")


def test_fresh_model_is_zero_initialised_as_spec():
    m = tiny()
    for blk in list(m.blocks) + list(m.decoder_blocks):
        assert blk.adaLN_modulation[1].weight.abs().sum() == 0 and blk.adaLN_modulation[1].bias.abs().sum() == 0
    for lin in (m.final_layer.linear, m.final_layer.adaLN_modulation[1]):
        assert lin.weight.abs().sum() == 0 and lin.bias.abs().sum() == 0
    assert 0.005 < m.mask_token.std().item() < 0.05
    assert not any(n in dict(m.named_parameters()) for n in ("pos_embed", "decoder_pos_embed"))  # fixed buffers
    x = torch.randn(2, 3, 8, 8)
    net = EDMPrecond(m)
    sigma = torch.tensor([0.5, 3.0])
    # F = 0 at init, so D = c_skip * x
    torch.testing.assert_close(net(x, sigma, torch.tensor([1, 2])), (0.25 / (sigma**2 + 0.25)).view(-1, 1, 1, 1) * x)


def test_masked_encoder_equals_unmasked_encoder_on_gathered_tokens():
    m = randomise(tiny())
    x = torch.randn(3, 3, 8, 8)
    c = m.condition(torch.randn(3), torch.tensor([0, 1, -1]))
    ids = ops.random_mask(3, m.num_patches, 0.5, generator=torch.Generator().manual_seed(3))[0]
    masked = m.encode(x, c, ids)
    h = m.x_embedder(x) + m.pos_embed
    h = torch.stack([h[b, ids[b]] for b in range(3)])
    for blk in m.blocks:
        h = blk(h, c)
    torch.testing.assert_close(masked, h)


def test_decoder_places_mask_token_and_forward_shapes():
    m = randomise(tiny())
    x = torch.randn(2, 3, 8, 8)
    tokens, mask = m.forward_tokens(x, torch.zeros(2), torch.tensor([0, 4]), mask_ratio=0.5)
    assert tokens.shape == (2, 16, 12) and mask.shape == (2, 16) and mask.sum().item() == 16
    out = m(x, torch.zeros(2), torch.tensor([0, 4]))
    assert out.shape == x.shape
    ids = ops.random_mask(2, 16, 0.25)[0]
    t2, mask2 = m.forward_tokens(x, torch.zeros(2), torch.tensor([0, 4]), ids_keep=ids)
    assert torch.equal(mask2, ops.mask_from_ids(ids, 16))


def test_label_embedder_forms_and_null_label():
    m = randomise(tiny())
    e = m.y_embedder
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 0]), 5).float()
    torch.testing.assert_close(e(torch.tensor([2, 0])), e(onehot))
    assert e(torch.tensor([-1])).abs().sum() == 0  # dropped label = zero vector = zero embedding
    t = randomise(dit("T/2", input_size=8, in_channels=3, num_classes=5, label_form="table"))
    assert t.y_embedder.embedding_table.weight.shape == (6, 64)
    torch.testing.assert_close(t.y_embedder(torch.tensor([-1])), t.y_embedder.embedding_table.weight[5:6])
    with pytest.raises(ValueError, match="class_labels"):
        e(torch.tensor([7]))


def test_maskdit_state_dict_round_trip_with_published_keys():
    net = EDMPrecond(randomise(tiny()))
    sd = net.state_dict()
    for k in [
        "model.x_embedder.proj.weight", "model.t_embedder.mlp.0.weight", "model.t_embedder.mlp.2.weight",
        "model.y_embedder.embedding_table.weight", "model.pos_embed", "model.blocks.1.attn.qkv.weight",
        "model.blocks.0.adaLN_modulation.1.weight", "model.decoder_layer.linear.weight",
        "model.decoder_layer.adaLN_modulation.1.weight", "model.mask_token", "model.decoder_pos_embed",
        "model.decoder_blocks.0.mlp.fc2.bias", "model.final_layer.linear.weight",
        "model.final_layer.adaLN_modulation.1.bias",
    ]:  # fmt: skip
        assert k in sd, k
    assert sd["model.mask_token"].shape == (1, 1, 32) and sd["model.pos_embed"].shape == (1, 16, 64)
    assert sd["model.y_embedder.embedding_table.weight"].shape == (64, 5)  # Linear, no bias
    fresh = EDMPrecond(tiny())
    load_published(fresh, {"ema": sd})
    net.eval(), fresh.eval()  # train mode drops labels at random (class_dropout_prob)
    x, s, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([1, 3])
    torch.testing.assert_close(fresh(x, s, y), net(x, s, y))
    rebuilt = from_published(sd, num_heads=4, decoder_num_heads=2)
    assert isinstance(rebuilt, MaskDiT) and rebuilt.decoder_hidden_size == 32
    torch.testing.assert_close(EDMPrecond(rebuilt).eval()(x, s, y), net(x, s, y))


def test_dit_checkpoint_forms_and_errors():
    d = randomise(dit("T/2", input_size=8, in_channels=3, num_classes=5, learn_sigma=True, label_form="table"))
    sd = {"module." + k: v for k, v in d.state_dict().items()}
    with pytest.warns(UserWarning, match="null label"):  # 6 rows: 5 classes + null, or 6 without
        kw = infer_config(sd)
    assert kw["cls"] is DiT and kw["learn_sigma"] and kw["label_form"] == "table" and kw["num_classes"] == 5
    again = from_published(sd, num_heads=4, num_classes=5).eval()
    d.eval()  # train mode drops labels at random (class_dropout_prob)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(again(x, torch.zeros(2), torch.tensor([0, 1])), d(x, torch.zeros(2), torch.tensor([0, 1])))
    # learned sigma into a C-channel model: refused unless asked, then the mean channels are kept
    plain = dit("T/2", input_size=8, in_channels=3, num_classes=5, label_form="table").eval()
    with pytest.raises(ValueError, match="learned-sigma"):
        load_published(plain, sd)
    load_published(plain, sd, drop_learned_sigma=True)
    full = d(x, torch.zeros(2), torch.tensor([0, 1]))
    torch.testing.assert_close(plain(x, torch.zeros(2), torch.tensor([0, 1])), full[:, :3])
    # DiT's table label embedder into a MaskDiT's linear one: a clear error
    with pytest.raises(ValueError, match="label_form"):
        load_published(tiny(), {k: v for k, v in sd.items()})
    with pytest.raises(ValueError, match="missing keys|unexpected keys|shape"):
        load_published(dit("T/2", input_size=16, in_channels=3, num_classes=5, label_form="table", learn_sigma=True), sd)


def test_model_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="^x:"):
        m(torch.randn(2, 3, 6, 6), torch.zeros(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="noise_labels"):
        m(torch.randn(2, 3, 8, 8), torch.zeros(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="mask_ratio"):
        m.forward_tokens(torch.randn(2, 3, 8, 8), torch.zeros(2), torch.tensor([0, 1]), mask_ratio=1.0)
    # class_labels=None is unconditional (the null label), as in the published models
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(m(x, torch.zeros(2), None), m(x, torch.zeros(2), torch.tensor([-1, -1])))


def test_train_one_step_maskdit_s2_at_ratio_half():
    torch.manual_seed(0)
    net = EDMPrecond(maskdit("S/2", input_size=16, in_channels=4, num_classes=10))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0)
    y, labels = torch.randn(4, 4, 16, 16), torch.randint(0, 10, (4,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for step in range(2):  # adaLN-Zero: the first step moves only the zero-initialised outputs
        loss = net.loss(y, labels, mask_ratio=0.5).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert net.model.mask_token.grad.abs().sum() > 0
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.mask_token" in changed and "model.final_layer.linear.weight" in changed
    assert "model.blocks.0.adaLN_modulation.1.weight" in changed
    assert "model.pos_embed" not in changed


def test_dit_baseline_loss_and_refuses_masking():
    net = EDMPrecond(dit("T/2", input_size=8, in_channels=3, num_classes=5, learn_sigma=True))
    y, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    loss = net.loss(y, labels, mask_ratio=0.0)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="mask_ratio"):
        net.loss(y, labels, mask_ratio=0.5)


def test_loss_given_matches_loss_with_same_draws():
    net = EDMPrecond(randomise(tiny()))
    y, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    torch.manual_seed(1)  # the label dropout of train mode draws from the global RNG
    got = net.loss(y, labels, mask_ratio=0.5, generator=torch.Generator().manual_seed(5), return_terms=True)
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(5)
    sigma = (torch.randn(2, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(y.shape, generator=g)
    ids = ops.random_mask(2, 16, 0.5, generator=g)[0]
    want = net.loss_given(y, labels, sigma, noise, ids)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_build_model_from_a_config_checks_the_data_shape():
    from types import SimpleNamespace

    from fastmask.models import build_model

    cfg = SimpleNamespace(arch="maskdit", model="T/2", image_size=8, channels=1)
    net = build_model(cfg, (1, 8, 8), 10)
    assert isinstance(net, EDMPrecond) and isinstance(net.model, MaskDiT) and net.model.num_classes == 10
    assert isinstance(build_model(SimpleNamespace(**{**vars(cfg), "arch": "dit"}), (1, 8, 8), 0).model, DiT)
    with pytest.raises(ValueError, match="image_size"):
        build_model(cfg, (1, 16, 16), 10)
    with pytest.raises(ValueError, match="channels"):
        build_model(cfg, (3, 8, 8), 10)
    with pytest.raises(ValueError, match="square"):
        build_model(cfg, (1, 8, 16), 10)


def test_reference_loss_uses_the_edm_coefficients():
    """The loss op writes c_skip, c_out and lambda out (as its kernels do); they must agree with
    the preconditioner's :func:`fastmask.models.edm_coefficients`."""
    from fastmask.models import edm_coefficients
    from fastmask.ops import reference

    g = torch.Generator().manual_seed(0)
    F, xn, y = (torch.randn(3, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.01, 0.7, 40.0], dtype=torch.float64)
    c_skip, c_out, _, _, lam = edm_coefficients(sigma)
    D = c_skip.view(-1, 1, 1) * xn + c_out.view(-1, 1, 1) * F
    want = (lam.view(-1, 1, 1) * (D - y) ** 2).mean((1, 2))
    dsm, _ = reference.dsm_mae_loss_terms(F, xn, y, sigma)
    torch.testing.assert_close(dsm, want)


def test_one_sigma_draw_for_training_and_the_loss():
    from fastmask.models import draw_sigma
    from fastmask.models.edm import P_MEAN, P_STD
    from fastmask.train import step_randomness

    g = torch.Generator().manual_seed(5)
    s = draw_sigma(100_000, generator=g)
    assert abs(s.log().mean().item() - P_MEAN) < 0.02 and abs(s.log().std().item() - P_STD) < 0.02
    # step_randomness draws the label-drop flags, then sigma, from its (seed, step) generator
    r = step_randomness(0, 3, 16, (1, 2, 2), 4, 0.0, 0.1, False, "cpu")
    g = torch.Generator().manual_seed(3)
    torch.rand(16, generator=g)
    assert torch.equal(r["sigma"], draw_sigma(16, generator=g))


@pytest.mark.parametrize("family,config,ratio", [("dit", "T/2", 0.0), ("maskdit", "T/2", 0.5), ("maskdit", "S/2", 0.75)])
def test_traced_flops_equal_the_explicit_count(family, config, ratio):
    """The meta-device trace that counts any family's FLOPs agrees with DiT/MaskDiT's formula."""
    from fastmask.models import ARCHITECTURES, count_flops, traced_flops

    traced = traced_flops(family, config, input_size=16, in_channels=4, num_classes=10, mask_ratio=ratio)
    net = ARCHITECTURES[family].build(config, input_size=16, in_channels=4, num_classes=10)
    explicit = count_flops(net, 1, ratio if family == "maskdit" else 0.0)
    assert traced["forward"] == pytest.approx(explicit["forward"], rel=1e-9) and traced["forward"] > 0
    assert traced["train_step"] == 3 * traced["forward"]
    with pytest.raises(ValueError, match="unknown model family"):
        traced_flops("nope", config)

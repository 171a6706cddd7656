"""fastmask's fused block path inside diffusers' DiTTransformer2DModel and PixArtTransformer2DModel:
outputs equal the unpatched model (fp32, max abs difference < 1e-5), weights and state dict kept,
the masked-token path through the blocks, gradients reaching diffusers' own parameters."""
import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers", reason="needs the optional package diffusers ([latents] extra)")

import fastmask  # noqa: E402
from fastmask import ops  # noqa: E402
from fastmask.nn import diffusers as fd  # noqa: E402
from fastmask.nn.diffusers import (  # noqa: E402
    dit_forward_tokens,
    fuse_transformer,
    pixart_forward_tokens,
    tokens_of,
    unfuse_transformer,
)

TOL = 1e-5


def _perturb(model, seed=0):
    """Random weights everywhere (diffusers leaves some layers at zero or identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_dit(**kw):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
               sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return _perturb(DiTTransformer2DModel(**{**cfg, **kw}).eval())


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return _perturb(m.eval())


def _inputs(B=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 4, 8, 8, generator=g), torch.tensor([1, 500, 999])[:B], torch.tensor([0, 3, 9])[:B]


def _max(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture
def count_ops(monkeypatch):
    """Counts the calls of the fused ops made by the diffusers blocks."""
    calls = {"attention": 0, "residual_layernorm_modulate": 0, "gated_residual": 0}
    for name in calls:
        real = getattr(ops, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(fd.ops, name, wrapped)
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dit_outputs_equal_the_unpatched_model(backend, count_ops):
    ref = tiny_dit()
    model = fuse_transformer(copy.deepcopy(ref))
    assert type(model.transformer_blocks[0]).__name__ == "FusedBasicTransformerBlock"
    x, t, y = _inputs()
    want = ref(x, timestep=t, class_labels=y).sample
    with fastmask.backend(backend):
        got = model(x, timestep=t, class_labels=y).sample
    assert _max(got, want) < TOL and want.abs().max() > 0.1
    assert count_ops["attention"] == 2 and count_ops["residual_layernorm_modulate"] == 2  # 2 blocks, fused path
    # the same parameters under the same names
    sd, rsd = model.state_dict(), ref.state_dict()
    assert list(sd) == list(rsd) and all(torch.equal(sd[k], rsd[k]) for k in sd)
    unfuse_transformer(model)
    assert type(model.transformer_blocks[0]).__name__ == "BasicTransformerBlock"


def test_dit_fused_qkv_layout_is_used():
    ref = tiny_dit()
    model = fuse_transformer(copy.deepcopy(ref))
    for blk in model.transformer_blocks:
        blk.attn1.fuse_projections()  # diffusers' fused to_qkv
        with torch.no_grad():  # from now on only to_qkv holds the right weights
            blk.attn1.to_q.weight.zero_()
    x, t, y = _inputs()
    assert _max(model(x, timestep=t, class_labels=y).sample, ref(x, timestep=t, class_labels=y).sample) < TOL


def test_dit_masked_tokens_forward_and_backward():
    ref = tiny_dit()
    model = fuse_transformer(copy.deepcopy(ref))
    x, t, y = _inputs()
    B, N = x.shape[0], 16
    # no mask: the tokens unpatchify to the model's output
    full = dit_forward_tokens(model, x, t, y)
    out = ref(x, timestep=t, class_labels=y).sample
    assert _max(full, tokens_of(out, 2)) < TOL
    # masked: the unpatched blocks on the gathered tokens, computed by hand
    ids_keep, _, _ = ops.random_mask(B, N, 0.5, generator=torch.Generator().manual_seed(3))
    got = dit_forward_tokens(model, x, t, y, ids_keep=ids_keep)

    def reference(m):
        h = m.pos_embed(x)
        h = torch.gather(h, 1, ids_keep[..., None].expand(-1, -1, h.shape[-1]))
        for blk in m.transformer_blocks:
            h = blk(h, timestep=t, class_labels=y)
        c = m.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
        shift, scale = m.proj_out_1(F.silu(c)).chunk(2, dim=1)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return m.proj_out_2(h)

    want = reference(ref)
    assert got.shape == (B, 8, 2 * 2 * 8) and _max(got, want) < TOL
    # gradients reach diffusers' own q/k/v parameters and equal the unpatched model's
    target = torch.randn_like(want)
    ((got - target) ** 2).mean().backward()
    ((want - target) ** 2).mean().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            continue
        assert p.grad is not None, name
        assert _max(p.grad, q.grad) < 1e-5 * max(1.0, q.grad.abs().max().item()), name
    assert model.transformer_blocks[0].attn1.to_k.weight.grad.abs().sum() > 0
    # a single block takes ids_keep too
    blk, rblk = model.transformer_blocks[1], ref.transformer_blocks[1]
    h = torch.randn(B, N, 16)
    with torch.no_grad():
        a = blk(h, timestep=t, class_labels=y, ids_keep=ids_keep)
        b = rblk(torch.gather(h, 1, ids_keep[..., None].expand(-1, -1, 16)), timestep=t, class_labels=y)
    assert _max(a, b) < TOL


def test_pixart_blocks_equal_the_unpatched_model(count_ops):
    ref = tiny_pixart()
    model = fuse_transformer(copy.deepcopy(ref))
    x, t, _ = _inputs()
    enc = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0  # padded caption tokens
    kw = dict(encoder_hidden_states=enc, timestep=t, encoder_attention_mask=mask)
    want = ref(x, **kw).sample
    got = model(x, **kw).sample
    assert _max(got, want) < TOL and count_ops["attention"] == 2 and count_ops["residual_layernorm_modulate"] == 2
    # masked tokens through a block (cross-attention is per image token, so a gather commutes with it)
    blk, rblk = model.transformer_blocks[0], ref.transformer_blocks[0]
    h = torch.randn(3, 16, 16)
    temb = torch.randn(3, 6 * 16)
    ids = ops.random_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(0))[0]
    ehs = model.caption_projection(enc)
    with torch.no_grad():
        a = blk(h, encoder_hidden_states=ehs, timestep=temb, ids_keep=ids)
        b = rblk(torch.gather(h, 1, ids[..., None].expand(-1, -1, 16)), encoder_hidden_states=ehs, timestep=temb)
    assert _max(a, b) < TOL
    # the whole model on all tokens, then on the kept ones (against the unpatched blocks by hand)
    with torch.no_grad():
        assert _max(pixart_forward_tokens(model, x, enc, t, encoder_attention_mask=mask), tokens_of(want, 2)) < TOL
        got = pixart_forward_tokens(model, x, enc, t, ids, encoder_attention_mask=mask)
        h = ref.pos_embed(x)
        t6, temb = ref.adaln_single(t, None, batch_size=3, hidden_dtype=h.dtype)
        ehs = ref.caption_projection(enc)
        h = torch.gather(h, 1, ids[..., None].expand(-1, -1, 16))
        bias = ((1 - mask) * -10000.0).unsqueeze(1)
        for rb in ref.transformer_blocks:
            h = rb(h, encoder_hidden_states=ehs, encoder_attention_mask=bias, timestep=t6)
        shift, scale = (ref.scale_shift_table[None] + temb[:, None]).chunk(2, dim=1)
        want_k = ref.proj_out(F.layer_norm(h, (16,), eps=1e-6) * (1 + scale) + shift)
    assert got.shape == (3, 8, 32) and _max(got, want_k) < TOL


def test_unsupported_blocks_are_refused():
    from diffusers.models.attention import BasicTransformerBlock

    with pytest.raises(ValueError, match="norm_type"):
        fd.fuse_block(BasicTransformerBlock(16, 2, 8, norm_type="layer_norm"))
    with pytest.raises(ValueError, match="LayerNorm without affine"):
        fuse_transformer(tiny_dit(norm_elementwise_affine=True))
    with pytest.raises(ValueError, match="transformer blocks"):
        fuse_transformer(torch.nn.Linear(2, 2))


def test_masked_training_steps_through_diffusers_dit():
    """The README example: a diffusers DiT trained on half of its tokens through fastmask."""
    from diffusers import DDPMScheduler

    model = fuse_transformer(tiny_dit()).train()
    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    losses = []
    for step in range(6):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (8,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        ids_keep, _, _ = ops.random_mask(8, 16, 0.5, generator=g)             # keep 8 of 16 tokens
        pred = dit_forward_tokens(model, noisy, t, labels, ids_keep=ids_keep)   # [B, 8, p*p*8]
        eps = pred.unflatten(-1, (4, 8))[..., :4].flatten(-2)                   # the noise half of learned sigma
        loss = F.mse_loss(eps, tokens_of(noise, 2, ids_keep))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[3:]) < losses[0]


# --------------------------------------------------------------------------- LoRA, processors, hooks
_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _add_lora(model, name, seed):
    """A peft LoRA adapter on the self- and cross-attention projections, with random A and B
    (peft's default zero B would make every comparison trivially equal)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=_LORA_TARGETS, init_lora_weights=False)
    return inject_adapter_in_model(cfg, model, adapter_name=name)


def _lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def _run(kind, model, x, t, y, enc):
    if kind == "dit":
        return model(x, timestep=t, class_labels=y).sample
    return model(x, encoder_hidden_states=enc, timestep=t).sample


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("order", ["lora_then_fuse", "fuse_then_lora"])
def test_lora_on_a_fused_model_equals_lora_on_diffusers_own(kind, order, count_ops):
    """peft LoRA on to_q/to_k/to_v/to_out.0: the fused model's output and every LoRA gradient
    equal the unfused model's with the same LoRA (fp32), in either order of LoRA and fusing, and
    the fused model follows set_adapters and disable_adapters."""
    pytest.importorskip("peft", reason="needs peft (the [test] extra)")
    from diffusers.utils.peft_utils import set_adapter_layers, set_weights_and_activate_adapters

    base = tiny_dit() if kind == "dit" else tiny_pixart()
    ref = _add_lora(_add_lora(copy.deepcopy(base), "a", 1), "b", 2)
    if order == "lora_then_fuse":
        model = fuse_transformer(_add_lora(_add_lora(copy.deepcopy(base), "a", 1), "b", 2))
    else:
        model = _add_lora(_add_lora(fuse_transformer(copy.deepcopy(base)), "a", 1), "b", 2)
    assert type(model.transformer_blocks[0]).__name__ == "FusedBasicTransformerBlock"
    assert type(model.transformer_blocks[0].attn1.to_q) is not torch.nn.Linear  # peft's wrapper
    lref, lmod = _lora_params(ref), _lora_params(model)
    assert list(lref) == list(lmod) and len(lref) >= 16
    for n in lref:
        assert torch.equal(lref[n], lmod[n]), n
    x, t, y = _inputs()
    enc = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(2))
    plain = _run(kind, base, x, t, y, enc).detach()
    for adapters, weights in ((["a"], [1.0]), (["b"], [1.0]), (["a", "b"], [1.0, 0.5])):
        for m in (ref, model):
            set_weights_and_activate_adapters(m, adapters, weights)
        want = _run(kind, ref, x, t, y, enc)
        got = _run(kind, model, x, t, y, enc)
        assert _max(got, want) < TOL and _max(want, plain) > 1e-2, adapters  # LoRA changes the output
        target = torch.randn_like(want)
        for m in (ref, model):
            m.zero_grad(set_to_none=True)
        ((want - target) ** 2).mean().backward()
        ((got - target) ** 2).mean().backward()
        active = 0
        for n, q in lref.items():
            p = lmod[n]
            if q.grad is None:
                assert p.grad is None or p.grad.abs().max() == 0, n
                continue
            active += 1
            assert p.grad is not None, n
            assert _max(p.grad, q.grad) < 1e-5 * max(1.0, q.grad.abs().max().item()), n
        assert active >= 8 * len(adapters), active  # 2 blocks x 4 projections x (A, B) per adapter at least
    assert count_ops["attention"] > 0  # the fused attention core ran
    for m in (ref, model):
        set_adapter_layers(m, enabled=False)
    with torch.no_grad():
        off = _run(kind, model, x, t, y, enc)
        assert _max(off, _run(kind, ref, x, t, y, enc)) < TOL and _max(off, plain) < TOL


def test_what_the_fused_path_cannot_honour_is_refused_naming_the_module():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    class MyProcessor(AttnProcessor2_0):
        pass

    # a custom processor, before fusing and after
    m = tiny_dit()
    m.transformer_blocks[1].attn1.set_processor(MyProcessor())
    with pytest.raises(ValueError, match=r"transformer_blocks\[1\]\.attn1: a custom attention processor \(MyProcessor\)"):
        fuse_transformer(m)
    m = fuse_transformer(tiny_dit())
    x, t, y = _inputs()
    m.transformer_blocks[0].attn1.set_processor(AttnProcessor())  # diffusers' standard ones are fine
    m(x, timestep=t, class_labels=y)
    m.transformer_blocks[0].attn1.set_processor(MyProcessor())
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\]\.attn1: a custom attention processor"):
        m(x, timestep=t, class_labels=y)
    # hooks on modules the fused path does not call: refused at fuse time, and when added after
    m = tiny_dit()
    m.transformer_blocks[0].norm3.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\]\.norm3: has hooks"):
        fuse_transformer(m)
    m = fuse_transformer(tiny_dit())
    for name in ("attn1", "norm1", "norm1.norm", "norm3"):
        with pytest.raises(ValueError, match=rf"transformer_blocks\[1\]\.{name.replace('.', '[.]')}: the fused path"):
            m.transformer_blocks[1].get_submodule(name).register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\]\.attn1: the fused path"):
        m.transformer_blocks[0].attn1.register_forward_pre_hook(lambda *a: None)
    copy.deepcopy(m)  # the guard copies
    unfuse_transformer(m)
    m.transformer_blocks[1].attn1.register_forward_hook(lambda *a: None)  # unfused: allowed again
    # hooks on the projections run: they are called as modules
    m = fuse_transformer(tiny_dit())
    ref = tiny_dit()
    seen = []
    for mm in (m, ref):
        mm.transformer_blocks[0].attn1.to_k.register_forward_hook(lambda mod, i, o: seen.append(1) or o * 2)
    assert _max(m(x, timestep=t, class_labels=y).sample, ref(x, timestep=t, class_labels=y).sample) < TOL
    assert len(seen) == 2


def test_fused_block_names_an_input_of_another_dtype():
    m = fuse_transformer(tiny_dit())
    x, t, y = _inputs()
    with pytest.raises(ValueError, match=r"^hidden_states: expected dtype torch.float32 .*got torch.float64"):
        m.transformer_blocks[0](torch.randn(3, 16, 16, dtype=torch.float64), timestep=t, class_labels=y)

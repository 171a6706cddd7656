"""MicroDiT's deferred masking (fastmask.models.microdit) against a plain-torch MicroDiT written
here from SPEC-ROUTING section 3 (no fastmask op, layer or model code: only the model's weights
and its fixed position table are read), forward and backward, on the torch and Triton backends;
eval mode without masking; the zero fill; the trainer and the command line."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import fastmask
from fastmask.models import ARCHITECTURES, EDMPrecond
from fastmask.models.configs import microdit, microdit_kwargs
from fastmask.models.microdit import MicroDiT
from fastmask.ops import RandomTokens, dispatch

P = 2  # patch size of every test model
C = 2  # image channels


# --------------------------------------------------------------------------- plain torch MicroDiT
def _ln(x, eps=1e-6, weight=None):
    return F.layer_norm(x.float(), x.shape[-1:], weight, None, eps)


def _block(w, pre, x, c, heads):
    """DiT block with adaLN-Zero (SiLU -> Linear -> 6 chunks), LN without affine, softmax attention,
    GELU-tanh MLP, gated residuals."""
    mod = F.linear(F.silu(c), w[pre + "adaLN_modulation.1.weight"], w[pre + "adaLN_modulation.1.bias"])
    sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
    h = _ln(x) * (1 + sc1[:, None]) + sh1[:, None]
    B, L, D = h.shape
    qkv = F.linear(h, w[pre + "attn.qkv.weight"], w[pre + "attn.qkv.bias"]).view(B, L, 3, heads, D // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
    a = (att @ v).transpose(1, 2).reshape(B, L, D)
    x = x + g1[:, None] * F.linear(a, w[pre + "attn.proj.weight"], w[pre + "attn.proj.bias"])
    h = _ln(x) * (1 + sc2[:, None]) + sh2[:, None]
    m = F.gelu(F.linear(h, w[pre + "mlp.fc1.weight"], w[pre + "mlp.fc1.bias"]), approximate="tanh")
    return x + g2[:, None] * F.linear(m, w[pre + "mlp.fc2.weight"], w[pre + "mlp.fc2.bias"])


def plain_microdit(w, cfg, x, noise_labels, labels, ids_keep):
    """The spec's forward: embed + pos -> map_in -> mixer on all N -> keep ids_keep -> map_out ->
    backbone on K -> final layer -> scatter into zeros [B, N, p*p*C] -> image."""
    B, Cx, H, W = x.shape
    g = H // P
    N = g * g
    h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    h = h + w["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = noise_labels.float()[:, None] * freqs[None]
    t = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    t = F.linear(F.silu(F.linear(t, w["t_embedder.mlp.0.weight"], w["t_embedder.mlp.0.bias"])),
                 w["t_embedder.mlp.2.weight"], w["t_embedder.mlp.2.bias"])
    onehot = torch.zeros(B, cfg["num_classes"])
    for b, lab in enumerate(labels.tolist()):
        if lab >= 0:
            onehot[b, lab] = 1.0  # a dropped label (-1) is the zero vector
    c = t + onehot @ w["y_embedder.embedding_table.weight"].t()
    if "mixer_in.0.weight" in w:
        h = F.linear(_ln(h, weight=w["mixer_in.0.weight"]), w["mixer_in.1.weight"])
    for i in range(cfg["mixer_depth"]):
        h = _block(w, f"mixer_blocks.{i}.", h, c, cfg["mixer_num_heads"])
    if ids_keep is not None:
        h = torch.stack([h[b, ids_keep[b]] for b in range(B)])
    if "mixer_out.0.weight" in w:
        h = F.linear(_ln(h, weight=w["mixer_out.0.weight"]), w["mixer_out.1.weight"])
    for i in range(cfg["depth"]):
        h = _block(w, f"blocks.{i}.", h, c, cfg["num_heads"])
    sh, sc = F.linear(F.silu(c), w["final_layer.adaLN_modulation.1.weight"],
                      w["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    out = F.linear(_ln(h) * (1 + sc[:, None]) + sh[:, None], w["final_layer.linear.weight"],
                   w["final_layer.linear.bias"])
    if ids_keep is not None:
        full = torch.zeros(B, N, out.shape[-1])
        for b in range(B):
            full[b, ids_keep[b]] = out[b]
        out = full
    # tokens in (p_row, p_col, channel) order -> [B, C, H, W]
    return out.view(B, g, g, P, P, Cx).permute(0, 5, 1, 3, 2, 4).reshape(B, Cx, H, W)


def plain_loss(w, cfg, y, labels, sigma, noise, ids_keep, sigma_data=0.5):
    """micro_diffusion's edm_loss: weighted squared error, mean over channels, average-pooled over
    each p x p patch, mean over the KEPT patches of each sample."""
    s = sigma.view(-1, 1, 1, 1)
    xn = y + s * noise
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (s**2 + sigma_data**2).sqrt()
    Fx = plain_microdit(w, cfg, c_in * xn, sigma.log() / 4, labels, ids_keep)
    D = c_skip * xn + c_out * Fx
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    per = F.avg_pool2d((weight * (D - y) ** 2).mean(1), P).flatten(1)  # [B, N]
    if ids_keep is None:
        return per.mean(1)
    kept = torch.zeros_like(per)
    kept.scatter_(1, ids_keep, 1.0)
    return (per * kept).sum(1) / kept.sum(1)


# --------------------------------------------------------------------------- fixtures
CFG = dict(depth=2, hidden_size=32, num_heads=2, mlp_ratio=(0.5, 4.0), mixer_depth=2, mixer_hidden_size=16,
           mixer_num_heads=2, mixer_mlp_ratio=2.0, num_classes=5)


def _net(seed=0, **over):
    torch.manual_seed(seed)
    cfg = {**CFG, **over}
    net = EDMPrecond(MicroDiT(input_size=8, patch_size=P, in_channels=C, **cfg))
    with torch.no_grad():  # leave adaLN-Zero and the zero final layer: every path must carry signal
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net, cfg


def _weights(net):
    return {k: v for k, v in net.model.state_dict().items()} | {"pos_embed": net.model.pos_embed[0]}


def _batch(seed=1, B=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, C, 8, 8, generator=g)
    noise = torch.randn(B, C, 8, 8, generator=g)
    sigma = (torch.randn(B, generator=g) * 1.2 - 1.2).exp()
    labels = torch.tensor([1, -1, 4][:B])
    return y, labels, sigma, noise


def _backends():
    out = ["torch"]
    reason = dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)])
    out.append(pytest.param("triton", marks=pytest.mark.skipif(bool(reason), reason=f"Triton unavailable: {reason}")))
    return out


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("ratio", [0.75, 0.3, 0.0])  # N = 16: K = 4, 11 (not multiples of 8), 16
def test_loss_and_grads_match_plain_torch(backend, ratio):
    net, cfg = _net()
    net.train()
    y, labels, sigma, noise = _batch()
    N = net.model.num_patches
    ids = RandomTokens(ratio).draw(3, N, generator=torch.Generator().manual_seed(5))
    if ratio:
        assert ids.shape == (3, int(N * (1 - ratio))) and ids.shape[1] % 8
        assert not all(bool((r[1:] > r[:-1]).all()) for r in ids), "the test wants unsorted ids"

    net.zero_grad()
    with fastmask.backend(backend), dispatch.record_choices() as ran:
        loss, dsm, mae = net.loss_given(y, labels, sigma, noise, ids, mae_coef=0.0)
    loss.sum().backward()
    for op in ["attention", "layernorm_modulate"] + (["gather_tokens", "scatter_tokens"] if ratio else []):
        assert ran[op] == {backend}, (op, ran.get(op))
    got = {n: p.grad.clone() for n, p in net.model.named_parameters()}
    if ids is None:
        assert torch.equal(mae, torch.zeros_like(mae))

    w = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in _weights(net).items()}
    want_loss = plain_loss(w, cfg, y, labels, sigma, noise, ids)
    want_loss.sum().backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dsm, want_loss, rtol=1e-4, atol=1e-5)
    for n, g in got.items():
        torch.testing.assert_close(g, w[n].grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")
        assert g.abs().sum() > 0, f"{n} gets no gradient"


@pytest.mark.parametrize("backend", _backends())
def test_forward_masked_output_is_zero_at_dropped_tokens(backend):
    net, cfg = _net()
    m = net.model.train()
    y, labels, sigma, _ = _batch()
    ids = RandomTokens(0.75).draw(3, m.num_patches, generator=torch.Generator().manual_seed(2))
    with fastmask.backend(backend):
        tokens, mask = m.forward_tokens(y, sigma.log() / 4, labels, ids_keep=ids)
    want = plain_microdit(_weights(net), cfg, y, sigma.log() / 4, labels, ids)
    torch.testing.assert_close(m.forward(y, sigma.log() / 4, labels, ids_keep=ids), want, rtol=1e-4, atol=1e-5)
    assert torch.equal(mask.sum(1), torch.full((3,), 12.0))
    assert torch.equal(tokens[mask.bool()], torch.zeros_like(tokens[mask.bool()]))  # exact zeros, not learned
    assert "out_fill" not in m.state_dict()  # MicroDiT adds no mask token


def test_eval_mode_turns_masking_off_and_gives_the_dense_model():
    net, cfg = _net()
    y, labels, sigma, _ = _batch()
    m = net.model
    dense = plain_microdit(_weights(net), cfg, y, sigma.log() / 4, labels, None)
    m.eval()
    tokens, mask = m.forward_tokens(y, sigma.log() / 4, labels, mask_ratio=0.75)
    assert mask is None and tokens.shape == (3, 16, P * P * C)
    torch.testing.assert_close(m(y, sigma.log() / 4, labels, mask_ratio=0.75), dense, rtol=1e-4, atol=1e-5)
    # the EDM denoiser the samplers call: unmasked, whatever it is asked
    D = net(y, sigma, labels, mask_ratio=0.75)
    s = sigma.view(-1, 1, 1, 1)
    Fx = plain_microdit(_weights(net), cfg, y / (s**2 + 0.25).sqrt(), sigma.log() / 4, labels, None)
    torch.testing.assert_close(D, 0.25 / (s**2 + 0.25) * y + s * 0.5 / (s**2 + 0.25).sqrt() * Fx, rtol=1e-4,
                               atol=1e-5)
    # train mode at ratio 0 (the fine-tune) is the same dense model
    m.train()
    torch.testing.assert_close(m(y, sigma.log() / 4, labels), dense, rtol=1e-4, atol=1e-5)
    # and train mode with a ratio masks, drawing from the generator
    a, mask_a = m.forward_tokens(y, sigma.log() / 4, labels, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    b, _ = m.forward_tokens(y, sigma.log() / 4, labels, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    assert mask_a is not None and mask_a.sum() == 36 and torch.equal(a, b)


@pytest.mark.parametrize("block", [None, dict(norm="rms", qk_norm=True, rope=True, mlp="swiglu")])
def test_keeping_every_token_in_any_order_is_the_dense_model(block):
    """ids_keep = a full permutation: attention and MLP are permutation-equivariant and the
    positions ride along (added before the mixer; with RoPE, the backbone rotates each kept token by
    its grid position, not by its place in ids_keep), so the output is the dense one."""
    torch.manual_seed(0)
    m = microdit("T/2", input_size=8, in_channels=C, num_classes=5, block=block)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    y, labels, sigma, _ = _batch()
    dense = m(y, sigma.log() / 4, labels)
    perm = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    torch.testing.assert_close(m(y, sigma.log() / 4, labels, ids_keep=perm), dense, rtol=1e-4, atol=1e-5)


def test_mae_term_has_no_gradient():
    """The zero fill is fixed: MaskDiT's MAE term on the dropped tokens is a constant for MicroDiT,
    so mae_coef changes the logged loss but not one gradient."""
    net, _ = _net()
    net.train()
    y, labels, sigma, noise = _batch()
    ids = RandomTokens(0.75).draw(3, 16, generator=torch.Generator().manual_seed(4))
    grads = []
    for coef in (0.0, 0.1):
        net.zero_grad()
        net.loss_given(y, labels, sigma, noise, ids, mae_coef=coef)[0].sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_sizes_init_and_registration():
    assert ARCHITECTURES["microdit"].masks
    xl = microdit("XL/2")  # MicroDiT_XL_2: D 1024, 28 blocks, mixer 6 at 768, MLP ratio 0.5 -> 4.0
    assert (len(xl.blocks), xl.hidden_size, len(xl.mixer_blocks), xl.mixer_hidden_size) == (28, 1024, 6, 768)
    assert xl.blocks[0].mlp.fc1.out_features == 512 and xl.blocks[-1].mlp.fc1.out_features == 4096
    assert xl.blocks[0].attn.head_dim == 64 and xl.mixer_blocks[0].attn.head_dim == 64
    assert xl.mixer_blocks[0].cond_size == 1024
    d = microdit("Digits/2", input_size=16, in_channels=1, num_classes=10)
    assert (len(d.mixer_blocks), len(d.blocks), d.num_patches) == (2, 4, 64)
    assert isinstance(d.mixer_in, torch.nn.Identity) and d.mlp_ratios == [4.0] * 4
    assert set(microdit_kwargs("S/2")) == set(microdit_kwargs("XL/2")) - {"mixer_mlp_ratio"}
    # a fresh model outputs zeros (adaLN-Zero, zero final layer); output projections by depth
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(d(x, torch.zeros(2), torch.tensor([0, 1])), torch.zeros_like(x))
    stds = [b.attn.proj.weight.std().item() for b in xl.blocks[:2]]
    assert abs(stds[0] - 0.02 / 2**0.5) < 2e-3 and abs(stds[1] - 0.02 / 2) < 2e-3
    assert abs(xl.mixer_blocks[0].mlp.fc2.weight.std().item() - 0.02 / 56**0.5) < 1e-3
    with pytest.raises(ValueError, match="mixer_num_heads"):
        microdit("T/2", mixer_hidden_size=30, mixer_num_heads=4)
    with pytest.raises(ValueError, match="mlp_ratio"):
        microdit("T/2", mlp_ratio=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="config"):
        microdit("Q/2")


def _cfg(out, **kw):
    from fastmask.presets import get_preset

    cfg = get_preset("digits-microdit")
    base = dict(model="T/2", image_size=8, batch_size=8, steps=8, minutes=None, finetune_steps=4,
                finetune_minutes=None, warmup_steps=2, ckpt_every=0, log_every=4, out=str(out), evaluate=False,
                device="cpu", threads=1)
    for k, v in {**base, **kw}.items():
        setattr(cfg, k, v)
    return cfg


def test_trainer_resumes_exactly_across_the_fine_tune(tmp_path):
    from fastmask.train import train

    def state(tr):
        out = {f"model.{k}": v for k, v in tr.net.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in tr.ema.state_dict().items()})
        for i, st in tr.opt.state_dict()["state"].items():
            out.update({f"opt.{i}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
        return out

    full = train(_cfg(tmp_path / "full"), progress=False)
    assert isinstance(full.net.model, MicroDiT)
    rows = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    rows = [r for r in rows if "loss" in r]
    assert [r["mask_ratio"] for r in rows] == [0.75, 0.75, 0.0]
    assert all(r["loss"] == pytest.approx(r["dsm"], rel=1e-6) for r in rows)  # mae_coef 0: the kept-token loss
    assert all(math.isfinite(r["loss"]) for r in rows)

    def stop_at_6(trainer, step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path / "split"), hooks={"after_step": stop_at_6}, progress=False)
    resumed = train(_cfg(tmp_path / "split"), resume=tmp_path / "split", progress=False)
    assert resumed.step == full.step == 12
    a, b = state(full), state(resumed)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_command_line_trains_samples_and_resumes(tmp_path):
    from fastmask.cli import main

    out = tmp_path / "run"
    argv = ["train", "--preset", "digits-microdit", "--model", "T/2", "--image-size", "8", "--batch-size", "8",
            "--steps", "3", "--finetune-steps", "1", "--sample-steps", "2", "--samples-per-class", "1",
            "--set", "log_every=2", "--set", "grid_per_class=1", "--no-eval", "--progress", "off", "--out", str(out)]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["training"]["phase1_steps"] == 3 and m["training"]["phase2_steps"] == 1
    assert main(["train", "--resume", str(out), "--finetune-steps", "2", "--no-eval", "--progress", "off"]) == 0
    assert json.loads((out / "metrics.json").read_text())["training"]["steps"] == 5
    assert main(["sample", "--checkpoint", str(out), "--labels", "3", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "sample_00000_class3.png").exists()


def _ddp_worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    from fastmask.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tr = train(_cfg(out, steps=3, finetune_steps=2, log_every=1), progress=False)
        if rank == 1:  # rank 1 writes nothing; hand its weights back for the comparison
            torch.save({k: v.clone() for k, v in tr.net.state_dict().items()}, f"{out}/rank1.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path):
    """Each rank takes its slice of the global batch and of the (seed, step) draws, ids_keep
    included: 2 gloo processes end with the weights of 1 process, across the dense fine-tune."""
    import socket
    import sys
    from pathlib import Path

    import torch.multiprocessing as mp

    from fastmask.checkpoint_io import load_checkpoint
    from fastmask.train import train

    sys.path.insert(0, str(Path(__file__).parent))  # the spawned ranks import this module
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out2 = tmp_path / "ddp"
    out2.mkdir()
    mp.spawn(_ddp_worker, args=(2, port, str(out2)), nprocs=2, join=True)
    one = train(_cfg(tmp_path / "one", steps=3, finetune_steps=2, log_every=1), progress=False)
    ck = load_checkpoint(out2)
    assert ck["step"] == 5 and ck["extra"]["world_size"] == 2
    rank1 = torch.load(out2 / "rank1.pt")
    for k, v in one.net.state_dict().items():
        torch.testing.assert_close(ck["model"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
        assert torch.equal(ck["model"][k], rank1[k]), f"{k}: ranks disagree"


@pytest.mark.parametrize("backend", _backends())
def test_loss_and_sampling_under_cpu_autocast(backend):
    """bf16 autocast: the blocks of mixer and backbone run in bf16 (the maps' fp32 LayerNorm output
    goes back to bf16 through their Linear), the loss is fp32 and finite, the Heun sampler runs."""
    from fastmask.sampling import heun_sample

    net, _ = _net()
    y, labels, sigma, noise = _batch()
    ids = RandomTokens(0.75).draw(3, 16, generator=torch.Generator().manual_seed(4))
    seen = []
    hooks = [blk.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
             for blk in (net.model.mixer_blocks[0], net.model.blocks[0])]
    with fastmask.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net.loss_given(y, labels, sigma, noise, ids, mae_coef=0.0)[0]
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert seen == [torch.bfloat16, torch.bfloat16]
    ref = net.loss_given(y, labels, sigma, noise, ids, mae_coef=0.0)[0]
    torch.testing.assert_close(loss, ref, rtol=0.1, atol=0.05)  # only the rounding differs
    for h in hooks:
        h.remove()
    net.eval()
    with torch.no_grad(), fastmask.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        x = heun_sample(net, torch.randn(3, C, 8, 8, generator=torch.Generator().manual_seed(1)), labels, steps=2)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def _expected_flops(cfg, N, K, P_out, in_ch, num_classes, p=P):
    """Matmul + attention FLOPs of one forward per image, written out: the mixer on N tokens, the
    maps, the backbone and final layer on K (2 FLOPs per multiply-add; attention 4 L^2 D)."""
    D, Dm = cfg["hidden_size"], cfg["mixer_hidden_size"]

    def block(L, W, ratio):
        F_ = int(W * ratio)
        return 2 * L * W * 3 * W + 4 * L * L * W + 2 * L * W * W + 4 * L * W * F_ + 2 * D * 6 * W

    ratios = cfg["mlp_ratio"]
    if isinstance(ratios, tuple):
        lo, hi, n = ratios[0], ratios[1], cfg["depth"]
        ratios = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    else:
        ratios = [ratios] * cfg["depth"]
    total = 2 * N * in_ch * p * p * D + 2 * (256 * D + D * D) + 2 * num_classes * D
    total += sum(block(N, Dm, cfg.get("mixer_mlp_ratio", 4.0)) for _ in range(cfg["mixer_depth"]))
    total += (2 * N * D * Dm + 2 * K * Dm * D) if Dm != D else 0
    total += sum(block(K, D, r) for r in ratios)
    return total + 2 * K * D * P_out + 2 * D * 2 * D


def test_flop_count_traces_the_mixer_on_every_token_and_the_backbone_on_the_kept():
    """fastmask.models.traced_flops (what fastmask info and the benchmarks report) on MicroDiT
    equals the count written out here: the mixer runs N tokens, the backbone and final layer K."""
    from fastmask.models import traced_flops
    from fastmask.models.microdit import MICRODIT_SIZES

    for name, ratio, K in (("T/2", 0.75, 16), ("T/2", 0.0, 64), ("XL/2", 0.75, 16), ("XL/2", 0.0, 64)):
        traced = traced_flops("microdit", name, input_size=16, in_channels=C, num_classes=5, mask_ratio=ratio)
        want = _expected_flops(MICRODIT_SIZES[name.split("/")[0]], 64, K, P * P * C, C, 5)
        assert traced["forward"] == want, (name, ratio)


def test_compare_gives_microdit_its_ratio_and_no_mae_term(tmp_path):
    """fastmask train --compare ...,microdit trains MicroDiT at its published 75% with the
    kept-token loss only, whatever ratio the shared config has."""
    from fastmask.compare import family_config
    from fastmask.presets import get_preset

    cfg = get_preset("digits")
    cfg.out = str(tmp_path)
    fc = family_config(cfg, "microdit", {"1": 60.0, "2": 30.0})
    assert (fc.arch, fc.mask_ratio, fc.mae_coef) == ("microdit", 0.75, 0.0)
    assert fc.minutes == 1.0 and fc.finetune_minutes == 0.5  # the dense fine-tune keeps its share of the time


def test_flow_objective_keeps_the_kept_token_loss():
    """Under SiT's flow objective the loss is the velocity error over the kept patches only."""
    from fastmask.models import FlowPrecond

    net, cfg = _net()
    flow = FlowPrecond(net.model).train()
    y, labels, _, x0 = _batch()
    t = torch.tensor([0.1, 0.5, 0.9])
    ids = RandomTokens(0.75).draw(3, 16, generator=torch.Generator().manual_seed(6))
    loss, fm, _ = flow.loss_given(y, labels, t, x0, ids, mae_coef=0.0)
    tv = t.view(-1, 1, 1, 1)
    v = plain_microdit(_weights(net), cfg, tv * y + (1 - tv) * x0, t, labels, ids)
    per = F.avg_pool2d(((v - (y - x0)) ** 2).mean(1), P).flatten(1)
    kept = torch.zeros_like(per).scatter_(1, ids, 1.0)
    torch.testing.assert_close(loss, (per * kept).sum(1) / 4, rtol=1e-4, atol=1e-5)

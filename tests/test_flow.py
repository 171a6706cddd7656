"""SiT's flow-matching objective (fastmask.models.flow) and the fused loss kernel's flow mode.

The kernel's flow mode (c_skip = 0, c_out = 1, lambda = 1) against the reference, forward and
dLoss/dF, fp32, odd sizes, in the interpreter; the op through autograd; the wrapper's
interpolant, target and MAE space checked by constructing outputs that zero each term.
"""
import pytest
import torch

import fastmask
from fastmask import kernels as fk
from fastmask.models import FlowPrecond, draw_t, maskdit, dit, patchify
from fastmask.ops import reference as R
from helpers import assert_all_written, poisoned_empty

MAE_COEF = 0.1


def _case(B, N, P, with_mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1, x0 = torch.randn(B, N, P, generator=g), torch.randn(B, N, P, generator=g)
    t = torch.rand(B, generator=g)
    xt = t.view(-1, 1, 1) * x1 + (1 - t.view(-1, 1, 1)) * x0
    F = torch.randn(B, N, P, generator=g)
    mask = None
    if with_mask:
        mask = (torch.rand(B, N, generator=g) < 0.5).float()
        if B > 1:
            mask[-1] = 0.0
    return F, xt, x1 - x0, t, mask


def _ref(F, xt, u, t, mask):
    Fl = F.detach().clone().requires_grad_()
    fm, mae = R.dsm_mae_loss_terms(Fl, xt, u, t, mask, objective="flow")
    (fm + MAE_COEF * mae).sum().backward()
    return (fm + MAE_COEF * mae).detach(), fm.detach(), mae.detach(), Fl.grad


@pytest.mark.parametrize("B,N,P", [(1, 59, 16), (3, 59, 12), (2, 30, 48), (2, 7, 3)])
@pytest.mark.parametrize("with_mask", [True, False])
def test_flow_kernel_matches_reference(B, N, P, with_mask):
    F, xt, u, t, mask = _case(B, N, P, with_mask)
    with poisoned_empty():
        loss, terms, grad = fk.dsm_mae_loss_fwd(F, xt, u, t, mask, MAE_COEF, 0.5, "flow")
    for x, n in [(loss, "loss"), (terms, "terms"), (grad, "grad")]:
        assert_all_written(x, n)
    l, fm, mae, g = _ref(F, xt, u, t, mask)
    torch.testing.assert_close(loss, l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms[:, 0], fm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms[:, 1], mae, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, g, atol=1e-7, rtol=1e-5)
    # plain velocity MSE on the kept tokens, as SiT's loss with nothing dropped
    kept = torch.ones(B, N) if mask is None else 1 - mask
    expect = (((F - u) ** 2).mean(-1) * kept).sum(-1) / kept.sum(-1).clamp_min(1)
    torch.testing.assert_close(terms[:, 0], expect, atol=1e-5, rtol=1e-5)


def test_flow_kernel_ignores_sigma_and_differs_from_edm():
    F, xt, u, t, mask = _case(2, 20, 12, True, seed=1)
    a = fk.dsm_mae_loss_fwd(F, xt, u, t, mask, MAE_COEF, 0.5, "flow")
    b = fk.dsm_mae_loss_fwd(F, xt, u, torch.full_like(t, float("nan")), mask, MAE_COEF, 0.5, "flow")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    e = fk.dsm_mae_loss_fwd(F, xt, u, t + 0.1, mask, MAE_COEF, 0.5)
    assert not torch.allclose(a[0], e[0])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_flow_op_autograd(backend):
    B, N, P = 3, 23, 12
    F, xt, u, t, mask = _case(B, N, P, True, seed=2)
    Fl = F.clone().requires_grad_()
    w = torch.tensor([0.5, -1.0, 2.0])
    with fastmask.backend(backend):
        loss, fm, mae = fastmask.ops.dsm_mae_loss(Fl, xt, u, t, mask, MAE_COEF, return_terms=True, objective="flow")
    (loss * w).sum().backward()
    Fr = F.clone().requires_grad_()
    dr, mr = R.dsm_mae_loss_terms(Fr, xt, u, t, mask, objective="flow")
    ((dr + MAE_COEF * mr) * w).sum().backward()
    torch.testing.assert_close(loss, (dr + MAE_COEF * mr).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(Fl.grad, Fr.grad, atol=1e-6, rtol=1e-5)


def test_flow_op_rejects_unknown_objective():
    F, xt, u, t, mask = _case(1, 4, 4, False)
    with pytest.raises(ValueError, match="objective"):
        fastmask.ops.dsm_mae_loss(F, xt, u, t, mask, objective="ve")


def test_draw_t():
    g = torch.Generator().manual_seed(0)
    t = draw_t(4000, generator=g)
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.02
    g = torch.Generator().manual_seed(0)
    ln = draw_t(4000, schedule="logit_normal", generator=g)
    torch.testing.assert_close(ln, torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0))))
    with pytest.raises(ValueError, match="schedule"):
        draw_t(3, schedule="cosine")
    with pytest.raises(ValueError, match="t_schedule"):
        FlowPrecond(torch.nn.Identity(), t_schedule="cosine")


class _Oracle(torch.nn.Module):
    """A network whose token outputs are set from outside, to probe what the loss compares."""

    def __init__(self, base):
        super().__init__()
        self.base, self.patch_size, self.out_channels = base, base.patch_size, base.out_channels
        self.num_patches = base.num_patches
        self.out = None
        self.seen = None

    def forward_tokens(self, x, t, labels, **kw):
        self.seen = (x.detach().clone(), t.detach().clone())
        ids_keep = kw.get("ids_keep")
        mask = None
        if ids_keep is not None:
            mask = torch.ones(x.shape[0], self.num_patches)
            mask.scatter_(1, ids_keep, 0.0)
        return self.out(x, mask), mask


def test_flow_loss_space_interpolant_target_and_mae():
    """x_t = t x1 + (1 - t) x0 goes in with t itself; fm is 0 when the kept tokens output
    x1 - x0; mae is 0 when the dropped tokens output x_t normalised per token; each is
    nonzero otherwise."""
    torch.manual_seed(0)
    base = maskdit("T/2", input_size=8, in_channels=3, num_classes=5)
    net = _Oracle(base)
    pre = FlowPrecond(net)
    B = 3
    x1, x0 = torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8)
    t = torch.tensor([0.0, 0.3, 1.0])
    ids_keep = torch.stack([torch.randperm(16)[:8] for _ in range(B)])
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    u_tok = patchify(x1 - x0, 2)
    xt_tok = patchify(xt, 2)
    norm = (xt_tok - xt_tok.mean(-1, keepdim=True)) / (xt_tok.var(-1, keepdim=True) + 1e-6).sqrt()

    def perfect(x, mask):
        m = mask.unsqueeze(-1)
        return (1 - m) * u_tok + m * norm

    net.out = perfect
    loss, fm, mae = pre.loss_given(x1, torch.zeros(B, dtype=torch.long), t, x0, ids_keep)
    torch.testing.assert_close(net.seen[0], xt)
    torch.testing.assert_close(net.seen[1], t)
    assert fm.abs().max() < 1e-10 and mae.abs().max() < 1e-8
    # the velocity at the dropped tokens is NOT the MAE target
    net.out = lambda x, mask: u_tok
    _, fm2, mae2 = pre.loss_given(x1, None, t, x0, ids_keep)
    assert fm2.abs().max() < 1e-10 and (mae2 > 0.1).all()
    net.out = lambda x, mask: norm
    _, fm3, _ = pre.loss_given(x1, None, t, x0, ids_keep)
    assert (fm3 > 0.1).all()
    with pytest.raises(ValueError, match="t:"):
        pre.loss_given(x1, None, torch.tensor([0.0, 0.5, 1.5]), x0, ids_keep)


@pytest.mark.parametrize("arch", ["maskdit", "dit"])
def test_flow_precond_trains_real_models(arch):
    """loss() on the real models: finite, differentiable, reproducible from the generator,
    and the wrapper's forward is the network's first C channels at (x_t, t)."""
    torch.manual_seed(0)
    build = maskdit if arch == "maskdit" else dit
    pre = FlowPrecond(build("T/2", input_size=8, in_channels=3, num_classes=5), t_schedule="logit_normal")
    pre.train()
    y, lab = torch.randn(2, 3, 8, 8), torch.tensor([1, 4])
    ratio = 0.5 if arch == "maskdit" else 0.0
    l1, fm, mae = pre.loss(y, lab, mask_ratio=ratio, generator=torch.Generator().manual_seed(3), return_terms=True,
                           force_drop_ids=torch.zeros(2, dtype=torch.bool))
    l2 = pre.loss(y, lab, mask_ratio=ratio, generator=torch.Generator().manual_seed(3),
                  force_drop_ids=torch.zeros(2, dtype=torch.bool))
    assert torch.equal(l1, l2) and torch.isfinite(l1).all()
    assert (mae > 0).all() if arch == "maskdit" else torch.equal(mae, torch.zeros(2))
    l1.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pre.parameters())
    pre.eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.9])
    v = pre(x, t, lab)
    assert v.shape == x.shape
    torch.testing.assert_close(v, pre.model(x, t, lab)[:, :3].float())


# --------------------------------------------------- resume across objectives, sample settings
def test_resuming_with_the_other_objective_is_refused(tmp_path):
    from test_train import tiny_cfg

    from fastmask.errors import UsageError
    from fastmask.train import train

    def stop_at_3(trainer, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "r", objective="flow", steps=6, finetune_steps=0), hooks={"after_step": stop_at_3},
              progress=False)
    with pytest.raises(UsageError, match="objective 'flow'"):
        train(tiny_cfg(tmp_path / "r", steps=6, finetune_steps=0), resume=tmp_path / "r", progress=False)


def test_sample_settings_pick_the_flow_sampler_and_guidance_interval():
    import argparse

    from fastmask.errors import UsageError
    from fastmask.generate import resolve_settings
    from fastmask.sampling import generate

    def args(**kw):
        base = dict(preset=None, steps=3, guidance=None, labels="1,2", num=None, per_class=None, npz=None,
                    sampler=None, guidance_interval=None)
        return argparse.Namespace(**{**base, **kw})

    flow_info = {"num_classes": 5, "shape": (4, 8, 8), "kind": "latents", "objective": "flow"}
    edm_info = dict(flow_info, objective="edm")
    st = resolve_settings(args(sampler="sde", guidance_interval="0.1,0.9"), flow_info)
    assert st["flow"] == {"method": "sde", "interval": (0.1, 0.9)}
    assert resolve_settings(args(), flow_info)["flow"] == {}
    with pytest.raises(UsageError, match="--guidance-interval"):
        resolve_settings(args(guidance_interval="0.9,0.1"), flow_info)
    with pytest.raises(UsageError, match="--sampler"):
        resolve_settings(args(sampler="euler"), edm_info)

    pre = FlowPrecond(dit("T/2", input_size=8, in_channels=4, num_classes=5)).eval()
    torch.manual_seed(0)
    for p in pre.parameters():
        p.data.normal_(0, 0.05)
    lab = torch.tensor([1, 2, 3])

    def run(flow, seed=0):
        with fastmask.backend("torch"):
            return torch.cat([x for _, x in generate(pre, lab, (4, 8, 8), 0, 3, steps=3, guidance=1.5, seed=seed,
                                                     batch_size=2, flow=flow)])

    heun = run(None)
    assert torch.equal(heun, run({}))  # no settings: the Heun default
    sde = run({"method": "sde"})
    assert torch.isfinite(sde).all() and not torch.allclose(sde, heun)
    assert torch.equal(sde, run({"method": "sde"})) and not torch.equal(sde, run({"method": "sde"}, seed=1))
    assert not torch.allclose(run({"interval": (0.9, 1.0)}), heun)  # guided on part of the path only

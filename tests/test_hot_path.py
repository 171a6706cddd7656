"""The lean hot path of the public ops.

- A call is checked and its backend chosen once per signature; a later call with the same
  signature skips both, yet every new signature (a wrong shape, dtype or device included) is
  checked again, and a backend() block or a new read of the environment changes the choice.
- An eager call of a fast op runs a torch.autograd.Function; torch.compile traces the custom-op
  pair. Both run the same kernels: outputs and every gradient are bit-identical.
- torch.compile of a MaskDiT loss + backward over several steps compiles once: no graph break
  (fullgraph=True) and no recompile (counted).
"""
from __future__ import annotations

import pytest
import torch

import fastmask
from fastmask import ops
from fastmask.ops import checks, dispatch

from helpers import randomise, step_draws

TRITON_REASON = dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)])
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton backend unavailable: {TRITON_REASON}")


def _count_checks(monkeypatch) -> list[int]:
    n = [0]
    real = checks.tensor

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(checks, "tensor", counting)
    return n


def test_checks_run_once_per_signature(monkeypatch):
    dispatch.clear_plans()
    n = _count_checks(monkeypatch)
    x, y, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    ops.gated_residual(x, y, g)
    first = n[0]
    assert first > 0
    ops.gated_residual(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8))  # same signature
    assert n[0] == first, "a repeated signature ran the structural checks again"
    ops.gated_residual(torch.randn(3, 5, 8), torch.randn(3, 5, 8), torch.randn(3, 8))  # new batch size
    assert n[0] > first


def test_a_bad_call_after_a_good_one_is_still_refused():
    x, y, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    ops.gated_residual(x, y, g)
    with pytest.raises(ValueError, match="gate"):
        ops.gated_residual(x, y, torch.randn(2, 7))
    with pytest.raises(ValueError, match="y: expected dtype"):
        ops.gated_residual(x, y.double(), g)
    with pytest.raises(ValueError, match="gate"):
        ops.gated_residual(x, y, "not a tensor")
    ops.layernorm_modulate(x, g, g)
    with pytest.raises(ValueError, match="eps"):
        ops.layernorm_modulate(x, g, g, eps=-1.0)
    ids = torch.tensor([[0, 2], [1, 4]])
    ops.gather_tokens(x, ids, check_ids=False)
    with pytest.raises(ValueError, match="ids_keep"):
        ops.gather_tokens(x, ids.float(), check_ids=False)
    with pytest.raises(ValueError, match="ids must lie"):  # the value check runs on every call
        ops.gather_tokens(x, torch.tensor([[0, 9], [1, 4]]))


def test_a_backend_block_overrides_a_cached_choice():
    x, y, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    with ops.record_choices() as ran:
        ops.gated_residual(x, y, g)
        ops.gated_residual(x, y, g)  # from the cache: still recorded
    assert ran["gated_residual"] == {"torch"}
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        with fastmask.backend("cuda"):
            ops.gated_residual(x, y, g)
    if TRITON_REASON is None:
        with fastmask.backend("triton"), ops.record_choices() as ran:
            ops.gated_residual(x, y, g)
        assert ran["gated_residual"] == {"triton"}


@needs_triton
def test_block_requests_follow_nesting_threads_and_reloads(monkeypatch):
    """Inside backend() blocks a call's request is cached per thread until the block stack
    changes: nested and closed blocks, a block open in another thread only, and a new read of
    the environment inside a block all give the request that applies."""
    import threading

    x, y, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)

    def ran_on(**kw):
        with ops.record_choices() as ran:
            ops.gated_residual(x, y, g, **kw)
            ops.gated_residual(x, y, g, **kw)  # the second call comes from the caches
        return ran["gated_residual"]

    with fastmask.backend("torch"):
        assert ran_on() == {"torch"}
        with fastmask.backend(gated_residual="triton"):
            assert ran_on() == {"triton"}
            with fastmask.backend(attention="torch"):  # another op's block: this op's request holds
                assert ran_on() == {"triton"}
        assert ran_on() == {"torch"}
        seen = []
        t = threading.Thread(target=lambda: seen.append(ran_on()))  # no block in that thread
        t.start()
        t.join()
        assert seen == [{"torch"}]  # the automatic choice on CPU tensors
    with fastmask.backend(attention="torch"):  # a block that leaves this op to the environment
        assert ran_on() == {"torch"}
        monkeypatch.setenv("FASTMASK_BACKEND", "triton")
        ops.reload_environment()
        assert ran_on() == {"triton"}
    monkeypatch.delenv("FASTMASK_BACKEND")
    ops.reload_environment()
    assert ran_on() == {"torch"}


def test_the_environment_is_read_at_reload_not_per_call(monkeypatch):
    x, y, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 8)
    ops.gated_residual(x, y, g)
    monkeypatch.setenv("FASTMASK_BACKEND", "cuda")
    ops.gated_residual(x, y, g)  # not read yet: the call still runs
    ops.reload_environment()
    with pytest.raises(ops.BackendUnavailable, match="cuda"):
        ops.gated_residual(x, y, g)
    monkeypatch.setenv("FASTMASK_BACKEND", "bogus")
    ops.reload_environment()  # a bad value is reported where it is used, naming the variable
    with pytest.raises(ValueError, match="FASTMASK_BACKEND"):
        ops.gated_residual(x, y, g)
    monkeypatch.delenv("FASTMASK_BACKEND")
    ops.reload_environment()
    ops.gated_residual(x, y, g)


def _routes():
    """op -> (custom op, eager autograd.Function, its arguments): the two routes of each op,
    called with exactly what the public op passes them."""
    import importlib

    A, Lo, Nm, T, S = (importlib.import_module(f"fastmask.ops.{m}")
                       for m in ("attention", "loss", "norm", "tokens", "swiglu"))
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).float().requires_grad_()

    B, N, K, D = 2, 7, 3, 8
    ids = ops.random_mask(B, N, 1 - K / N, generator=torch.Generator().manual_seed(1))[0]
    mask = ops.mask_from_ids(ids, N)
    return {
        "gather_tokens": (T._gather_op, T._GATHER, (r(B, N, D), ids, r(N, D), "triton")),
        "unmask_tokens": (T._unmask_op, T._UNMASK, (r(B, K, D), ids, r(D), N, r(N, D), "triton")),
        "scatter_tokens": (T._scatter_op, T._SCATTER, (r(B, K, D), ids, r(B, N, D), N, "triton")),
        "layernorm_modulate": (Nm._lnm_op, Nm._LNM, (r(B, N, D), r(B, D), r(B, D), 1e-6, "triton")),
        "gated_residual": (Nm._gr_op, Nm._GR, (r(B, N, D), r(B, N, D), r(B, D), "triton")),
        "residual_layernorm_modulate": (
            Nm._rlnm_op, Nm._RLNM, (r(B, N, D), r(B, N, D), r(B, D), r(B, D), r(B, D), 1e-6, "triton")),
        "attention": (A._attn_op, A._ATTN, (r(B, 5, 3, 2, 8), 0.35, "triton", False)),
        "attention_rope": (A._attn_rope_op, A._ATTN_ROPE, (
            r(B, 5, 3, 2, 8), 0.35, r(N, 4).detach().repeat_interleave(2, 1), r(N, 4).detach().repeat_interleave(2, 1),
            torch.tensor([[4, 0, 6, 2, 1], [3, 6, 0, 5, 2]]),
            r(8), r(8), 1e-6, "triton", False)),
        "rmsnorm_modulate": (Nm._rnm_op, Nm._RNM, (r(B, N, D), r(B, D), r(B, D), r(D), 1e-6, "triton")),
        "residual_rmsnorm_modulate": (
            Nm._rrnm_op, Nm._RRNM, (r(B, N, D), r(B, N, D), r(B, D), r(B, D), r(B, D), r(D), 1e-6, "triton")),
        "swiglu": (S._swiglu_op, S._SWIGLU, (r(B, N, 2 * D), "triton")),
        "dsm_mae_loss": (Lo._loss_op, Lo._LOSS,
                         (r(B, N, 8), r(B, N, 8).detach(), r(B, N, 8).detach(), torch.tensor([0.5, 2.0]), mask, 0.1,
                          0.5, "triton")),
    }


def _run(fn, args):
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    # a weighted sum of every differentiable output (the row statistics and loss terms are not)
    total = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum()
                for o in outs if o.requires_grad)
    total.backward()
    return [o.detach() for o in outs] + [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@needs_triton
@pytest.mark.parametrize("name", list(dispatch.OPS))
def test_eager_function_and_custom_op_agree_bit_for_bit(name):
    op, function, args = _routes()[name]
    traced = _run(op, args)  # the route torch.compile takes
    eager = _run(function.apply, args)  # the route an eager call takes
    assert len(eager) == len(traced)
    assert eager[-1] is not None, f"{name}: no gradient"
    for i, (a, b) in enumerate(zip(eager, traced)):
        assert (a is None) == (b is None), f"{name}: gradient {i} exists on one route only"
        assert a is None or torch.equal(a, b), f"{name}: output/gradient {i} differs between the two routes"


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_compiled_loss_steps_compile_once(backend):
    """A MaskDiT loss + backward, compiled with fullgraph=True, over four steps of new random
    inputs (new ids, sigmas, labels): one compilation, no recompile."""
    from fastmask import EDMPrecond, maskdit

    torch.manual_seed(0)
    net = EDMPrecond(randomise(maskdit("T/2", input_size=8, in_channels=2, num_classes=3), std=0.02))
    compiled_graphs = [0]
    inner = torch._dynamo.lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        compiled_graphs[0] += 1
        return inner(gm, example_inputs)

    net.eval()  # no label dropout drawn inside the model: eager and compiled see the same inputs

    def step(y, labels, sigma, noise, ids_keep):
        loss, _, _ = net.loss_given(y, labels, sigma, noise, ids_keep, check_ids=False)
        return loss.mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counting)
    B, N = 2, 16
    with fastmask.backend(backend), torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(4):
            y, labels, sigma, noise, ids = step_draws(s, B, N)
            loss = compiled(y, labels, sigma, noise, ids)
            loss.backward()
            torch.testing.assert_close(loss, step(y, labels, sigma, noise, ids), rtol=1e-5, atol=1e-6)
    assert compiled_graphs[0] == 1, f"{compiled_graphs[0]} graphs compiled for 4 steps of one shape"
    torch._dynamo.reset()


@needs_triton
def test_an_eager_call_takes_the_autograd_function():
    x, y, g = (torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8), torch.randn(2, 8))
    with fastmask.backend("triton"):
        out = ops.gated_residual(x, y, g)
    assert type(out.grad_fn).__name__ == "GatedResidualBackward", type(out.grad_fn).__name__

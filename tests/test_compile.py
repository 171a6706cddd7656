"""torch.compile(fullgraph=True) of a block, forward and backward, without graph breaks.

fullgraph=True turns any graph break into an error. The custom-op path (Triton backend,
interpreted on the CPU) is traced through register_fake / register_autograd.
"""
import logging

import pytest
import torch

import fastmask
from fastmask import MaskedDiTBlock, ops
from fastmask.ops import dispatch


def _block_and_inputs(seed=0):
    torch.manual_seed(seed)
    blk = MaskedDiTBlock(32, 4, cond_size=24)
    for p in blk.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 12, 32, requires_grad=True)
    c = torch.randn(2, 24)
    ids = ops.random_mask(2, 12, 0.5, generator=torch.Generator().manual_seed(0))[0]
    return blk, x, c, ids


def _run(fn, blk, x, c, ids):
    out = fn(x, c, ids)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in blk.parameters()]
    x.grad = None
    blk.zero_grad()
    return out.detach(), grads


@pytest.mark.parametrize("backend,compiler", [("torch", "inductor"), ("torch", "aot_eager"), ("triton", "aot_eager")])
def test_compiled_block_matches_eager(backend, compiler):
    if backend == "triton" and dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)]):
        pytest.skip(f"Triton backend unavailable here: {dispatch.why_not('triton', 'gather_tokens', [torch.zeros(1)])}")
    blk, x, c, ids = _block_and_inputs()
    torch._dynamo.reset()
    with fastmask.backend(backend):
        want_out, want_grads = _run(lambda x, c, i: blk(x, c, ids_keep=i), blk, x, c, ids)
        compiled = torch.compile(lambda x, c, i: blk(x, c, ids_keep=i), fullgraph=True, backend=compiler)
        got_out, got_grads = _run(compiled, blk, x, c, ids)
    torch.testing.assert_close(got_out, want_out, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _opcheck_cases():
    import importlib

    A, Lo, Nm, T, S = (importlib.import_module(f"fastmask.ops.{m}")
                       for m in ("attention", "loss", "norm", "tokens", "swiglu"))

    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, N, K, D = 2, 7, 3, 8
    ids = ops.random_mask(B, N, 1 - K / N, generator=torch.Generator().manual_seed(1))[0]
    x, xv, vec = r(B, N, D).requires_grad_(), r(B, K, D).requires_grad_(), lambda: r(B, D).requires_grad_()
    mask = ops.mask_from_ids(ids, N)
    return {
        "gather_tokens": (T._gather_op, (x, ids, r(N, D).requires_grad_(), "triton")),
        "unmask_tokens": (T._unmask_op, (xv, ids, r(D).requires_grad_(), N, r(N, D).requires_grad_(), "triton")),
        "scatter_tokens": (T._scatter_op, (xv, ids, r(B, N, D).requires_grad_(), N, "triton")),
        "layernorm_modulate": (Nm._lnm_op, (x, vec(), vec(), 1e-6, "triton")),
        "gated_residual": (Nm._gr_op, (x, r(B, N, D).requires_grad_(), vec(), "triton")),
        "residual_layernorm_modulate": (
            Nm._rlnm_op,
            (x, r(B, N, D).requires_grad_(), vec(), vec(), vec(), 1e-6, "triton"),
        ),
        "attention": (A._attn_op, (r(B, 5, 3, 2, 8).requires_grad_(), 0.35, "triton")),
        "attention_rope": (A._attn_rope_op, (
            r(B, 5, 3, 2, 8).requires_grad_(), 0.35, r(9, 4).repeat_interleave(2, 1), r(9, 4).repeat_interleave(2, 1),
            torch.stack([torch.randperm(9, generator=g)[:5] for _ in range(B)]),  # unsorted ids into 9 positions
            r(8).requires_grad_(), r(8).requires_grad_(), 1e-6, "triton",
        )),
        "rmsnorm_modulate": (Nm._rnm_op, (x, vec(), vec(), r(D).requires_grad_(), 1e-6, "triton")),
        "residual_rmsnorm_modulate": (
            Nm._rrnm_op, (x, r(B, N, D).requires_grad_(), vec(), vec(), vec(), r(D).requires_grad_(), 1e-6, "triton"),
        ),
        "swiglu": (S._swiglu_op, (r(B, N, 2 * D).requires_grad_(), "triton")),
        "dsm_mae_loss": (
            Lo._loss_op,
            (r(B, N, 8).requires_grad_(), r(B, N, 8), r(B, N, 8), torch.tensor([0.5, 2.0]), mask, 0.1, 0.5, "triton"),
        ),
    }


@pytest.mark.parametrize("kind", ["custom_op", "triton_op"])
@pytest.mark.parametrize("name", list(dispatch.OPS))
def test_opcheck_custom_ops(name, kind):
    """torch.library.opcheck: schema, fake (shape/dtype) functions and autograd registration agree
    with the real kernels; for the cuda backend's custom op (run here with the Triton launchers)
    and the Triton backend's triton_op (its fake is its body, run with traced launches)."""
    reason = dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)])
    if reason:
        pytest.skip(f"Triton backend unavailable here: {reason}")
    op, args = _opcheck_cases()[name]
    if kind == "triton_op":
        op = _triton_op_of(op)
        assert op is not _opcheck_cases()[name][0]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def _triton_op_of(custom):
    """The triton_op beside a custom op (the same plain functions, the other entry of its table)."""
    import importlib

    for m in ("attention", "loss", "norm", "tokens", "swiglu"):
        for v in vars(importlib.import_module(f"fastmask.ops.{m}")).values():
            if isinstance(v, dict) and v.get("cuda") is custom:
                return v["triton"]
    raise LookupError(custom)


# ------------------------------------------------------------------ the Triton path under compile
# With the Triton backend, torch.compile calls each op's torch.library.triton_op: AOTAutograd
# traces its body, whose launches go through fastmask.kernels._utils.launch (wrap_triton), so the
# compiled graph holds triton_kernel_wrapper_* calls, not an opaque fastmask:: op.


def _public_cases(device="cpu", dtype=torch.float32):
    """op -> (a function of the public op, its inputs): every op with a Triton backend, tiny."""
    g = torch.Generator().manual_seed(0)

    def r(*s, grad=True, scale=1.0):
        t = (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    B, N, K, D = 2, 7, 3, 8
    ids = ops.random_mask(B, N, 1 - K / N, generator=torch.Generator().manual_seed(1))[0].to(device)
    mask = ops.mask_from_ids(ids, N)
    rope = tuple(r(9, 4, grad=False).repeat_interleave(2, 1) for _ in range(2))
    ids9 = torch.stack([torch.randperm(9, generator=g)[:5] for _ in range(B)]).to(device)
    x = lambda: r(B, N, D)  # noqa: E731
    vec = lambda: r(B, D, scale=0.3)  # noqa: E731
    return {
        "gather_tokens": (lambda x, pos: ops.gather_tokens(x, ids, pos, check_ids=False), (x(), r(N, D))),
        "unmask_tokens": (lambda xv, mt, pos: ops.unmask_tokens(xv, ids, mt, N, pos, check_ids=False),
                          (r(B, K, D), r(D), r(N, D))),
        "scatter_tokens": (lambda xk, fill: ops.scatter_tokens(xk, ids, fill, check_ids=False), (r(B, K, D), x())),
        "layernorm_modulate": (ops.layernorm_modulate, (x(), vec(), vec())),
        "gated_residual": (ops.gated_residual, (x(), x(), vec())),
        "residual_layernorm_modulate": (ops.residual_layernorm_modulate, (x(), x(), vec(), vec(), vec())),
        "rmsnorm_modulate": (ops.rmsnorm_modulate, (x(), vec(), vec(), r(D))),
        "residual_rmsnorm_modulate": (ops.residual_rmsnorm_modulate, (x(), x(), vec(), vec(), vec(), r(D))),
        "attention": (lambda qkv: ops.attention(qkv, deterministic=False), (r(B, 5, 3, 2, 8),)),
        # the deterministic backward's kernel pair (dq, then dk/dv)
        "attention_deterministic": (lambda qkv: ops.attention(qkv, deterministic=True), (r(B, 5, 3, 2, 8),)),
        "attention_rope": (lambda qkv, qw, kw: ops.attention(qkv, rope=rope, ids_keep=ids9, q_norm_weight=qw,
                                                             k_norm_weight=kw),
                           (r(B, 5, 3, 2, 8), r(8), r(8))),
        "swiglu": (ops.swiglu, (r(B, N, 2 * D),)),
        "dsm_mae_loss": (lambda F, xn, y, sigma: ops.dsm_mae_loss(F, xn, y, sigma, mask, check_values=False),
                         (r(B, N, 8), r(B, N, 8, grad=False), r(B, N, 8, grad=False),
                          torch.tensor([0.5, 2.0], device=device, dtype=dtype))),
    }


def _fwd_bwd(fn, inputs):
    """Outputs and the gradients of a fixed weighted sum of them w.r.t. every input that has one."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).reshape(o.shape)).sum() for o in outs)
    total.backward()
    return [o.detach() for o in outs], [t.grad for t in inputs if t.requires_grad]


def _graph_capturing_backend(graphs: list):
    """aot_eager with the forward and backward graphs (after AOTAutograd) kept as code."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        _check_launch_arguments(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _check_launch_arguments(gm):
    """Every kernel launch in the graph names every argument of its kernel: torch builds the
    kernel with exactly the arguments given to read which ones it writes (on a GPU), and takes
    all of them as written when one is missing (a default, say)."""
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.runtime.autotuner import Autotuner

    launches = 0
    for node in gm.graph.nodes:
        if "triton_kernel_wrapper" not in str(node.target):
            continue
        launches += 1
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        given = set(node.kwargs["kwargs"]) | set(kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]))
        while isinstance(kernel, Autotuner):
            given |= set(kernel.configs[0].kwargs)
            kernel = kernel.fn
        missing = [a for a in kernel.arg_names if a not in given]
        assert not missing, f"{kernel.fn.__name__}: launched without {missing}"
    return launches


class _WriteAnalysisFailures(logging.Handler):
    """Collects torch's warnings that it could not read which arguments a kernel writes (it then
    takes every argument as written: clones of all inputs in the compiled graph)."""

    # torch._higher_order_ops.triton_kernel_wrap logs to "torch._dynamo" (torch 2.14); its own name too
    LOGGERS = ("torch._dynamo", "torch._higher_order_ops.triton_kernel_wrap")

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if "assuming every input is mutated" in record.getMessage():
            self.messages.append(f"{record.getMessage()}: {record.exc_info[1] if record.exc_info else ''}"[:600])

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


def _needs_triton():
    reason = dispatch.why_not("triton", "gather_tokens", [torch.zeros(1)])
    if reason:
        pytest.skip(f"Triton backend unavailable here: {reason}")


@pytest.mark.parametrize("name", [*dispatch.OPS, "attention_deterministic"])
def test_compiled_triton_op_launches_the_kernels_and_matches_eager(name, request):
    """Forward and backward of each op compiled (fullgraph, AOTAutograd, graphs run eagerly) with the
    Triton backend equal the eager call, and the graphs hold the kernels, not the opaque op."""
    _needs_triton()
    from fastmask._env import interpreting

    if name in ("attention", "attention_rope", "attention_deterministic") and interpreting():
        # torch reads which arguments a kernel writes from its TTIR, which it cannot build in the
        # interpreter (no GPU target): it then takes every argument as written, and a backward
        # kernel that "writes" forward inputs (the rotary tables, the norm weights, qkv for the
        # deterministic pair, which traced attention backwards run) cannot be partitioned. On a
        # GPU the TTIR is built and only the outputs count as written.
        request.applymarker(pytest.mark.xfail(strict=True, reason="interpreter: no TTIR for the write analysis"))
    fn, inputs = _public_cases()[name]
    graphs = []
    torch._dynamo.reset()
    with fastmask.backend("triton"), _WriteAnalysisFailures() as failures:
        want_out, want_grads = _fwd_bwd(fn, inputs)
        got_out, got_grads = _fwd_bwd(torch.compile(fn, fullgraph=True, backend=_graph_capturing_backend(graphs)),
                                      inputs)
    torch._dynamo.reset()
    if not interpreting():  # torch read every launch's writes from the kernel (only the outputs are cloned)
        assert not failures.messages, failures.messages
    assert len(want_grads) >= 1 and len(got_grads) == len(want_grads)
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 2, f"expected a forward and a backward graph, got {len(graphs)}"
    for kind, code in zip(("forward", "backward"), graphs):
        if name == "dsm_mae_loss" and kind == "backward":  # its backward is PyTorch code (a scaling)
            assert "fastmask" not in code, code
            continue
        assert "triton_kernel_wrapper_functional" in code, f"{name}: no Triton kernel in the {kind} graph:\n{code}"
        assert "torch.ops.fastmask" not in code, f"{name}: the {kind} graph calls an opaque fastmask op:\n{code}"


def test_compiled_training_steps_with_triton_kernels_do_not_recompile():
    """A few training steps of a tiny MaskDiT (loss, backward, optimizer step) with the step's
    loss + backward compiled: one graph, no graph break, no recompilation across steps with new
    noise, masks and labels; the graph launches fastmask's kernels, not opaque ops."""
    _needs_triton()
    from torch._dynamo.utils import counters

    from fastmask import EDMPrecond, maskdit
    from helpers import randomise, step_draws

    torch.manual_seed(0)
    net = EDMPrecond(randomise(maskdit("T/2", input_size=8, in_channels=2, num_classes=3), std=0.02))
    net.eval()  # no label dropout drawn inside the model
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    graphs = []

    def step(y, labels, sigma, noise, ids_keep):
        loss, _, _ = net.loss_given(y, labels, sigma, noise, ids_keep, check_ids=False)
        return loss.mean()

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend=_graph_capturing_backend(graphs))
    B, N = 2, 16
    with fastmask.backend("triton"), torch._dynamo.config.patch(error_on_recompile=True):
        for s in range(3):
            y, labels, sigma, noise, ids = step_draws(s, B, N)
            opt.zero_grad()
            loss = compiled(y, labels, sigma, noise, ids)
            loss.backward()
            opt.step()
            assert torch.isfinite(loss)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len(graphs) == 2, f"{len(graphs)} forward/backward graphs compiled for 3 steps of one shape"
    for code in graphs:
        assert "triton_kernel_wrapper_functional" in code and "torch.ops.fastmask" not in code
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("name", [*dispatch.OPS, "attention_deterministic"])
def test_inductor_compiled_triton_ops_match_eager_bf16(name):
    """On a GPU: each op compiled by Inductor (which launches the kernels from its own code) equals
    the eager Triton call in bf16, forward and backward, at small shapes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    fn, inputs = _public_cases(device="cuda", dtype=torch.bfloat16)[name]
    torch._dynamo.reset()
    with fastmask.backend("triton"), _WriteAnalysisFailures() as failures:
        want_out, want_grads = _fwd_bwd(fn, inputs)
        got_out, got_grads = _fwd_bwd(torch.compile(fn, fullgraph=True, backend="inductor"), inputs)
    torch._dynamo.reset()
    assert not failures.messages, failures.messages  # every launch's writes read from its TTIR
    assert len(got_grads) == len(want_grads) >= 1
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)

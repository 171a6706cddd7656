"""The dispatch point: explicit requests raise with a reason, automatic choice falls back."""
import pytest
import torch

import fastmask
from fastmask import ops
from fastmask.ops import dispatch
from fastmask._env import reload as _reload_env


def test_cpu_default_is_reference():
    x = torch.randn(2, 3, 4)
    assert dispatch.select("layernorm_modulate", x) == "torch"


def test_context_manager_nests_and_per_op():
    with fastmask.backend("triton"):
        assert dispatch.requested("attention") == "triton"
        with fastmask.backend(attention="torch"):
            assert dispatch.requested("attention") == "torch"
            assert dispatch.requested("gather_tokens") == "triton"
        assert dispatch.requested("attention") == "triton"
    assert dispatch.requested("attention") in ("auto", "torch", "triton", "cuda")


def test_env_var(monkeypatch):
    monkeypatch.setenv("FASTMASK_BACKEND", "attention=torch,gather_tokens=cuda")
    _reload_env()  # fastmask reads the environment at import and on reload
    assert dispatch.requested("attention") == "torch" and dispatch.requested("gather_tokens") == "cuda"
    assert dispatch.requested("dsm_mae_loss") == "auto"
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    _reload_env()  # fastmask reads the environment at import and on reload
    assert dispatch.requested("unmask_tokens") == "torch"
    monkeypatch.setenv("FASTMASK_BACKEND", "bogus")
    _reload_env()  # fastmask reads the environment at import and on reload
    with pytest.raises(ValueError, match="FASTMASK_BACKEND"):
        dispatch.requested("attention")


def test_bad_names():
    with pytest.raises(ValueError, match="unknown backend"):
        with fastmask.backend("fast"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with fastmask.backend(softmax="torch"):
            pass


def test_explicit_unavailable_backend_raises_with_reason():
    x = torch.randn(2, 3, 4)
    with fastmask.backend("cuda"):
        with pytest.raises(fastmask.BackendUnavailable, match="cuda.*layernorm_modulate.*CPU|cpu"):
            ops.layernorm_modulate(x, torch.randn(2, 4), torch.randn(2, 4))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    x = torch.randn(2, 3, 4)
    # import the kernels under the interpreter first: triton.jit reads TRITON_INTERPRET when a
    # kernel is defined, and the kernels must stay interpretable for the other tests
    dispatch.not_supported_reasons("triton", "attention", [x])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _reload_env()  # fastmask reads the environment at import and on reload
    assert "TRITON_INTERPRET" in dispatch.why_not("triton", "attention", [x])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _reload_env()  # fastmask reads the environment at import and on reload
    assert dispatch.why_not("triton", "gather_tokens", [x.double()]) is not None  # fp64 is reference-only


def test_available_backends_reports_reasons():
    av = ops.available_backends()
    assert av["torch"] is None and set(av) == {"torch", "triton", "cuda"}
    for name, reason in av.items():
        assert reason is None or isinstance(reason, str) and reason


def test_unsupported_head_dim_falls_back_or_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _reload_env()  # fastmask reads the environment at import and on reload
    qkv = torch.randn(1, 4, 3, 2, 12)  # head dim 12: not a multiple of 8
    reason = dispatch.why_not("triton", "attention", [qkv])
    if reason is None or "head dim" not in reason:
        pytest.skip(f"Triton backend unavailable here: {reason}")
    with fastmask.backend("triton"):
        with pytest.raises(fastmask.BackendUnavailable, match="head dim 12"):
            ops.attention(qkv)
    torch.testing.assert_close(ops.attention(qkv), ops.reference.attention(qkv))  # auto: reference


# ------------------------------------------------------------ declared support, every reason
def _fake(*shape, device="cuda", dtype=torch.float32):
    """A tensor that only describes itself (device, dtype, shape): a CUDA tensor on a machine
    without a GPU, no memory behind it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(*shape, device=device, dtype=dtype)


def _backend_modules():
    from fastmask import cuda_ext

    mods = {"cuda": cuda_ext}
    triton_mod = dispatch._module("triton")
    if isinstance(triton_mod, str):
        pytest.skip(triton_mod)
    mods["triton"] = triton_mod
    return mods


@pytest.mark.parametrize("backend_name", ["triton", "cuda"])
def test_backends_follow_the_protocol(backend_name):
    import inspect

    from fastmask.ops import registry as P

    mod = _backend_modules()[backend_name]
    assert len(P.all_launchers()) == 23 and set(P.launchers("attention")) == {"attention_fwd", "attention_bwd"}
    for op in dispatch.OPS:  # every dispatched op has a forward launcher in the protocol
        assert f"{op}_fwd" in P.all_launchers()
    for name in P.DECLARATIONS:
        assert hasattr(mod, name), f"{mod.__name__} does not declare {name}"
    assert all(isinstance(d, torch.dtype) for d in mod.DTYPES) and all(isinstance(d, str) for d in mod.DEVICE_TYPES)

    def params(sig):
        return [(p.name, p.default) for p in sig.parameters.values()]

    names = []
    for op in dispatch.OPS:
        if hasattr(mod, f"{op}_fwd"):
            names += P.launchers(op)
        else:  # an op left out entirely (CUDA C++ has no attention): the dispatcher says so
            assert not any(hasattr(mod, n) for n in P.launchers(op)), f"{mod.__name__}: {op} half implemented"
            assert any("does not implement" in r for r in dispatch.not_supported_reasons(backend_name, op, []))
    assert len(names) > 8
    for name in names:
        got = params(inspect.signature(getattr(mod, name)))
        assert got == params(P.signature(name)), f"{mod.__name__}.{name}: {got} != {P.signature(name)}"
    got = list(inspect.signature(mod.not_supported_reasons).parameters)
    assert got == ["op", "tensors"], f"{mod.__name__}.not_supported_reasons{got}"


def test_an_op_is_declared_once_and_the_lists_follow():
    from fastmask import info, profiling
    from fastmask.ops import registry

    assert set(registry.OPS) == set(dispatch.OPS)
    for name, decl in registry.OPS.items():
        assert decl.reference is getattr(ops.reference, name), name
        assert profiling._OP_CATEGORY[name] == decl.category
    calls = info.example_calls("T/2", "cpu", torch.float32, 2, 0.5, 8)
    assert {op for op, _, _ in calls} == set(registry.OPS)
    with pytest.raises(ValueError, match="declared twice"):
        registry.declare("attention", reference=ops.reference.attention, launchers=(), category="attention")
    with pytest.raises(ValueError, match="category"):
        registry.declare("new_op", reference=ops.reference.attention, launchers=(), category="nope")


def test_triton_lists_every_reason(monkeypatch):
    dispatch.not_supported_reasons("triton", "attention", [torch.zeros(1)])  # import under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _reload_env()  # fastmask reads the environment at import and on reload
    qkv = torch.zeros(1, 4, 3, 2, 12, dtype=torch.float64)
    reasons = dispatch.not_supported_reasons("triton", "attention", [qkv])
    if len(reasons) == 1 and "cannot be imported" in reasons[0]:
        pytest.skip(reasons[0])
    assert len(reasons) == 3, reasons
    assert "TRITON_INTERPRET" in reasons[0] and "float64" in reasons[1] and "head dim 12" in reasons[2]
    assert dispatch.why_not("triton", "attention", [qkv]) == "; ".join(reasons)
    assert dispatch.not_supported_reasons("torch", "attention", [qkv]) == []


def test_cuda_lists_every_reason(monkeypatch):
    from fastmask import cuda_ext

    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_import_error", "No module named 'fastmask._C'")
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    reasons = dispatch.not_supported_reasons("cuda", "layernorm_modulate", [x])
    assert len(reasons) == 3, reasons
    assert "tensors are on cpu" in reasons[0] and "float64" in reasons[1]
    assert reasons[2] == cuda_ext.unavailable_reason()
    # a CUDA tensor in a supported dtype: only the build state is left
    assert dispatch.not_supported_reasons("cuda", "layernorm_modulate", [_fake(2, 3, 4, dtype=torch.bfloat16)]) == [
        cuda_ext.unavailable_reason()
    ]


def test_explicit_request_lists_every_reason(monkeypatch):
    from fastmask import cuda_ext

    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_import_error", "No module named 'fastmask._C'")
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    v = torch.randn(2, 4, dtype=torch.float64)
    with fastmask.backend("cuda"), pytest.raises(fastmask.BackendUnavailable) as e:
        ops.layernorm_modulate(x, v, v)
    msg = str(e.value)
    for reason in dispatch.not_supported_reasons("cuda", "layernorm_modulate", [x, v, v]):
        assert reason in msg


def test_import_error_is_a_reason(monkeypatch):
    monkeypatch.setitem(dispatch._module_cache, "triton", "triton cannot be imported (ImportError: no triton)")
    assert dispatch.not_supported_reasons("triton", "gather_tokens", [torch.zeros(1)]) == [
        "triton cannot be imported (ImportError: no triton)"
    ]
    assert "no triton" in ops.available_backends()["triton"]


# -------------------------------------------------------------------------- fallback warning
def test_fallback_on_cuda_tensors_warns_once_per_reason(monkeypatch):
    """Auto choice on CUDA tensors (fake ones, so this runs without a GPU): head dim 12 is no
    Triton shape, the CUDA extension has no attention: the reference runs, and says why once."""
    import warnings

    triton_missing = isinstance(dispatch._module("triton"), str)  # imported here under the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine
    _reload_env()  # fastmask reads the environment at import and on reload
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setenv("FASTMASK_BACKEND", "auto")
    _reload_env()  # fastmask reads the environment at import and on reload
    qkv = _fake(1, 4, 3, 2, 12, dtype=torch.bfloat16)
    with pytest.warns(fastmask.ops.BackendFallbackWarning) as rec:
        assert dispatch.select("attention", qkv) == "torch"
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 2, msgs  # one per skipped backend
    assert "triton backend" in msgs[0] and ("head dim 12" in msgs[0] or triton_missing), msgs
    assert "cuda backend" in msgs[1] and "does not implement attention" in msgs[1], msgs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same (op, reason) again: no second warning
        assert dispatch.select("attention", qkv) == "torch"
    if not triton_missing:  # a call Triton serves: chosen without a word
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dispatch.select("layernorm_modulate", _fake(2, 3, 8, dtype=torch.bfloat16)) == "triton"


def test_cpu_tensors_never_warn():
    import warnings

    x = torch.randn(2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.layernorm_modulate(x, torch.randn(2, 4), torch.randn(2, 4))


# ----------------------------------------------------------------- what ran, profiler ranges
def test_record_choices_names_the_backend_that_ran():
    x, v = torch.randn(2, 3, 4), torch.randn(2, 4)
    with ops.record_choices() as ran:
        ops.layernorm_modulate(x, v, v)
        ops.gated_residual(x, x, v)
    assert ran == {"layernorm_modulate": {"torch"}, "gated_residual": {"torch"}}
    ops.layernorm_modulate(x, v, v)  # outside the block: not recorded
    assert ran == {"layernorm_modulate": {"torch"}, "gated_residual": {"torch"}}
    if dispatch.why_not("triton", "layernorm_modulate", [x]) is None:
        with ops.record_choices() as ran, fastmask.backend(layernorm_modulate="triton"):
            ops.layernorm_modulate(x, v, v)
            with ops.record_choices() as inner:
                ops.gated_residual(x, x, v)
        assert ran == {"layernorm_modulate": {"triton"}, "gated_residual": {"torch"}}
        assert inner == {"gated_residual": {"torch"}}


def _range_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("fastmask.")}


def test_op_ranges_name_every_public_op(monkeypatch):
    from fastmask.ops import attention  # imported by name: still counted

    monkeypatch.delenv("FASTMASK_NVTX", raising=False)
    _reload_env()  # fastmask reads the environment at import and on reload
    qkv = torch.randn(1, 4, 3, 2, 8)
    assert _range_names(lambda: attention(qkv)) == set()  # off by default
    with ops.op_ranges():
        assert _range_names(lambda: attention(qkv)) == {"fastmask.op.attention"}
        ids = ops.random_mask(1, 4, 0.5)[0]
        assert _range_names(lambda: ops.gather_tokens(qkv[:, :, 0, 0], ids)) == {"fastmask.op.gather_tokens"}
    assert _range_names(lambda: attention(qkv)) == set()
    monkeypatch.setenv("FASTMASK_NVTX", "1")  # the block's switch, read at call time
    _reload_env()  # fastmask reads the environment at import and on reload
    assert _range_names(lambda: attention(qkv)) == {"fastmask.op.attention"}
    from fastmask import profiling

    monkeypatch.setenv("FASTMASK_NVTX", "0")
    _reload_env()  # fastmask reads the environment at import and on reload
    with profiling.op_ranges():
        assert _range_names(lambda: attention(qkv)) == {"fastmask.op.attention"}


def test_block_stage_ranges_follow_the_switch_at_call_time(monkeypatch):
    blk = fastmask.MaskedDiTBlock(16, 2)
    x, c = torch.randn(1, 4, 16), torch.randn(1, 16)
    monkeypatch.setenv("FASTMASK_NVTX", "0")
    _reload_env()  # fastmask reads the environment at import and on reload
    assert _range_names(lambda: blk(x, c)) == set()
    monkeypatch.setenv("FASTMASK_NVTX", "1")
    _reload_env()  # fastmask reads the environment at import and on reload
    names = _range_names(lambda: blk(x, c))
    assert {"fastmask.block.attention", "fastmask.block.mlp", "fastmask.op.attention"} <= names

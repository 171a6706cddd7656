"""The dispatch point: explicit requests raise with a reason, automatic choice falls back."""
import pytest
import torch

import fastmask
from fastmask import ops
from fastmask.ops import dispatch


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
    assert dispatch.requested("attention") == "torch" and dispatch.requested("gather_tokens") == "cuda"
    assert dispatch.requested("dsm_mae_loss") == "auto"
    monkeypatch.setenv("FASTMASK_BACKEND", "torch")
    assert dispatch.requested("unmask_tokens") == "torch"
    monkeypatch.setenv("FASTMASK_BACKEND", "bogus")
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
    assert "TRITON_INTERPRET" in dispatch.why_not("triton", "attention", [x])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.why_not("triton", "gather_tokens", [x.double()]) is not None  # fp64 is reference-only


def test_available_backends_reports_reasons():
    av = ops.available_backends()
    assert av["torch"] is None and set(av) == {"torch", "triton", "cuda"}
    for name, reason in av.items():
        assert reason is None or isinstance(reason, str) and reason


def test_unsupported_head_dim_falls_back_or_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qkv = torch.randn(1, 4, 3, 2, 12)  # head dim 12: not a multiple of 8
    reason = dispatch.why_not("triton", "attention", [qkv])
    if reason is None or "head dim" not in reason:
        pytest.skip(f"Triton backend unavailable here: {reason}")
    with fastmask.backend("triton"):
        with pytest.raises(fastmask.BackendUnavailable, match="head dim 12"):
            ops.attention(qkv)
    torch.testing.assert_close(ops.attention(qkv), ops.reference.attention(qkv))  # auto: reference

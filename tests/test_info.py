"""``fastmask info``: versions, backends, and the backend each op of a model takes, without a GPU."""
import pytest
import torch

from fastmask import cli, info
from fastmask.ops import dispatch
from fastmask._env import reload as _reload_env


@pytest.fixture
def no_interpreter(monkeypatch):
    """As on a machine without TRITON_INTERPRET; the kernels are imported under the interpreter
    first (triton.jit reads it when a kernel is defined), so the other tests keep working."""
    dispatch._module("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _reload_env()  # fastmask reads the environment at import and on reload
    monkeypatch.delenv("FASTMASK_BACKEND", raising=False)
    _reload_env()  # fastmask reads the environment at import and on reload


def _run(capsys, *argv):
    rc = cli.main(["info", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cpu_names_why_triton_and_cuda_are_not_used(capsys, no_interpreter):
    rc, out, _ = _run(capsys, "--device", "cpu")
    assert rc == 0
    assert f"torch {torch.__version__}" in out and "fastmask " in out
    for name in ("torch", "triton", "cuda"):
        assert f"  {name} " in out
    plan = out[out.index("the backend each op takes"):]
    for op in dispatch.OPS:
        assert f"  {op} " in plan and plan.count(f"  {op} ") in (1, 2)
    # 7 ops, 4 of them in the encoder and the decoder; 4 modern-block ops; TREAD's put-back
    assert plan.count("-> torch") == 16
    assert "triton: tensors are on the CPU and TRITON_INTERPRET=1 is not set" in plan
    assert "cuda: tensors are on cpu, the CUDA extension runs on CUDA devices" in plan
    assert "cuda: backend 'cuda' does not implement attention" in plan
    assert "head dim 72" in plan and "head dim 32" in plan  # XL/2: encoder 1152/16, decoder 512/16


def test_cuda_device_plan_without_a_gpu(capsys, no_interpreter):
    if isinstance(dispatch._module("triton"), str):
        pytest.skip(dispatch._module("triton"))
    rc, out, _ = _run(capsys, "--device", "cuda", "--model", "S/2", "--dtype", "fp16", "--batch", "8")
    assert rc == 0
    plan = out[out.index("the backend each op takes"):]
    assert "fp16 on cuda" in out and plan.count("-> triton") == 16
    assert "torch: runs every call" in plan
    assert "qkv [8, 128, 3, 6, 64]" in plan  # S/2: 384 wide, 6 heads, 128 of 256 tokens kept


def test_explicit_request_that_cannot_run_is_shown(capsys, no_interpreter, monkeypatch):
    monkeypatch.setenv("FASTMASK_BACKEND", "cuda")
    _reload_env()  # fastmask reads the environment at import and on reload
    rc, out, _ = _run(capsys, "--device", "cpu", "--model", "T/2")
    assert rc == 0
    assert "FASTMASK_BACKEND=cuda" in out
    assert out.count("-> ERROR: fastmask: backend 'cuda' was requested") == 16


def test_example_tensors_have_real_shapes_and_no_memory():
    calls = info.example_calls("XL/2", "cuda", torch.bfloat16, 256, 0.5, 32)
    qkv = [ts[0] for op, label, ts in calls if op == "attention"]
    assert [tuple(t.shape) for t in qkv] == [(256, 128, 3, 16, 72), (256, 256, 3, 16, 32)]
    for _, _, ts in calls:
        for t in ts:
            assert t.device.type == "cuda" and type(t).__name__ == "FakeTensor"
    assert {op for op, _, _ in calls} == set(dispatch.OPS)


@pytest.mark.parametrize(
    "argv,flag",
    [(["--model", "Q/2"], "--model"), (["--device", "tpu"], "--device"), (["--batch", "0"], "--batch"),
     (["--input-size", "33"], "--input-size"), (["--mask-ratio", "1.5"], "--mask-ratio")],
)
def test_bad_flags_are_one_line(capsys, argv, flag):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err


def test_help_is_wired(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "--help"])
    assert e.value.code == 0 and "--mask-ratio" in capsys.readouterr().out


def test_flops_per_image_of_every_family(capsys, no_interpreter):
    """Each registered family's FLOPs per image at the model config, against dense DiT: TREAD at
    rate 0.5 below it. (S/2's MaskDiT is above it: the published 8 x 512 decoder on all tokens
    outweighs half of S's 12 x 384 encoder.)"""
    from fastmask.models import ARCHITECTURES

    rc, out, _ = _run(capsys, "--device", "cpu", "--model", "S/2")
    assert rc == 0
    part = out[out.index("FLOPs per image of a training step"):]
    rows = {ln.split()[0]: ln for ln in part.splitlines()[1:] if ln.strip()}
    assert set(rows) == set(ARCHITECTURES)
    assert "1.00x dit" in rows["dit"]

    def vs_dit(row):
        return float(row.split("x dit")[0].rsplit(" ", 1)[1])

    assert vs_dit(rows["tread"]) < 1.0 < vs_dit(rows["maskdit"])

"""The trainer's step as one CUDA graph (fastmask.step_graph): on the CPU in the emulation mode
(capture records the step, replay re-runs it on the static buffers), equal to the eager step bit
for bit over warm-up, EMA, a K-changing schedule, the phase switch and a resume; on a GPU, the
real capture against eager."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import _all_state, _assert_bit_equal, tiny_cfg  # noqa: E402

from fastmask import step_graph  # noqa: E402
from fastmask.checkpoint_io import load_checkpoint  # noqa: E402
from fastmask.presets import TrainConfig  # noqa: E402
from fastmask.train import Trainer, train  # noqa: E402

# warm-up (lr), EMA, a linear ratio schedule 0.75 -> 0.625 over 16 tokens (K = 4 for steps 0-4,
# 5 for 5-8, 6 at 9: three shape keys), grad clipping, then the unmasked phase 2 (a fourth key,
# beyond the cache of three: eager)
SCHED = dict(steps=10, finetune_steps=3, warmup_steps=3, mask_ratio=0.75, mask_ratio_end=0.625,
             mask_schedule="linear", grad_clip=0.5, log_every=4)


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setattr(step_graph, "CPU_EMULATION", True)


def _counting(monkeypatch):
    seen = []
    real = step_graph.StepGraphs.run

    def run(self, key, fn, inputs):
        what = real(self, key, fn, inputs)
        seen.append((key, what))
        return what

    monkeypatch.setattr(step_graph.StepGraphs, "run", run)
    return seen


def test_graphed_step_equals_eager_bit_for_bit(tmp_path, emulate, monkeypatch):
    eager = train(tiny_cfg(tmp_path / "e", cuda_graph=False, **SCHED), progress=False)
    assert eager.summary()["step_graph"] == "off: cuda_graph is off in the config"
    seen = _counting(monkeypatch)
    graphed = train(tiny_cfg(tmp_path / "g", **SCHED), progress=False)
    assert graphed.summary()["step_graph"] == "on"
    whats = [w for _, w in seen]
    assert whats == ["warmup", "capture", "replay", "replay", "replay", "warmup", "capture", "replay", "replay",
                     "warmup", "eager", "eager", "eager"], seen
    assert [k[1] for k, _ in seen] == [(8, 4)] * 5 + [(8, 5)] * 4 + [(8, 6)] + [None] * 3
    _assert_bit_equal(_all_state(eager), _all_state(graphed))
    log_e = (tmp_path / "e" / "log.jsonl").read_text().splitlines()
    log_g = (tmp_path / "g" / "log.jsonl").read_text().splitlines()
    loss = lambda lines: [l.split('"loss": ')[1].split(",")[0] for l in lines if '"loss": ' in l]  # noqa: E731
    assert loss(log_e) == loss(log_g) and loss(log_e)


def test_replay_reads_the_new_inputs(tmp_path, emulate, monkeypatch):
    """A replay that ignored the copied-in inputs (stale buffers) would repeat the old step."""
    g = step_graph.StepGraphs("cpu", max_graphs=1)
    out = []
    fn = lambda x: out.append(x.clone())  # noqa: E731
    assert [g.run("k", fn, {"x": torch.full((2,), float(i))}) for i in range(4)] == \
        ["warmup", "capture", "replay", "replay"]
    assert [o[0].item() for o in out] == [0.0, 1.0, 2.0, 3.0]
    assert g.run("other", fn, {"x": torch.ones(3)}) == "eager"  # beyond the cache
    with pytest.raises(ValueError, match="x: a different shape"):
        g.run("k", fn, {"x": torch.ones(3)})


def test_graphed_resume_is_exact(tmp_path, emulate):
    full = train(tiny_cfg(tmp_path / "full", **SCHED), progress=False)

    def stop_at_6(trainer, step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "split", **SCHED), hooks={"after_step": stop_at_6}, progress=False)
    assert load_checkpoint(tmp_path / "split")["step"] == 6
    resumed = train(tiny_cfg(tmp_path / "split", **SCHED), resume=tmp_path / "split", progress=False)
    assert resumed.step == full.step
    _assert_bit_equal(_all_state(full), _all_state(resumed))


def test_whole_step_reads_nothing_back(tmp_path, emulate, monkeypatch):
    """What a graph captures must not read device values on the host (item, bool, ...)."""
    real = Trainer._whole_step
    names = ("item", "__bool__", "__int__", "__float__", "tolist", "numpy")

    orig = {n: getattr(torch.Tensor, n) for n in names}

    def fail(n):
        def f(*a, **k):
            raise AssertionError(f"sync: Tensor.{n}")
        return f

    def guarded(self, **inputs):
        step = self.opt.step

        def opt_step():  # the CPU's AdamW reads its step count; on CUDA it is fused and capturable
            for n in names:
                setattr(torch.Tensor, n, orig[n])
            try:
                return step()
            finally:
                for n in names:
                    setattr(torch.Tensor, n, fail(n))

        self.opt.step = opt_step
        for n in names:
            setattr(torch.Tensor, n, fail(n))
        try:
            return real(self, **inputs)
        finally:
            for n in names:
                setattr(torch.Tensor, n, orig[n])
            del self.opt.step

    monkeypatch.setattr(Trainer, "_whole_step", guarded)
    tr = train(tiny_cfg(tmp_path / "s", **SCHED), progress=False)
    assert tr.step == 13


def test_graph_off_reasons(tmp_path, emulate):
    tr = Trainer(tiny_cfg(tmp_path / "h", steps=1, finetune_steps=0), hooks={"loss": lambda s, l: l})
    try:
        assert tr.summary()["step_graph"] == "off: a 'loss' hook is set (it runs Python per step)"
    finally:
        tr.close()


def test_cpu_without_emulation_is_eager(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path / "c", steps=1, finetune_steps=0))
    try:
        assert tr.summary()["step_graph"] == "off: the device is cpu, not CUDA"
    finally:
        tr.close()


def test_cuda_graph_config_key():
    cfg = TrainConfig()
    assert cfg.cuda_graph is True
    cfg.cuda_graph = "yes"
    with pytest.raises(ValueError, match="cuda_graph"):
        cfg.validate()


@pytest.mark.gpu
def test_cuda_graphed_step_matches_eager_on_gpu(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = dict(SCHED, device="cuda", amp="bf16")
    eager = train(tiny_cfg(tmp_path / "e", cuda_graph=False, **cfg), progress=False)
    seen = _counting(monkeypatch)
    real = Trainer._train_step

    def strict(self, phase):  # no synchronising call in a step
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, phase)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "_train_step", strict)
    graphed = train(tiny_cfg(tmp_path / "g", **cfg), progress=False)
    assert graphed.summary()["step_graph"] == "on" and "replay" in [w for _, w in seen]
    a, b = _all_state(eager), _all_state(graphed)
    for k in a:  # the same kernels in the same order: expected equal; tolerate atomics' order
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_ema_with_a_device_weight_reads_nothing_back(tmp_path, monkeypatch):
    """On CUDA the EMA weight is a 0-d device tensor: it must not be read as a number (a sync,
    and in a capture a constant)."""
    tr = Trainer(tiny_cfg(tmp_path / "m", steps=1, finetune_steps=0))
    try:
        with torch.no_grad():
            for p in tr.net.parameters():
                p.add_(1.0)
        e0 = [p.clone() for p in tr.ema.parameters()]
        tr._update_ema(0.25)
        want = [p.clone() for p in tr.ema.parameters()]
        with torch.no_grad():
            for p, q in zip(tr.ema.parameters(), e0):
                p.copy_(q)
        from torch.utils._python_dispatch import TorchDispatchMode

        class Ops(TorchDispatchMode):
            seen = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.seen.append(str(func))
                return func(*args, **(kwargs or {}))

        with Ops():
            tr._update_ema(torch.tensor(0.25))
        # a lone 0-d tensor would bind to the Scalar overload: read on the host in C++
        assert Ops.seen and not any(op.endswith(".Scalar") for op in Ops.seen), Ops.seen
        for p, q in zip(tr.ema.parameters(), want):
            assert torch.equal(p, q)
    finally:
        tr.close()


def test_a_device_lr_is_saved_as_its_value(tmp_path):
    # the fused, capturable AdamW of CUDA runs holds its lr as a tensor; a checkpoint stores the number
    from fastmask.checkpoint_io import load_checkpoint, save_checkpoint

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=torch.tensor(2.5e-4), foreach=False)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(tmp_path, model=net, ema=None, optimizer=opt, step=1, config={})
    groups = load_checkpoint(path)["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(2.5e-4) and isinstance(groups[0]["lr"], float)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the optimizer's own is untouched

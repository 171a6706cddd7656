"""The training step as one CUDA graph (fastmask.step_graph.StepGraph in the trainer).

On the CPU the graph is emulated (capture records the step function, a replay runs it again on
the same static buffers): the graphed trainer must equal the eager one bit for bit, through an
lr warm-up, the EMA, grad clipping, a mask-ratio schedule that changes the kept-token count K,
the fine-tune at ratio 0, a full graph cache and a resume in the middle. On a GPU the real
graph is captured and compared with eager steps, and a replayed step must not sync."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import _all_state, _assert_bit_equal, tiny_cfg  # noqa: E402

from fastmask.step_graph import StepGraph  # noqa: E402
from fastmask.train import Trainer, train  # noqa: E402


def _events(out, name):
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == name]


# --------------------------------------------------------------------------- the helper
def test_step_graph_warms_up_captures_once_and_replays_on_the_static_buffers():
    g = StepGraph("emulate", warmup=2, max_graphs=2)
    seen = []
    x = torch.zeros(3)

    def fn_for(bufs):
        return lambda: seen.append(bufs["x"].clone())

    kinds = []
    for i in range(5):
        bufs = g.inputs(("a", 3), x=x + i, none=None)
        kinds.append(g.run(("a", 3), fn_for(bufs)))
    assert kinds == ["warmup", "warmup", "capture", "replay", "replay"]
    assert [int(s[0]) for s in seen] == [0, 1, 2, 3, 4]  # each run read that step's values
    assert g.captures == 1 and g.replays == 3
    # a second key gets its own buffers; a third finds the cache full
    g.inputs(("b", 2), x=torch.ones(2), none=None)
    assert g.has_room(("b", 2)) and not g.has_room(("c", 1)) and g.has_room(("a", 3))
    with pytest.raises(ValueError, match="all 2 graphs are taken"):
        g.inputs(("c", 1), x=torch.ones(1), none=None)
    with pytest.raises(ValueError, match=r"x: expected \(\(3,\), torch.float32\)"):
        g.inputs(("a", 3), x=torch.ones(4), none=None)
    with pytest.raises(ValueError, match="none: expected None"):
        g.inputs(("a", 3), x=x, none=torch.ones(1))
    with pytest.raises(ValueError, match="fill the inputs"):
        g.run(("d", 1), lambda: None)
    with pytest.raises(ValueError, match="mode: expected one of"):
        StepGraph("cpu")
    with pytest.raises(ValueError, match="warmup: expected at least 1"):
        StepGraph("emulate", warmup=0)


# --------------------------------------------------------------------------- the trainer, emulated
def _run(out, step_graph, resume=None, **kw):
    return train(tiny_cfg(out, **kw), progress=False, step_graph=step_graph, resume=resume)


def test_graphed_steps_equal_eager_steps_bit_for_bit(tmp_path):
    # warm-up of the lr, EMA with warm-up, clipping, a linear mask schedule (K = 12, 11, 10, 9, 8,
    # about 5 steps each) and the fine-tune at ratio 0 (K = None): more shapes than the graph
    # cache holds, so the last two run eagerly after graphed ones
    cfg = dict(steps=24, finetune_steps=5, warmup_steps=4, ema_warmup=True, grad_clip=0.5, mask_ratio=0.25,
               mask_ratio_end=0.5, mask_schedule="linear", log_every=3)
    eager = _run(tmp_path / "e", None, **cfg)
    graphed = _run(tmp_path / "g", "emulate", **cfg)
    _assert_bit_equal(_all_state(eager), _all_state(graphed))
    g = graphed._graph
    assert g is not None and eager._graph is None
    # four shapes took the cache (K = 12 lasted only its two warm-up steps), then steps ran eagerly
    assert len(g._buffers) == 4 and g.captures == 3 and g.replays > 0
    assert len(_events(tmp_path / "g", "step_graph_full")) == 1  # said once
    assert _events(tmp_path / "e", "step_graph") == [{"event": "step_graph", "graphed": False,
                                                      "why": "the device is cpu, not CUDA"}]
    # the log rows (loss sums read from the device) are the same too
    rows = lambda out: [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["loss"] for r in rows(tmp_path / "e")] == [r["loss"] for r in rows(tmp_path / "g")]


def test_constant_ratio_replays_one_graph_and_resumes_exactly(tmp_path):
    cfg = dict(steps=10, finetune_steps=4, log_every=2, ckpt_every=4, keep_checkpoints=5)
    whole = _run(tmp_path / "w", "emulate", **cfg)
    assert whole._graph.captures == 2  # phase 1 at K = 8, phase 2 at ratio 0
    assert whole._graph.replays == (10 - 2) + (4 - 2)  # all steps after two warm-ups per shape
    eager = _run(tmp_path / "e", None, **cfg)
    _assert_bit_equal(_all_state(eager), _all_state(whole))
    # stop after 6 steps (a checkpoint at 4), resume from it in a fresh process-like trainer
    _run(tmp_path / "r", "emulate", **{**cfg, "steps": 6, "finetune_steps": 0})
    ck = tmp_path / "r" / "checkpoints" / "ckpt-0000004.safetensors"
    resumed = _run(tmp_path / "r2", "emulate", resume=ck, **cfg)
    _assert_bit_equal(_all_state(whole), _all_state(resumed))


def test_what_a_graph_reads_and_writes_keeps_its_storage(tmp_path):
    # a captured graph holds addresses: the running state, weights and optimizer state must be
    # updated in place, never replaced (the emulation alone would not notice a replacement)
    tr = Trainer(tiny_cfg(tmp_path / "p", steps=6, finetune_steps=0, log_every=2, grad_clip=1.0), progress=False,
                 step_graph="emulate")
    try:
        names = ("_acc", "_bad", "_bad_val", "_step_t", "_ema_w")
        before = {n: getattr(tr, n).data_ptr() for n in names}
        weights = [p.data_ptr() for p in [*tr.net.parameters(), *tr.ema.parameters()]]
        seen = {}

        def record(trainer, step):
            if step == 3:  # after the capture (two warm-up steps, then the capture's own replay)
                seen.update({id(t): t.data_ptr() for st in trainer.opt.state.values() for t in st.values()})

        tr.hooks["after_step"] = record
        tr.run()
        assert tr._graph.captures == 1 and tr._graph.replays == 4
        assert {n: getattr(tr, n).data_ptr() for n in names} == before
        assert [p.data_ptr() for p in [*tr.net.parameters(), *tr.ema.parameters()]] == weights
        now = {id(t): t.data_ptr() for st in tr.opt.state.values() for t in st.values()}
        assert seen and now == seen
    finally:
        tr.close()


def test_a_failed_capture_leaves_that_shape_eager_and_the_run_exact(tmp_path, monkeypatch):
    def refuse(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(StepGraph, "_capture", refuse)
    cfg = dict(steps=6, finetune_steps=0, log_every=3)
    graphed = _run(tmp_path / "g", "emulate", **cfg)
    eager = _run(tmp_path / "e", None, **cfg)
    _assert_bit_equal(_all_state(eager), _all_state(graphed))
    assert graphed.step == 6 and graphed._graph.captures == 0
    ev = _events(tmp_path / "g", "step_graph_failed")
    assert len(ev) == 1 and ev[0]["step"] == 2 and ev[0]["why"] == (
        "RuntimeError: operation not permitted when stream is capturing")


def test_nonfinite_loss_in_a_graphed_step_is_found_and_named(tmp_path):
    # a loss hook runs Python every step: such a run falls back to eager steps, saying why
    cfg = tiny_cfg(tmp_path / "h", steps=4, finetune_steps=0)
    tr = Trainer(cfg, hooks={"loss": lambda s, l: l}, progress=False, step_graph="emulate")
    try:
        assert tr._graph is None
        assert _events(tmp_path / "h", "step_graph")[-1]["why"].startswith("a loss hook")
    finally:
        tr.close()
    # poison a weight: the graphed step's on-device flag records the first non-finite step
    from fastmask.train import NonFiniteLossError

    tr = Trainer(tiny_cfg(tmp_path / "n", steps=8, finetune_steps=0, log_every=8), progress=False,
                 step_graph="emulate")
    try:
        def poison(trainer, step):
            if step == 5:
                with torch.no_grad():
                    next(trainer.net.parameters()).fill_(float("nan"))

        tr.hooks["after_step"] = poison
        with pytest.raises(NonFiniteLossError, match=r"at step 5 \(phase 1"):
            tr.run()
        assert tr._graph.replays >= 2
    finally:
        tr.close()


def test_cuda_graph_switch_is_a_checked_config_key(tmp_path):
    from fastmask.errors import UsageError

    cfg = tiny_cfg(tmp_path / "s", cuda_graph="yes")
    with pytest.raises(UsageError, match="cuda_graph"):
        cfg.validate()


# --------------------------------------------------------------------------- the real graph
@pytest.mark.gpu
def test_captured_step_matches_eager_and_replays_without_a_sync(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = dict(steps=8, finetune_steps=3, log_every=4, device="cuda", amp="fp32", grad_clip=1.0, ema_warmup=True)
    eager = train(tiny_cfg(tmp_path / "e", cuda_graph=False, **cfg), progress=False)
    assert eager._graph is None
    real = Trainer._graph_step
    kinds = []

    def strict(self, key, phase, **inputs):
        if self._graph._graphs.get(key) is None:  # warm-up and capture may sync
            return real(self, key, phase, **inputs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            kinds.append(key)
            return real(self, key, phase, **inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    Trainer._graph_step = strict
    try:
        graphed = train(tiny_cfg(tmp_path / "g", **cfg), progress=False)
    finally:
        Trainer._graph_step = real
    assert graphed._graph is not None and graphed._graph.captures == 2 and len(kinds) == (8 - 3) + (3 - 3)
    a, b = _all_state(eager), _all_state(graphed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # capturable AdamW keeps its step count on the device, counted by the replays
    steps = [st["step"] for st in graphed.opt.state_dict()["state"].values()]
    assert all(t.device.type == "cuda" for t in steps) and max(int(t.item()) for t in steps) == 11


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

"""Training loop: loss, schedules, EMA, exact resume, Ctrl-C, NaN stop, atomic checkpoints."""
import json
import os
import signal

import pytest
import torch

from fastmask.checkpoint_io import (
    atomic_write_bytes,
    load_checkpoint,
    resolve,
    save_checkpoint,
)
from fastmask.presets import TrainConfig, get_preset
from fastmask.train import (
    NonFiniteLossError,
    Trainer,
    ema_decay_at,
    lr_at,
    mask_ratio_at,
    step_randomness,
    train,
)


def tiny_cfg(out, **kw) -> TrainConfig:
    """T/2 on the 8x8 digits (16 tokens), batch 8: a step takes milliseconds."""
    cfg = get_preset("digits")
    base = dict(
        model="T/2", image_size=8, batch_size=8, steps=12, minutes=None, finetune_steps=8, finetune_minutes=None,
        lr=1e-3, warmup_steps=3, ema_decay=0.9, ckpt_every=0, log_every=4, out=str(out), evaluate=False,
        device="cpu", threads=1,
    )
    for k, v in {**base, **kw}.items():
        setattr(cfg, k, v)
    return cfg


def _all_state(tr: Trainer) -> dict:
    out = {f"model.{k}": v for k, v in tr.net.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in tr.ema.state_dict().items()})
    for i, st in tr.opt.state_dict()["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


def _assert_bit_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:5]}"


def test_schedules():
    cfg = TrainConfig(steps=101, mask_ratio=0.75, mask_ratio_end=0.25, mask_schedule="linear", lr=2e-4,
                      warmup_steps=10)
    assert mask_ratio_at(cfg, 0, 1) == 0.75 and mask_ratio_at(cfg, 100, 1) == 0.25
    assert abs(mask_ratio_at(cfg, 50, 1) - 0.5) < 1e-12
    cfg.mask_schedule = "cosine"
    assert abs(mask_ratio_at(cfg, 0, 1) - 0.75) < 1e-12 and abs(mask_ratio_at(cfg, 100, 1) - 0.25) < 1e-12
    assert mask_ratio_at(cfg, 25, 1) > 0.5 + 0.1  # cosine stays high longer than linear
    assert mask_ratio_at(cfg, 7, 2) == 0.0  # the fine-tune is unmasked
    assert lr_at(cfg, 0, 1) == pytest.approx(2e-5) and lr_at(cfg, 50, 1) == 2e-4
    assert lr_at(cfg, 200, 2) == pytest.approx(1e-4)  # fine-tune lr defaults to lr / 2


def test_step_randomness_label_dropout_and_slicing():
    r = step_randomness(0, 3, 4000, (1, 2, 2), 16, 0.5, 0.1, False, "cpu")
    assert abs(r["drop"].float().mean().item() - 0.1) < 0.02
    assert r["ids_keep"].shape == (4000, 8) and r["eps"] is None
    again = step_randomness(0, 3, 4000, (1, 2, 2), 16, 0.5, 0.1, False, "cpu")
    assert torch.equal(r["noise"], again["noise"]) and torch.equal(r["ids_keep"], again["ids_keep"])
    other = step_randomness(0, 4, 4000, (1, 2, 2), 16, 0.5, 0.1, False, "cpu")
    assert not torch.equal(r["sigma"], other["sigma"])


def test_training_learns_and_is_deterministic(tmp_path):
    a = train(tiny_cfg(tmp_path / "a"), progress=False)
    b = train(tiny_cfg(tmp_path / "b"), progress=False)
    _assert_bit_equal(_all_state(a), _all_state(b))
    rows = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(map(lambda v: v == v, losses)) and len(losses) == 5
    assert {r["phase"] for r in rows if "loss" in r} == {1, 2}
    s = a.summary()
    assert s["phase1_steps"] == 12 and s["phase2_steps"] == 8 and resolve(tmp_path / "a").name == "ckpt-0000020.safetensors"
    # EMA: one more update moves it towards the weights by 1 - decay; warm-up: (1 + t) / (10 + t)
    assert ema_decay_at(a.cfg, 20) == pytest.approx(21 / 30)
    assert ema_decay_at(a.cfg, 10_000) == 0.9
    e0 = [p.clone() for p in a.ema.parameters()]
    a._update_ema()
    for e, p, q in zip(e0, a.net.parameters(), a.ema.parameters()):
        torch.testing.assert_close(q, e + (1 - 21 / 30) * (p - e))


def test_resume_is_bit_exact_across_the_phase_switch(tmp_path):
    full = train(tiny_cfg(tmp_path / "full"), progress=False)

    def stop_at_10(trainer, step):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "split"), hooks={"after_step": stop_at_10}, progress=False)
    ck = load_checkpoint(tmp_path / "split")
    assert ck["step"] == 10 and ck["extra"]["phase1_end"] is None
    resumed = train(tiny_cfg(tmp_path / "split"), resume=tmp_path / "split", progress=False)
    assert resumed.step == 20
    _assert_bit_equal(_all_state(full), _all_state(resumed))


def test_sigint_finishes_the_step_and_saves(tmp_path):
    def ctrl_c(trainer, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    prev = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "r"), hooks={"after_step": ctrl_c}, progress=False)
    assert signal.getsignal(signal.SIGINT) is prev  # handler restored
    ck = load_checkpoint(tmp_path / "r")
    assert ck["step"] == 3  # the Ctrl-C during step 3 is honoured at the next step boundary
    # and that checkpoint resumes to the same result as an uninterrupted run
    resumed = train(tiny_cfg(tmp_path / "r"), resume=ck["path"], progress=False)
    full = train(tiny_cfg(tmp_path / "f"), progress=False)
    _assert_bit_equal(_all_state(full), _all_state(resumed))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    def poison(step, loss):
        return loss * float("nan") if step == 7 else loss

    with pytest.raises(NonFiniteLossError, match=r"at step 7.*ckpt-0000005") as e:
        train(tiny_cfg(tmp_path / "n", ckpt_every=5), hooks={"loss": poison}, progress=False)
    assert "nan" in str(e.value)
    files = sorted(p.name for p in (tmp_path / "n" / "checkpoints").glob("ckpt-*"))
    assert files == ["ckpt-0000005.safetensors"]
    ck = load_checkpoint(tmp_path / "n")
    assert ck["step"] == 5 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_time_budget_stops_phase_one(tmp_path):
    tr = train(tiny_cfg(tmp_path / "t", steps=None, minutes=1e-9, finetune_steps=2), progress=False)
    s = tr.summary()
    assert s["phase1_steps"] <= 1 and s["phase2_steps"] == 2


def test_unmasked_and_schedule_configs_run(tmp_path):
    train(tiny_cfg(tmp_path / "u", mask_ratio=0.0, finetune_steps=0, steps=3), progress=False)
    train(tiny_cfg(tmp_path / "s", mask_schedule="cosine", mask_ratio=0.75, mask_ratio_end=0.0, steps=4,
                   finetune_steps=1, grad_clip=0.5), progress=False)
    train(tiny_cfg(tmp_path / "d", arch="dit", mask_ratio=0.0, steps=2, finetune_steps=0), progress=False)


def test_latent_training_draws_the_posterior(tmp_path):
    import numpy as np

    m = np.random.default_rng(0).standard_normal((20, 8, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "lat.npz", moments=m, labels=np.arange(20) % 3)
    cfg = tiny_cfg(tmp_path / "l", data="latents", data_path=str(tmp_path / "lat.npz"), channels=4, steps=3,
                   finetune_steps=1)
    tr = train(cfg, progress=False)
    assert tr.num_classes == 3 and tr.summary()["steps"] == 4


def test_checkpoint_roundtrip_and_atomic_write(tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    import copy

    p = save_checkpoint(tmp_path, model=net, ema=copy.deepcopy(net), optimizer=opt, step=7, config={"a": 1}, extra={"b": [1, 2]})
    ck = load_checkpoint(tmp_path)
    assert ck["path"] == p and ck["step"] == 7 and ck["config"] == {"a": 1} and ck["extra"] == {"b": [1, 2]}
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-2)
    opt2.load_state_dict(ck["optimizer"])
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k]))
    # a failing write leaves the old file intact and no temporary file behind
    before = p.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(p, b"garbage")
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


def test_keep_checkpoints(tmp_path):
    tr = train(tiny_cfg(tmp_path / "k", ckpt_every=3, keep_checkpoints=2), progress=False)
    files = sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("ckpt-*"))
    assert files == ["ckpt-0000018.safetensors", "ckpt-0000020.safetensors"] and tr.step == 20


@pytest.mark.parametrize("arch", ["maskdit", "dit"])
def test_flow_objective_trains_logs_and_resumes_exactly(tmp_path, arch):
    """--objective flow: the trainer wraps FlowPrecond, draws t (not sigma) from the (seed, step)
    generator, logs finite losses, and a run stopped at step 10 resumes bit-exactly."""
    from fastmask.models import FlowPrecond

    kw = dict(objective="flow", t_schedule="logit_normal" if arch == "dit" else "uniform", arch=arch)
    if arch == "dit":
        kw.update(mask_ratio=0.0, finetune_steps=0, steps=14)
    full = train(tiny_cfg(tmp_path / "full", **kw), progress=False)
    assert isinstance(full.net, FlowPrecond)
    rows = [json.loads(x) for x in open(tmp_path / "full" / "log.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(v == v and v < 1e3 for v in losses)

    def stop_at_10(trainer, step):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "split", **kw), hooks={"after_step": stop_at_10}, progress=False)
    resumed = train(tiny_cfg(tmp_path / "split", **kw), resume=tmp_path / "split", progress=False)
    assert resumed.step == full.step
    _assert_bit_equal(_all_state(full), _all_state(resumed))
    # the EDM run from the same seed differs (a different objective, a different draw)
    edm = train(tiny_cfg(tmp_path / "edm", **{**kw, "objective": "edm"}), progress=False)
    assert not torch.equal(_all_state(edm)["model.model.final_layer.linear.bias"],
                           _all_state(full)["model.model.final_layer.linear.bias"])


def test_step_randomness_flow_draws_t_in_sigmas_place():
    r = step_randomness(0, 3, 64, (1, 2, 2), 16, 0.5, 0.1, False, "cpu", "uniform")
    e = step_randomness(0, 3, 64, (1, 2, 2), 16, 0.5, 0.1, False, "cpu")
    assert r["sigma"] is None and e["t"] is None
    assert r["t"].min() >= 0 and r["t"].max() <= 1
    again = step_randomness(0, 3, 64, (1, 2, 2), 16, 0.5, 0.1, False, "cpu", "uniform")
    assert torch.equal(r["t"], again["t"]) and torch.equal(r["noise"], again["noise"])
    other = step_randomness(0, 4, 64, (1, 2, 2), 16, 0.5, 0.1, False, "cpu", "uniform")
    assert not torch.equal(r["t"], other["t"])


@pytest.mark.parametrize("latents,t_schedule", [(False, None), (True, "uniform")])
def test_step_randomness_draws_path_drop_flags_last(latents, t_schedule):
    """SPRINT's path-drop flags come after every other draw: with or without them the other keys
    are the draws of the (seed, step) generator in the order label-drop, sigma or t, noise,
    ids_keep, eps (written out here), and the flags are the next uniforms below the probability."""
    from fastmask import ops
    from fastmask.models import draw_sigma, draw_t

    B, shape, N, seed, step = 4000, (1, 2, 2), 16, 5, 7
    args = (seed, step, B, shape, N, 0.5, 0.1, latents, "cpu", t_schedule)
    g = torch.Generator().manual_seed(seed * 2**32 + step)
    want = {"drop": torch.rand(B, generator=g) < 0.1, "sigma": None, "t": None}
    want["t" if t_schedule else "sigma"] = (draw_t(B, schedule=t_schedule, generator=g) if t_schedule
                                            else draw_sigma(B, generator=g))
    want["noise"] = torch.randn((B, *shape), generator=g)
    want["ids_keep"] = ops.as_strategy(0.5).draw(B, N, generator=g)
    want["eps"] = torch.randn((B, *shape), generator=g) if latents else None
    flags = torch.rand(B, generator=g) < 0.3
    plain, sprint = step_randomness(*args), step_randomness(*args, path_drop_prob=0.3)
    assert plain["path_drop"] is None and step_randomness(*args, path_drop_prob=0.0)["path_drop"] is None
    for r in (plain, sprint):
        assert set(r) == set(want) | {"path_drop"}
        for k, v in want.items():
            assert (r[k] is None) == (v is None), k
            assert v is None or torch.equal(r[k], v), k
    assert sprint["path_drop"].dtype == torch.bool and torch.equal(sprint["path_drop"], flags)
    assert abs(sprint["path_drop"].float().mean().item() - 0.3) < 0.03
    assert step_randomness(*args, path_drop_prob=1.0)["path_drop"].all()


class _FakeClock:
    """``time`` for fastmask.train with a perf_counter that advances 0.5 s per call: every
    step then takes exactly 0.5 s of training time, the same in every run."""

    def __init__(self):
        import time as real

        self._real, self.now = real, 0.0

    def perf_counter(self):
        self.now += 0.5
        return self.now

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_minutes_only_run_schedules_the_mask_by_elapsed_time_and_resumes_exactly(tmp_path, monkeypatch):
    """steps unset, a 7.5 s budget of 0.5 s steps: 15 masked steps whose linear schedule goes
    from 0.75 to 0.25 by the elapsed fraction of the budget (not to 0.25 after one step), and a
    run stopped at step 6 and resumed uses the same ratios and ends bit-equal."""
    import fastmask.train as T

    kw = dict(steps=None, minutes=0.125, finetune_steps=2, log_every=1, mask_schedule="linear",
              mask_ratio=0.75, mask_ratio_end=0.25)
    want = [0.75 - 0.5 * k / 15 for k in range(15)]

    def ratios(folder):  # {step: the mask ratio of that step} (log rows are written after it)
        rows = [json.loads(x) for x in open(folder / "log.jsonl")]
        return {r["step"] - 1: r["mask_ratio"] for r in rows if r.get("phase") == 1 and "loss" in r}

    monkeypatch.setattr(T, "time", _FakeClock())
    full = train(tiny_cfg(tmp_path / "full", **kw), progress=False)
    assert full.summary()["phase1_steps"] == 15
    assert ratios(tmp_path / "full") == pytest.approx(dict(enumerate(want)), abs=1e-12)
    assert mask_ratio_at(full.cfg, 1, 1, progress=1 / 15) == pytest.approx(want[1])
    with pytest.raises(ValueError, match="progress"):
        mask_ratio_at(full.cfg, 1, 1)  # no step count to divide by: the caller says where it stands

    def stop_at_6(trainer, step):
        if step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "time", _FakeClock())
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(tmp_path / "split", **kw), hooks={"after_step": stop_at_6}, progress=False)
    ck = load_checkpoint(tmp_path / "split")
    sched = ck["extra"]["mask_schedule"]
    assert ck["step"] == 6 and sched["by"] == "minutes" and sched["step"] == 5
    assert sched["progress"] == pytest.approx(5 / 15) and sched["ratio"] == pytest.approx(want[5])
    monkeypatch.setattr(T, "time", _FakeClock())
    resumed = train(tiny_cfg(tmp_path / "split", **kw), resume=tmp_path / "split", progress=False)
    got = ratios(tmp_path / "split")  # the step the hook stopped was logged by neither run
    assert set(range(6, 15)) <= set(got) and got == pytest.approx({k: want[k] for k in got}, abs=1e-12)
    assert resumed.step == full.step == 17
    _assert_bit_equal(_all_state(full), _all_state(resumed))

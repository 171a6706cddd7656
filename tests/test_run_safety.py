"""A training run never loses or mixes work: run-folder lock, resume to the requested total,
finite checkpoints, signals and errors that save, start-up checks, SIGKILL at random moments."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import _all_state, _assert_bit_equal, tiny_cfg  # noqa: E402

from fastmask.checkpoint_io import first_nonfinite, load_checkpoint, save_checkpoint  # noqa: E402
from fastmask.errors import UsageError  # noqa: E402
from fastmask.train import NonFiniteLossError, Trainer, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _ckpts(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").glob("ckpt-*"))


# --------------------------------------------------------------------------- lock
def test_second_run_on_a_folder_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = _python(f"""
        import time
        from test_train import tiny_cfg
        from fastmask.train import Trainer
        tr = Trainer(tiny_cfg({str(out)!r}))
        print("ready", flush=True)
        time.sleep(120)
    """)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        with pytest.raises(UsageError, match=rf"in use by another fastmask run \(pid {holder.pid} on host"):
            train(tiny_cfg(out, steps=2, finetune_steps=0), progress=False)
        assert not (out / "checkpoints" / "ckpt-0000002.safetensors").exists()
    finally:
        holder.kill()  # SIGKILL: the holder never releases the lock itself
        holder.wait()
    tr = Trainer(tiny_cfg(out, steps=2, finetune_steps=0))
    try:
        assert tr._lock.stale is not None and f"pid {holder.pid}" in tr._lock.stale
    finally:
        tr.close()
    # a cleanly finished run leaves no stale record
    train(tiny_cfg(out, steps=2, finetune_steps=0), progress=False)
    tr = Trainer(tiny_cfg(out, steps=2, finetune_steps=0))
    assert tr._lock.stale is None
    tr.close()


def test_a_new_run_refuses_a_folder_that_holds_another_runs_checkpoints(tmp_path):
    out = tmp_path / "r"
    train(tiny_cfg(out, steps=2, finetune_steps=0), progress=False)
    before = _ckpts(out)
    log = (out / "log.jsonl").read_bytes()
    with pytest.raises(UsageError, match=r"out: .* already holds the checkpoints of another run .*step 2.*resume"):
        train(tiny_cfg(out, steps=3, finetune_steps=0, seed=5), progress=False)
    assert _ckpts(out) == before and (out / "log.jsonl").read_bytes() == log  # nothing of the refused run
    # resuming another run's checkpoint into this folder would mix two runs as well
    train(tiny_cfg(tmp_path / "other", steps=1, finetune_steps=0), progress=False)
    with pytest.raises(UsageError, match="not those of"):
        train(tiny_cfg(out, steps=3, finetune_steps=0), resume=tmp_path / "other", progress=False)
    # its own run resumes, and a checkpoint file of it from another folder into an empty one starts a branch
    train(tiny_cfg(out, steps=3, finetune_steps=0), resume=out, progress=False)
    assert _ckpts(out)[-1] == "ckpt-0000003.safetensors"
    train(tiny_cfg(tmp_path / "branch", steps=4, finetune_steps=0), resume=out, progress=False)
    assert _ckpts(tmp_path / "branch") == ["ckpt-0000004.safetensors"]


def test_cli_refuses_a_used_out_and_resumes_the_unmasked_comparison(tmp_path, capsys):
    from fastmask.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", "T/2", "--image-size", "8", "--batch-size", "8", "--threads", "1", "--finetune-steps",
            "0", "--sample-steps", "1", "--samples-per-class", "1", "--set", "grid_per_class=1", "--no-eval",
            "--progress", "off", "--out", str(out), "--compare-unmasked", "--device", "cpu"]
    assert main([*argv, "--steps", "2"]) == 0
    capsys.readouterr()
    for again in ([*argv, "--steps", "2"], [*argv[:-3], "--steps", "2"]):  # the same command, or without the comparison
        assert main(again) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0] and "--resume" in err[0] and "already holds" in err[0], err
    # the parent resumed with --compare-unmasked resumes its unmasked run too (no refusal, no fresh restart)
    assert main([*argv, "--steps", "4", "--resume"]) == 0
    rows = [json.loads(line) for line in open(out / "unmasked" / "log.jsonl")]
    assert [r["event"] for r in rows if r.get("event") == "resume"] == ["resume"]
    assert json.loads((out / "metrics.json").read_text())["training"]["phase1_steps"] == 4
    # a leftover unmasked run under a fresh --out is refused before any training
    (out / "checkpoints").rename(tmp_path / "moved")
    assert main([*argv, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "unmasked" in err and "--out" in err and not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- resume semantics
def test_resume_continues_to_the_requested_step_count(tmp_path):
    first = train(tiny_cfg(tmp_path / "r", steps=10, finetune_steps=0), progress=False)
    assert first.step == 10
    more = train(tiny_cfg(tmp_path / "r", steps=20, finetune_steps=0), resume=tmp_path / "r", progress=False)
    assert more.step == 20 and more.summary()["phase1_steps"] == 20
    straight = train(tiny_cfg(tmp_path / "s", steps=20, finetune_steps=0), progress=False)
    _assert_bit_equal(_all_state(straight), _all_state(more))
    # a fine-tune added later runs after the phase-1 steps already done
    ft = train(tiny_cfg(tmp_path / "r", steps=20, finetune_steps=3), resume=tmp_path / "r", progress=False)
    assert ft.step == 23 and ft.summary()["phase1_steps"] == 20
    # after a fine-tune, more phase-1 steps continue the masked phase, then the fine-tune runs again
    again = train(tiny_cfg(tmp_path / "r", steps=30, finetune_steps=3), resume=tmp_path / "r", progress=False)
    s = again.summary()
    assert again.step == 36 and s["phase1_steps"] == 30 and s["phase2_steps"] == 6
    rows = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    assert [r["step"] for r in rows if r.get("event") == "phase"][-2:] == [23, 33]
    # at its totals, a resume trains nothing and says so
    same = train(tiny_cfg(tmp_path / "r", steps=30, finetune_steps=3), resume=tmp_path / "r", progress=False)
    assert same.step == 36


def test_checkpoint_without_optimizer_or_ema_needs_explicit_consent(tmp_path):
    tr = train(tiny_cfg(tmp_path / "a", steps=2, finetune_steps=0), progress=False)
    partial = tmp_path / "partial"
    save_checkpoint(partial, model=tr.net, ema=None, optimizer=None, step=2, config=tr.cfg.to_dict(),
                    extra=tr.state_extra())
    with pytest.raises(UsageError, match="no optimizer state and no EMA weights"):
        train(tiny_cfg(tmp_path / "b", steps=4, finetune_steps=0), resume=partial, progress=False)
    with pytest.warns(UserWarning, match="does not continue exactly"):
        tr = train(tiny_cfg(tmp_path / "b", steps=4, finetune_steps=0), resume=partial, progress=False,
                   allow_partial_resume=True)
    assert tr.step == 4


def test_resume_with_another_model_names_the_first_difference(tmp_path):
    train(tiny_cfg(tmp_path / "m", steps=1, finetune_steps=0), progress=False)
    with pytest.raises(UsageError) as e:
        train(tiny_cfg(tmp_path / "m2", steps=2, finetune_steps=0, arch="dit", mask_ratio=0.0), resume=tmp_path / "m", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "does not fit the model" in msg and "'" in msg and len(msg) < 400


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_unreadable_resume_file_is_a_usage_error_naming_it(tmp_path, content):
    f = tmp_path / "bad.safetensors"
    if content is None:  # a real checkpoint, truncated
        tr = train(tiny_cfg(tmp_path / "t", steps=1, finetune_steps=0), progress=False)
        data = Path(tr.last_ckpt[1]).read_bytes()
        content = data[: len(data) // 2]
    f.write_bytes(content)
    with pytest.raises(UsageError, match="bad.safetensors"):
        train(tiny_cfg(tmp_path / "r", steps=2, finetune_steps=0), resume=f, progress=False)


# --------------------------------------------------------------------------- finite checkpoints
def test_diverged_weights_never_become_the_last_good_checkpoint(tmp_path):
    def diverge(trainer, step):
        if step == 4:  # what a huge learning rate does: finite but enormous weights
            with torch.no_grad():
                for p in trainer.net.parameters():
                    p.mul_(1e30)

    cfg = tiny_cfg(tmp_path / "d", ckpt_every=2, keep_checkpoints=1)
    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*ckpt-0000002\.safetensors \(step 2, verified finite\)"):
        train(cfg, hooks={"after_step": diverge}, progress=False)
    assert "ckpt-0000002.safetensors" in _ckpts(tmp_path / "d")  # the rotation kept it
    ck = load_checkpoint(tmp_path / "d" / "checkpoints" / "ckpt-0000002.safetensors")
    assert first_nonfinite({**ck["model"], **ck["ema"]}) is None


def test_nonfinite_weights_are_never_written(tmp_path):
    def poison(trainer, step):
        if step == 4:
            with torch.no_grad():
                next(trainer.net.parameters()).view(-1)[0] = float("nan")

    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*ckpt-0000002"):
        train(tiny_cfg(tmp_path / "n", ckpt_every=2, keep_checkpoints=1), hooks={"after_step": poison}, progress=False)
    assert _ckpts(tmp_path / "n") == ["ckpt-0000002.safetensors"]
    for name in _ckpts(tmp_path / "n"):
        ck = load_checkpoint(tmp_path / "n" / "checkpoints" / name)
        assert first_nonfinite({**ck["model"], **ck["ema"]}) is None


def test_save_checkpoint_refuses_nonfinite_optimizer_state(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    opt.state[net.weight]["exp_avg_sq"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="optim.*not written|not written.*optim"):
        save_checkpoint(tmp_path, model=net, ema=None, optimizer=opt, step=1, config={})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- stopping keeps the work
def test_sigterm_saves_like_sigint(tmp_path):
    def term(trainer, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def fail(signum, frame):  # what would happen without the trainer's handler: the test fails, not dies
        raise RuntimeError("SIGTERM reached the default handler")

    prev = signal.signal(signal.SIGTERM, fail)
    try:
        with pytest.raises(KeyboardInterrupt) as e:
            train(tiny_cfg(tmp_path / "t"), hooks={"after_step": term}, progress=False)
        assert signal.getsignal(signal.SIGTERM) is fail  # restored
    finally:
        signal.signal(signal.SIGTERM, prev)
    assert e.value.signum == signal.SIGTERM and e.value.checkpoint.name == "ckpt-0000003.safetensors"
    assert load_checkpoint(tmp_path / "t")["step"] == 3


def test_an_error_inside_the_loop_saves_first_and_resumes_exactly(tmp_path):
    def boom(trainer, step):
        if step == 5:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_cfg(tmp_path / "e"), hooks={"after_step": boom}, progress=False)
    assert load_checkpoint(tmp_path / "e")["step"] == 5
    resumed = train(tiny_cfg(tmp_path / "e"), resume=tmp_path / "e", progress=False)
    full = train(tiny_cfg(tmp_path / "f"), progress=False)
    _assert_bit_equal(_all_state(full), _all_state(resumed))


def test_an_error_after_divergence_does_not_replace_the_good_checkpoint(tmp_path):
    def hook(trainer, step):
        if step == 5:
            with torch.no_grad():
                next(trainer.net.parameters()).view(-1)[0] = float("nan")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        train(tiny_cfg(tmp_path / "e", ckpt_every=2, log_every=100), hooks={"after_step": hook}, progress=False)
    assert _ckpts(tmp_path / "e") == ["ckpt-0000002.safetensors", "ckpt-0000004.safetensors"]
    assert load_checkpoint(tmp_path / "e")["step"] == 4


def test_ctrl_c_during_start_up_claims_no_checkpoint(tmp_path, monkeypatch, capsys):
    import fastmask.train as T
    from fastmask.cli import main

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "build_dataset", interrupted)
    rc = main(["train", "--out", str(tmp_path / "c"), "--steps", "2", "--no-eval", "--progress", "off"])
    err = capsys.readouterr().err
    assert rc == 130 and "no checkpoint was saved" in err and "saved" not in err.replace("no checkpoint was saved", "")
    # the lock was released on the way out
    monkeypatch.undo()
    Trainer(tiny_cfg(tmp_path / "c")).close()


def test_leftover_temp_files_are_removed_and_files_are_0644(tmp_path):
    ck = tmp_path / "p" / "checkpoints"
    ck.mkdir(parents=True)
    junk = [ck / ".ckpt-0000004.safetensors.abc123.tmp", ck / ".latest.json.1.ff.tmp", tmp_path / "p" / ".metrics.json.x.tmp"]
    for j in junk:
        j.write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        tr = train(tiny_cfg(tmp_path / "p", steps=2, finetune_steps=0), progress=False)
    finally:
        os.umask(old)
    assert not any(j.exists() for j in junk)
    for f in (tr.last_ckpt[1], ck / "latest.json"):
        assert f.stat().st_mode & 0o777 == 0o644, oct(f.stat().st_mode)


# --------------------------------------------------------------------------- start-up checks
def test_out_under_a_regular_file_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="out: cannot create the folder"):
        train(tiny_cfg(tmp_path / "file" / "run", steps=1), progress=False)


def test_torn_last_log_line_is_tolerated(tmp_path):
    out = tmp_path / "l"
    train(tiny_cfg(out, steps=4, finetune_steps=0), progress=False)
    with open(out / "log.jsonl", "ab") as f:
        f.write(b'{"step": 5, "lo')  # what a kill in the middle of an append leaves
    train(tiny_cfg(out, steps=8, finetune_steps=0), resume=out, progress=False)
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert rows[-1]["event"] == "checkpoint" and any(r.get("step") == 8 and "loss" in r for r in rows)


def _shard(path, labels, moments=None):
    m = np.zeros((len(labels), 8, 8, 8), np.float32) if moments is None else moments
    np.savez(path, moments=m, labels=np.asarray(labels))
    return path


@pytest.mark.parametrize(
    "labels,match",
    [
        ([0, 1, 10**9], r"lat\.npz: holds the label 1000000000"),
        (np.array([0.0, 1.5, 2.0]), r"lat\.npz: labels must be whole class indices, found 1\.5"),
        ([0, -5, 1], r"lat\.npz: labels must be class indices >= 0"),
        (np.array(["a", "b", "c"]), r"lat\.npz: expected integer class labels"),
    ],
)
def test_bad_shard_labels_are_named_before_training(tmp_path, labels, match):
    f = _shard(tmp_path / "lat.npz", labels)
    cfg = tiny_cfg(tmp_path / "o", data="latents", data_path=str(f), channels=4, steps=1, finetune_steps=0)
    with pytest.raises(ValueError, match=match):
        train(cfg, progress=False)


def test_labels_outside_num_classes_and_bad_shards_fail_at_start(tmp_path):
    f = _shard(tmp_path / "lat.npz", [0, 1, 5])
    cfg = tiny_cfg(tmp_path / "o", data="latents", data_path=str(f), channels=4, steps=1, finetune_steps=0,
                   num_classes=3)
    with pytest.raises(ValueError, match=r"num_classes: .*labels in \[0, 5\] but num_classes=3"):
        train(cfg, progress=False)
    ints = _shard(tmp_path / "int.npz", [0, 1], moments=np.zeros((2, 8, 8, 8), np.int32))
    cfg.data_path, cfg.num_classes = str(ints), None
    with pytest.raises(ValueError, match=r"int\.npz: expected floating-point moments"):
        train(cfg, progress=False)
    torn = tmp_path / "torn.npz"
    torn.write_bytes(_shard(tmp_path / "ok.npz", [0, 1]).read_bytes()[:100])
    cfg.data_path = str(torn)
    with pytest.raises(ValueError, match=r"torn\.npz: not a readable"):
        train(cfg, progress=False)


def test_unreadable_images_are_skipped_with_a_count(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(root / c / f"{i}.png")
    (root / "a" / "broken.png").write_bytes(b"not a png")
    cfg = tiny_cfg(tmp_path / "o", data="folder", data_path=str(root), channels=3, steps=1, finetune_steps=0)
    tr = train(cfg, progress=False)
    assert len(tr.data) == 6 and [p.name for p in tr.data.skipped] == ["broken.png"]
    rows = [json.loads(line) for line in open(tmp_path / "o" / "log.jsonl")]
    assert any(r.get("skipped_images") == 1 for r in rows)


# --------------------------------------------------------------------------- SIGKILL
def test_sigkill_at_random_moments_leaves_a_finite_checkpoint_and_exact_resume(tmp_path):
    """Two kills of a real training process at random moments (checkpoint every step, so that
    kills land inside checkpoint writes too); each leaves a loadable, finite checkpoint, and
    resuming from it ends bit-identical to an uninterrupted run."""
    steps = 40
    full = train(tiny_cfg(tmp_path / "full", steps=steps, finetune_steps=0), progress=False)
    out = tmp_path / "killed"
    rng = random.Random(0)
    codes = []
    for attempt in range(2):
        resume = "None" if attempt == 0 else repr(str(out))
        proc = _python(f"""
            import time
            import torch
            torch.set_num_threads(1)
            from test_train import tiny_cfg
            from fastmask.train import train
            # a short pause per step keeps a fast machine from finishing before the kill
            train(tiny_cfg({str(out)!r}, steps={steps}, finetune_steps=0, ckpt_every=1, keep_checkpoints=2),
                  resume={resume}, progress=False, hooks={{"after_step": lambda t, s: time.sleep(0.02)}})
        """)
        deadline = time.time() + 120
        first = load_before = None
        while time.time() < deadline and proc.poll() is None:
            names = _ckpts(out) if (out / "checkpoints").exists() else []
            if names:
                first = first or names[-1]
                if names[-1] != first:  # training is under way: kill at a random moment
                    time.sleep(rng.uniform(0.0, 0.3))
                    break
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr.read()
        codes.append(proc.returncode)
        load_before = load_checkpoint(out)
        assert first_nonfinite({**load_before["model"], **load_before["ema"]}) is None
    assert -signal.SIGKILL in codes  # at least one kill landed before the end
    resumed = train(tiny_cfg(out, steps=steps, finetune_steps=0, ckpt_every=1, keep_checkpoints=2), resume=out,
                    progress=False)
    assert resumed.step == steps
    _assert_bit_equal(_all_state(full), _all_state(resumed))

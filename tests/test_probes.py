"""Careless and hostile input, probe by probe: every command's flags, config values, paths,
environment variables, checkpoints and the library's ops and constructors.

The rule these probes hold the code to: a user error on the command line is one line on
stderr, ``fastmask <command>: error: ...``, naming the flag, key, variable or file, exit code 2
and no traceback; the library raises ValueError naming the argument. Never a silent wrong
answer, a hang, a crash inside torch or a kernel, or an attempt to allocate without bound.
"""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_train import tiny_cfg  # noqa: E402

from fastmask import EDMPrecond, MaskedDiTBlock, dit, maskdit, ops  # noqa: E402
from fastmask.cli import main  # noqa: E402
from fastmask.train import train  # noqa: E402
from fastmask._env import reload as _reload_env

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, argv, names, env=None, monkeypatch=None):
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    cmd = argv[0] if argv and not argv[0].startswith("-") else None
    assert lines[0].startswith(f"fastmask {cmd}: error: " if cmd else "fastmask: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 1-step run of the tiny digits model (8x8 pixels, 10 classes)."""
    out = tmp_path_factory.mktemp("probe") / "run"
    train(tiny_cfg(out, steps=1, finetune_steps=0), progress=False)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("files")
    (d / "file").write_text("x")
    torch.save({"ema": {"foo": torch.zeros(3)}}, d / "junk.pt")  # a state dict of another model
    return d


# ----------------------------------------------------------------------------------- fastmask train
@pytest.mark.parametrize(
    "argv,names",
    [
        (["--steps", ""], ["--steps"]),  # empty is a mistake (an unset shell variable), not "none"
        (["--minutes", ""], ["--minutes"]),
        (["--batch-size", "99999999999999999999"], ["--batch-size"]),  # overflowed int64 inside torch
        (["--seed", "99999999999999999999"], ["--seed"]),  # only "Overflow when unpacking long long" before
        (["--seed", "2147483648"], ["--seed"]),  # the seed is used modulo 2**31: two seeds were one run
        (["--threads", "100000"], ["--threads"]),  # torch.set_num_threads(100000) kills the process
        (["--set", "num_classes=1000000000"], ["num_classes"]),  # a 256 GB label table
        (["--image-size", "100000"], ["--image-size"]),
        (["--samples-per-class", "99999999999"], ["--samples-per-class"]),
        (["--sample-steps", "2147483647"], ["--sample-steps"]),
        (["--guidance", "1e300"], ["--guidance"]),
        (["--out", ""], ["--out"]),  # wrote into the current folder
        (["--set", "out="], ["out"]),
        (["--set", "model= "], ["model"]),
        (["--data-path", ""], ["--data-path"]),
        (["--data-path", "x.npz"], ["data_path", "digits"]),  # was silently ignored: trained on digits
        (["--preset", ""], ["--preset"]),  # was the digits preset
        (["--config", ""], ["--config"]),  # was no config at all
    ],
)
def test_train_values(capsys, argv, names):
    _one_line_error(capsys, ["train", *argv, "--print-config"], names)


@pytest.mark.parametrize(
    "env,names",
    [
        ({"FASTMASK_BACKEND": "bogus"}, ["FASTMASK_BACKEND", "bogus"]),
        ({"FASTMASK_BACKEND": "attention=bogus"}, ["FASTMASK_BACKEND"]),
        ({"FASTMASK_BACKEND": "nope=torch"}, ["FASTMASK_BACKEND", "nope"]),
        ({"FASTMASK_CHECK_VALUES": "maybe"}, ["FASTMASK_CHECK_VALUES", "0 or 1"]),  # silently meant "on"
        ({"FASTMASK_NVTX": "yes"}, ["FASTMASK_NVTX"]),  # silently meant "off"
        ({"FASTMASK_ATTN_AUTOTUNE": "off"}, ["FASTMASK_ATTN_AUTOTUNE"]),  # silently meant "on"
    ],
)
@pytest.mark.parametrize("command", [["train", "--print-config"], ["info"]])
def test_environment_is_checked_before_any_work(capsys, monkeypatch, env, names, command):
    # FASTMASK_BACKEND=bogus used to fail only inside the first training step, after a checkpoint
    _one_line_error(capsys, command, names, env=env, monkeypatch=monkeypatch)


def test_environment_switches_in_the_library(monkeypatch):
    from fastmask import _env

    monkeypatch.setenv("FASTMASK_CHECK_VALUES", "maybe")
    _reload_env()  # fastmask reads the environment at import and on reload
    with pytest.raises(ValueError, match="FASTMASK_CHECK_VALUES"):
        _env.check_values()
    for value, want in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv("FASTMASK_CHECK_VALUES", value)
        _reload_env()  # fastmask reads the environment at import and on reload
        assert _env.check_values() is want


def test_sigterm_during_start_up_is_one_line():
    """SIGTERM before training has begun (schedulers, `timeout`): one line, exit 143, nothing
    claimed saved (it used to kill the process without a word)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = ("import sys, time, fastmask.cli as c; c.build_parser = lambda: time.sleep(60); "
            "print('ready', flush=True); sys.exit(c.main(['train']))")
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # into main's start-up
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 143, err
    assert err.strip().splitlines() == ["fastmask: interrupted (no checkpoint was saved)"], err


# ----------------------------------------------------------------------------------- sample, eval
@pytest.mark.parametrize(
    "argv,names",
    [
        (["--per-class", "2147483647"], ["--per-class"]),  # tried to allocate 171 GB of labels
        (["--num", "99999999999"], ["--num"]),
        (["--steps", "2147483647"], ["--steps"]),  # the process was killed for memory
        (["--guidance", "1e300"], ["--guidance"]),  # wrote NaN images
        (["--seed", "99999999999999999999"], ["--seed"]),
        (["--batch-size", "99999999999"], ["--batch-size"]),
        (["--labels", "0,,1"], ["--labels", "empty"]),  # sampled two labels, not three
        (["--preset", "maskdit256"], ["--preset", "pixels"]),  # a latent preset on a pixel model
        (["--key", "bogus"], ["--key"]),  # ignored for a fastmask checkpoint
        (["--npz", ""], ["--npz"]),  # an empty name: a 50,000-sample FID run writing PNGs only
        (["--npz", "FILE/x.npz"], ["--npz"]),  # a traceback after sampling
        (["--npz", "samples.png"], ["--npz", ".npz"]),
        (["--out", ""], ["--out"]),  # wrote into the current folder
    ],
)
def test_sample_flags(capsys, run_dir, files, argv, names):
    argv = [a.replace("FILE", str(files / "file")) for a in argv]
    out = [] if "--out" in argv else ["--out", str(files / "s")]
    _one_line_error(capsys, ["sample", "--checkpoint", str(run_dir), "--steps", "1", "--device", "cpu", *out, *argv],
                    names)


def test_sample_state_dict_of_another_model(capsys, files):
    _one_line_error(capsys, ["sample", "--checkpoint", str(files / "junk.pt"), "--out", str(files / "s")],
                    ["checkpoint", "DiT/MaskDiT"])  # was a KeyError traceback


@pytest.mark.parametrize("argv,names", [(["--out", ""], ["--out"]), (["--samples-per-class", "99999999999"],
                                                                         ["--samples-per-class"])])
def test_eval_flags(capsys, run_dir, argv, names):
    _one_line_error(capsys, ["eval", "--checkpoint", str(run_dir), *argv], names)  # "" meant the run folder


# ----------------------------------------------------------------------------------- profile, info, latents, fid
@pytest.mark.parametrize(
    "argv,names",
    [
        (["profile", "--trace", "FILE/t.json"], ["--trace"]),  # failed (or was ignored) after profiling
        (["profile", "--json", "FILE/t.json"], ["--json"]),
        (["profile", "--trace", ""], ["--trace"]),
        (["profile", "--json", ""], ["--json"]),
        (["profile", "--batch", "99999999999"], ["--batch"]),
        (["profile", "--input-size", "99999"], ["--input-size"]),
        (["info", "--device", ""], ["--device"]),  # was the default device
        (["info", "--batch", "-1"], ["--batch"]),
        (["info", "--mask-ratio", "nan"], ["--mask-ratio"]),
        (["info", "--input-size", "0"], ["--input-size"]),
        (["latents", "--images", "FILE", "--out", "O", "--device", "bogus"], ["--device"]),  # a torch traceback
        (["latents", "--images", "FILE", "--out", "O", "--device", ""], ["--device"]),
        (["latents", "--images", "FILE", "--out", "FILE/x"], ["--out"]),  # reported only after loading the VAE
        (["latents", "--images", "FILE", "--out", "O", "--workers", "-1"], ["--workers"]),
        (["latents", "--images", "FILE", "--out", "O", "--resolution", "7"], ["--resolution"]),
        (["fid", "--samples", "FILE", "--ref", "FILE", "--isc-splits", "0"], ["--isc-splits"]),  # named --inception
        (["fid", "--samples", "FILE", "--ref", "FILE", "--num", "-1"], ["--num"]),
        (["fid", "--samples", "FILE", "--ref", "FILE", "--device", "bogus"], ["--device"]),
        (["fid", "--samples", "FILE", "--ref", "FILE", "--out", "FILE/x.json"], ["--out"]),
        (["fid", "--samples", "FILE", "--ref", "FILE", "--save-stats", "stats.txt"], ["--save-stats", ".npz"]),
    ],
)
def test_other_commands(capsys, files, argv, names):
    argv = [str(files / "o") if a == "O" else a.replace("FILE", str(files / "file")) if a.startswith("FILE") else a
            for a in argv]
    _one_line_error(capsys, argv, names)


# ----------------------------------------------------------------------------------- library
_x = torch.randn(2, 16, 32)
_ids = ops.random_mask(2, 16, 0.5)[0]


@pytest.mark.parametrize(
    "call,names",
    [
        (lambda: maskdit("T/2", depth=-1), ["depth"]),  # built a model without blocks
        (lambda: maskdit("T/2", depth=0), ["depth"]),
        (lambda: maskdit("T/2", depth=2.5), ["depth"]),  # TypeError
        (lambda: maskdit("T/2", input_size=0), ["input_size"]),
        (lambda: maskdit("T/2", patch_size=0), ["patch_size"]),  # ZeroDivisionError
        (lambda: maskdit("T/2", in_channels=0), ["in_channels"]),
        (lambda: maskdit("T/2", num_classes=-2), ["num_classes"]),
        (lambda: maskdit("T/2", mlp_ratio=-1.0), ["mlp_ratio"]),  # RuntimeError: negative dimension
        (lambda: maskdit("T/2", mlp_ratio=math.nan), ["mlp_ratio"]),
        (lambda: maskdit("T/2", decoder_depth=-1), ["decoder_depth"]),
        (lambda: maskdit(None), ["config"]),  # AttributeError
        (lambda: dit("T/2", depth=-1), ["depth"]),
        (lambda: MaskedDiTBlock(-32, 4), ["hidden_size"]),
        (lambda: MaskedDiTBlock(32, 4, 0.0), ["mlp_ratio"]),  # an MLP of width 0
        (lambda: ops.random_mask(2, 16.5, 0.5), ["num_tokens"]),  # TypeError inside torch
        (lambda: ops.random_mask(2, 16, "0.5"), ["mask_ratio"]),  # a string was accepted
        (lambda: ops.random_mask(True, 16, 0.5), ["batch"]),
        (lambda: ops.random_mask(2**40, 16, 0.5), ["batch"]),  # tried to allocate 70 TB
        (lambda: ops.num_kept(-1, 0.5), ["num_tokens"]),
        (lambda: ops.unmask_tokens(_x[:, :8], _ids, torch.zeros(32), 16.0), ["num_tokens"]),
    ],
)
def test_library_arguments(call, names):
    with pytest.raises(ValueError) as e:
        call()
    for name in names:
        assert name in str(e.value), (name, str(e.value))


@pytest.fixture(scope="module")
def edm():
    torch.manual_seed(0)
    return EDMPrecond(maskdit("T/2", input_size=8, in_channels=1, num_classes=10))


_xi, _lab, _sig = torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([1.0, 2.0])


@pytest.mark.parametrize(
    "call,names",
    [
        (lambda n: n.eval()(_xi, torch.tensor([math.nan, 1.0]), _lab), ["sigma"]),  # NaN output without a word
        (lambda n: n.eval()(_xi, torch.tensor([math.inf, 1.0]), _lab), ["sigma"]),
        (lambda n: n.eval()(_xi, -_sig, _lab), ["sigma"]),
        (lambda n: n.eval()(_xi, torch.zeros(2), _lab), ["sigma"]),
        (lambda n: n.eval()(_xi, _sig, torch.tensor([1, 2, 3])), ["class_labels"]),  # RuntimeError
        (lambda n: n.eval()(_xi.long(), _sig, _lab), ["x"]),  # RuntimeError inside the conv
        (lambda n: n.train().loss_given(_xi, _lab, torch.tensor([math.nan, 1.0]), torch.randn_like(_xi), None),
         ["sigma"]),  # a NaN loss
        (lambda n: n.train().loss_given(_xi, _lab, _sig, torch.randn(2, 1, 4, 4), None), ["noise"]),
        (lambda n: n.train().loss_given(_xi, _lab, _sig[:1], torch.randn_like(_xi), None), ["sigma"]),
    ],
)
def test_edm_arguments(edm, call, names):
    with pytest.raises(ValueError) as e:
        call(edm)
    for name in names:
        assert name in str(e.value), (name, str(e.value))


def test_value_checks_stay_off_in_the_trainers_step(edm):
    """The sigma check is a data-dependent check: skipped inside trusted_values (the trainer)."""
    with ops.checks.trusted_values():
        loss = edm.train().loss_given(_xi, _lab, torch.tensor([math.nan, 1.0]), torch.randn_like(_xi), None)[0]
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])

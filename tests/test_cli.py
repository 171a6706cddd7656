"""The `fastmask` command line: help, config resolution, and an end-to-end digits smoke run."""
import json
import subprocess
import sys

import pytest

from fastmask.cli import TRAIN_FLAGS, build_parser, main

# A drastically shortened digits preset: tiny batch, a few steps, 3 sampler steps, 2 samples per class.
SHORT = ["--steps", "5", "--finetune-steps", "2", "--sample-steps", "3", "--samples-per-class", "2",
         "--batch-size", "16", "--set", "log_every=2", "--set", "grid_per_class=2", "--progress", "off"]


def test_help_lists_every_option(capsys):
    parser = build_parser()
    for cmd in ("train", "sample", "eval"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices[cmd]
        for action in sub._actions:
            for opt in action.option_strings:
                assert opt in text
            if action.option_strings:
                assert action.help, f"{cmd} {action.option_strings} has no help"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for flag, *_ in TRAIN_FLAGS:
        assert flag in text
    assert "digits-unmasked" in text and "ema_decay" in text  # presets and config keys are explained


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastmask", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "sample" in r.stdout


def test_config_resolution_order(tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"lr": 0.5, "steps": 7, "seed": 3}))
    assert main(["train", "--config", str(cfg_file), "--set", "steps=9", "--set", "grad_clip=none",
                 "--seed", "4", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["lr"], cfg["steps"], cfg["seed"], cfg["grad_clip"], cfg["preset"]) == (0.5, 9, 4, None, "digits")
    assert main(["train", "--set", "nope=1", "--print-config"]) == 2
    assert "unknown key 'nope'" in capsys.readouterr().err
    assert main(["train", "--preset", "imagenet9", "--print-config"]) == 2
    assert main(["train", "--preset", "folder", "--print-config"]) == 2  # needs --data-path
    assert "data_path" in capsys.readouterr().err


def test_profile_help_is_wired(capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--help"])
    assert e.value.code == 0 and "--mask-ratio" in capsys.readouterr().out


def test_digits_end_to_end_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *SHORT, "--out", str(out), "--compare-unmasked"]) == 0
    for f in ("samples.png", "samples_unguided.png", "loss.png", "metrics.json", "log.jsonl", "checkpoints/latest.json",
              "unmasked/samples.png", "unmasked/metrics.json"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["training"]["phase1_steps"] == 5 and m["training"]["phase2_steps"] == 2
    assert 0 <= m["samples"]["accuracy"] <= 1 and m["samples"]["num_samples"] == 20
    assert m["samples"]["frechet_distance"] > 0 and m["classifier"]["heldout_accuracy_real"] > 0.9
    assert m["samples"]["unguided"]["guidance"] == 1.0 and "frechet_distance" in m["samples"]["unguided"]
    assert m["targets"]["accuracy_with_guidance>=0.85"] in (True, False) and m["targets"]["masked_run<=10_minutes"]
    assert m["unmasked"]["training"]["phase2_steps"] == 0 and "accuracy" in m["unmasked"]["samples"]
    assert m["timing"]["command_seconds"] > 0

    # resume: extend the fine-tune by 2 steps
    assert main(["train", "--resume", str(out), "--finetune-steps", "4", "--no-eval", "--progress", "off"]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["training"]["steps"] == 9 and "accuracy" not in m2["samples"]

    # sample PNGs from the run folder, and evaluate it
    assert main(["sample", "--checkpoint", str(out), "--labels", "3,7", "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["grid.png", "sample_00000_class3.png", "sample_00001_class7.png"]
    assert main(["eval", "--checkpoint", str(out), "--samples-per-class", "2", "--steps", "2"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["samples"]["num_samples"] == 20 and (out / "eval_samples.png").exists()
    assert main(["sample", "--checkpoint", str(out), "--labels", "12", "--out", str(tmp_path / "x")]) == 2
    assert "--labels" in capsys.readouterr().err


def test_sample_published_latent_model(tmp_path):
    import numpy as np
    import torch

    from fastmask.models import EDMPrecond, maskdit

    torch.manual_seed(0)
    pre = EDMPrecond(maskdit("T/2", input_size=8, in_channels=4, num_classes=5))
    torch.save({"ema": pre.state_dict()}, tmp_path / "m.pt")
    assert main(["sample", "--checkpoint", str(tmp_path / "m.pt"), "--per-class", "1", "--steps", "2",
                 "--guidance", "1.5", "--out", str(tmp_path / "o")]) == 0
    z = np.load(tmp_path / "o" / "latents.npy")
    assert z.shape == (5, 4, 8, 8) and np.load(tmp_path / "o" / "labels.npy").tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------- user errors
def _assert_user_error(capsys, argv, names):
    """main(argv) exits 2 with one line `fastmask <cmd>: error: ...` naming every string of ``names``."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fastmask {argv[0]}: error: "), lines[0]
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.mark.parametrize(
    "argv,names",
    [
        (["--set", "log_every=0"], ["log_every", ">= 1"]),
        (["--threads", "-2"], ["--threads", "[1, 1024]"]),
        (["--set", "threads=-2"], ["threads"]),
        (["--set", "betas=0.9"], ["betas", "pair"]),
        (["--set", "betas=0.9,1.5"], ["betas", "[0, 1)"]),
        (["--set", "lr=1e39"], ["lr"]),
        (["--lr", "1e39"], ["--lr"]),
        (["--lr", "nan"], ["--lr"]),
        (["--set", "steps=abc"], ["steps"]),
        (["--steps", "abc"], ["--steps"]),
        (["--steps", "-1"], ["--steps"]),
        (["--device", "tpu"], ["--device", "cuda:N"]),
        (["--device", "bogus"], ["--device"]),
        (["--set", "device=tpu"], ["device"]),
        (["--set", "amp=fp16"], ["amp", "bf16"]),
        (["--set", "evaluate=maybe"], ["evaluate"]),
        (["--model", "Q/2"], ["--model", "XL/2"]),
        (["--mask-ratio", "1"], ["--mask-ratio", "[0, 1)"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--set", "nope=1"], ["nope"]),
        (["--set", "lr"], ["--set", "KEY=VALUE"]),
        (["--preset", "imagenet9"], ["--preset", "imagenet9"]),
        (["--bogus-flag"], ["--bogus-flag"]),
    ],
)
def test_train_config_errors_are_one_line(capsys, argv, names):
    _assert_user_error(capsys, ["train", *argv, "--print-config"], names)


@pytest.mark.parametrize(
    "content,names",
    [
        ({"steps": "abc"}, ["--config", "steps", "integer"]),
        ({"log_every": 0}, ["log_every"]),
        ({"threads": -2}, ["threads"]),
        ({"betas": [0.9]}, ["betas"]),
        ({"betas": 0.9}, ["betas"]),
        ({"lr": 1e39}, ["lr"]),
        ({"device": "tpu"}, ["device"]),
        ({"evaluate": "yes"}, ["evaluate"]),
        ({"steps": True}, ["steps"]),
        ({"nope": 1}, ["nope"]),
        ([1, 2], ["--config", "JSON object"]),
    ],
)
def test_config_file_errors_are_one_line(tmp_path, capsys, content, names):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(content))
    _assert_user_error(capsys, ["train", "--config", str(f), "--print-config"], names)


def test_config_file_unreadable(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _assert_user_error(capsys, ["train", "--config", str(bad), "--print-config"], ["--config", "bad.json"])
    _assert_user_error(capsys, ["train", "--config", str(tmp_path / "missing.json")], ["--config", "missing.json"])


def test_one_check_for_every_route(tmp_path):
    """JSON, --set, the flags and Python attribute values all go through the same check."""
    from fastmask.errors import UsageError
    from fastmask.presets import TrainConfig, check_value, parse_value

    cfg = TrainConfig()
    cfg.log_every = 0
    with pytest.raises(UsageError, match="^log_every: expected an integer >= 1, got 0"):
        cfg.validate()
    with pytest.raises(UsageError, match="steps"):
        TrainConfig.from_dict({"steps": "abc"})
    with pytest.raises(UsageError, match="--set threads"):
        parse_value("threads", "-2")
    with pytest.raises(UsageError, match="--threads"):
        check_value("threads", -2, where="--threads")
    assert parse_value("betas", "0.9,0.99") == (0.9, 0.99) and parse_value("grad_clip", "none") is None
    assert check_value("lr", 1) == 1.0 and isinstance(check_value("lr", 1), float)
    assert TrainConfig.from_dict({"betas": [0.8, 0.9]}).betas == (0.8, 0.9)


def test_train_flags_share_the_config_help(capsys):
    from fastmask.presets import FIELDS, field_help

    assert [k for _, k in TRAIN_FLAGS] == [k for k, f in FIELDS.items() if f.metadata["flag"]]
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    helps = {a.option_strings[0]: a.help for a in train._actions if a.option_strings}
    for flag, key in TRAIN_FLAGS:
        assert flag == "--" + key.replace("_", "-") and helps[flag] == field_help(key)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps N is the total step count of the masked phase; a resumed run continues to N" in text


def test_out_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _assert_user_error(capsys, ["train", "--out", str(tmp_path / "file" / "run"), "--steps", "1"], ["--out"])
    ck = tmp_path / "m.pt"
    ck.write_bytes(b"")
    _assert_user_error(capsys, ["sample", "--checkpoint", str(ck), "--out", str(tmp_path / "file" / "s")], ["--out"])
    _assert_user_error(capsys, ["sample", "--checkpoint", str(ck), "--out", str(tmp_path / "file")], ["--out"])


@pytest.mark.parametrize(
    "argv,names",
    [
        (["sample", "--per-class", "0"], ["--per-class", "[1, 1000000]"]),
        (["sample", "--num", "0"], ["--num"]),
        (["sample", "--guidance", "nan"], ["--guidance", "finite"]),
        (["sample", "--guidance", "inf"], ["--guidance"]),
        (["sample", "--guidance", "-1"], ["--guidance"]),
        (["sample", "--batch-size", "0"], ["--batch-size"]),
        (["sample", "--steps", "0"], ["--steps"]),
        (["sample", "--device", "bogus"], ["--device"]),
        (["sample", "--device", "tpu"], ["--device"]),
        (["sample", "--per-class", "2", "--num", "3"], ["--num", "--per-class"]),
        (["eval", "--samples-per-class", "0"], ["--samples-per-class"]),
        (["eval", "--device", "bogus"], ["--device"]),
        (["eval", "--guidance", "nan"], ["--guidance"]),
    ],
)
def test_sample_and_eval_argument_errors(tmp_path, capsys, argv, names):
    _assert_user_error(capsys, [*argv, "--checkpoint", str(tmp_path / "m.pt")], names)


def test_missing_checkpoint_and_labels(tmp_path, capsys):
    for cmd in ("sample", "eval"):
        _assert_user_error(capsys, [cmd, "--checkpoint", str(tmp_path / "nothere.pt")], ["--checkpoint", "nothere.pt"])
    import torch

    from fastmask.models import EDMPrecond, maskdit

    torch.save({"ema": EDMPrecond(maskdit("T/2", input_size=8, in_channels=4, num_classes=5)).state_dict()},
               tmp_path / "m.pt")
    for labels in ("a,b", "7", ","):
        _assert_user_error(capsys, ["sample", "--checkpoint", str(tmp_path / "m.pt"), "--labels", labels,
                                    "--out", str(tmp_path / "o")], ["--labels"])
    if not torch.cuda.is_available():
        _assert_user_error(capsys, ["sample", "--checkpoint", str(tmp_path / "m.pt"), "--device", "cuda",
                                    "--out", str(tmp_path / "o")], ["--device", "CUDA"])


def test_user_error_subprocess_one_line_and_debug_traceback(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "FASTMASK_DEBUG"}
    argv = [sys.executable, "-m", "fastmask", "train", "--set", "log_every=0", "--print-config"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["fastmask train: error: --set log_every: expected an integer >= 1, got '0'"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**env, "FASTMASK_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "UsageError" in r.stderr

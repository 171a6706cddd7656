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

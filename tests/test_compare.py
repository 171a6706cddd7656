"""`fastmask train --compare`: families trained for the same wall-clock time, one table."""
import json

import numpy as np
import pytest

from fastmask.cli import main
from fastmask.compare import family_config, parse_families
from fastmask.models import ARCHITECTURES
from fastmask.presets import get_preset

SHORT = ["--steps", "4", "--finetune-steps", "2", "--sample-steps", "2", "--samples-per-class", "2",
         "--batch-size", "16", "--set", "grid_per_class=2", "--progress", "off"]


def test_compare_trains_each_family_for_the_first_ones_time(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["train", *SHORT, "--out", str(out), "--compare", "maskdit,dit"]) == 0
    doc = json.loads((out / "compare.json").read_text())
    rows = {r["family"]: r for r in doc["rows"]}
    assert list(rows) == ["maskdit", "dit"]
    m, d = rows["maskdit"], rows["dit"]
    assert (m["phase1_steps"], m["phase2_steps"], m["mask_ratio"]) == (4, 2, 0.5)  # as configured
    assert d["phase2_steps"] == 0 and d["mask_ratio"] == 0.0 and d["steps"] >= 1  # one time-capped phase
    # the dense run got the masked run's time (a minute cap ends at the first step past it)
    assert d["train_seconds"] >= 0.9 * m["train_seconds"]
    assert d["step_time_vs_dit"] == 1.0 and m["step_time_vs_dit"] == pytest.approx(
        m["seconds_per_step"] / d["seconds_per_step"])
    for fam in ("maskdit", "dit"):
        r = rows[fam]
        assert 0 <= r["accuracy"] <= 1 and r["frechet_distance"] > 0 and r["frechet_distance_unguided"] > 0
        with np.load(out / fam / "samples.npz") as z:  # the `fastmask sample --npz` layout
            assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (20, 16, 16, 1)
            assert z["labels"].tolist() == sorted(z["labels"].tolist()) and set(z["labels"].tolist()) == set(range(10))
        assert json.loads((out / fam / "metrics.json").read_text())["family"] == fam
        assert (out / fam / "checkpoints" / "latest.json").exists()
    md = (out / "compare.md").read_text()
    assert "| maskdit | 0.5 | 6 (4 + 2) |" in md and "| dit | 0 |" in md
    # a second comparison into the same folder is refused (one run per folder), before any work
    assert main(["train", *SHORT, "--out", str(out), "--compare", "dit"]) == 2
    assert "--out" in capsys.readouterr().err


def test_compare_refuses_bad_lists(tmp_path, capsys):
    for spec, msg in (("dit,nope", "unknown model family 'nope'"), ("dit,dit", "named twice"), (",", "comma-separated")):
        assert main(["train", "--out", str(tmp_path / "x"), "--compare", spec]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--out", str(tmp_path / "y"), "--compare", "dit", "--resume"]) == 2
    assert "--compare" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown model family"):
        parse_families("maskdit,xx")


def test_family_config_applies_registered_defaults(monkeypatch, tmp_path):
    cfg = get_preset("digits")
    cfg.out = str(tmp_path)
    arch = ARCHITECTURES["maskdit"]
    monkeypatch.setitem(ARCHITECTURES, "maskdit", type(arch)(arch.build, arch.masks, arch.help, {"mask_ratio": 0.75}))
    c = family_config(cfg, "maskdit", {"1": 30.0, "2": 6.0})
    assert c.mask_ratio == 0.75 and c.steps is None and c.minutes == pytest.approx(0.5)
    assert c.finetune_minutes == pytest.approx(0.1) and c.out == str(tmp_path / "maskdit")
    d = family_config(cfg, "dit", {"1": 30.0, "2": 6.0})
    assert d.mask_ratio == 0.0 and d.minutes == pytest.approx(0.6) and d.finetune_steps == 0
    assert cfg.arch == "maskdit" and cfg.mask_ratio == 0.5  # the shared config is not changed

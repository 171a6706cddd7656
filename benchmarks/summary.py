"""Headline figures computed from result rows (stored under "summary" in the JSON, printed).

- training steps: images/s of every variant relative to plain DiT eager at the same input
  size and batch, and the masked-vs-unmasked step-time ratio of each variant family;
- ops: the speedup of the fastest fastmask backend over PyTorch eager and torch.compile.
"""
from __future__ import annotations


def _ok(rows, **kw):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in kw.items())]


def train_summary(rows: list[dict]) -> dict:
    out = {"groups": [], "masked_speedup": []}
    steps = _ok(rows, kind="train_step")
    groups = sorted({(r["config"], r["input_size"], r["batch"]) for r in steps})
    for config, size, batch in groups:
        g = [r for r in steps if (r["config"], r["input_size"], r["batch"]) == (config, size, batch)]
        base = next((r for r in g if r["variant"] == "dit-torch"), None)
        entry = {"config": config, "input_size": size, "batch": batch, "variants": []}
        for r in g:
            v = {k: r.get(k) for k in ("variant", "mask_ratio", "median_ms", "images_per_s", "mfu_pct", "peak_mem_gib")}
            if base:
                v["speedup_vs_dit"] = base["median_ms"] / r["median_ms"]
            entry["variants"].append(v)
        out["groups"].append(entry)
        # masked (0.5) vs unmasked (0.0) step of the same variant family
        for variant in sorted({r["variant"] for r in g}):
            by_ratio = {r["mask_ratio"]: r for r in g if r["variant"] == variant}
            if 0.0 in by_ratio and 0.5 in by_ratio:
                out["masked_speedup"].append(
                    {
                        "config": config,
                        "input_size": size,
                        "batch": batch,
                        "variant": variant,
                        "step_ms_ratio_0.0": by_ratio[0.0]["median_ms"],
                        "step_ms_ratio_0.5": by_ratio[0.5]["median_ms"],
                        "speedup": by_ratio[0.0]["median_ms"] / by_ratio[0.5]["median_ms"],
                    }
                )
    return out


def op_summary(rows: list[dict]) -> list[dict]:
    """Per (op, stage, shape, mode): best fastmask time vs torch eager and torch.compile."""
    ops = _ok(rows, kind="op")
    keyf = lambda r: (r["op"], r["stage"], r["config"], r["input_size"], r["batch"], r.get("mask_ratio"), r["mode"])  # noqa: E731
    groups: dict = {}
    for r in ops:
        groups.setdefault(keyf(r), []).append(r)
    out = []
    for key, g in groups.items():
        by = {r["provider"]: r for r in g}
        fm = [r for r in g if r["provider"].startswith("fastmask")]
        if not fm:
            continue
        best = min(fm, key=lambda r: r["median_ms"])
        e = dict(zip(("op", "stage", "config", "input_size", "batch", "mask_ratio", "mode"), key))
        e.update(best=best["provider"], best_ms=best["median_ms"], roofline_pct=best.get("roofline_pct"))
        for base in ("torch", "torch-compile"):
            if base in by:
                e[f"speedup_vs_{base}"] = by[base]["median_ms"] / best["median_ms"]
        out.append(e)
    return out


def summarize_rows(rows: list[dict]) -> dict:
    train = train_summary(rows)
    ops = op_summary(rows)
    lines = []
    for m in train["masked_speedup"]:
        lines.append(
            f"masked vs unmasked training step ({m['variant']}, {m['config']}, {m['input_size']}x{m['input_size']} "
            f"input, batch {m['batch']}): ratio 0.0 {m['step_ms_ratio_0.0']:.1f} ms, ratio 0.5 "
            f"{m['step_ms_ratio_0.5']:.1f} ms -> {m['speedup']:.2f}x faster masked"
        )
    for g in train["groups"]:
        for v in g["variants"]:
            sp = f", {v['speedup_vs_dit']:.2f}x DiT" if v.get("speedup_vs_dit") else ""
            mfu = f", MFU {v['mfu_pct']:.1f}%" if v.get("mfu_pct") is not None else ""
            lines.append(
                f"train step {g['config']} {g['input_size']}x{g['input_size']} input, batch {g['batch']}, {v['variant']} "
                f"ratio {v['mask_ratio']}: {v['median_ms']:.1f} ms, {v['images_per_s']:.1f} img/s{sp}{mfu}"
            )
    return {"lines": lines, "train": train, "ops": ops}

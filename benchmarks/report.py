"""Benchmark JSON(s) -> a markdown table for the README, and PNG plots.

    python benchmarks/report.py benchmarks/results/h100_20260101-1200_quick.json \\
        --md results.md --plots benchmarks/results/

Tables: the training step (images/s, speedup over DiT, peak memory, MFU), the masked vs
unmasked step ratio, and per op at the headline shape (full step = forward + backward) the
median time and % of roofline of every provider, with fastmask's speedup over PyTorch eager
and torch.compile. ``--all-ops`` adds every measured op row. Plots (matplotlib, Agg):
``speedup_vs_mask_ratio.png`` and ``roofline.png``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROVIDER_ORDER = (
    "fastmask-triton",
    "fastmask-cuda",
    "torch",
    "torch-compile",
    "torch-math",
    "sdpa-flash",
    "sdpa-efficient",
    "sdpa-cudnn",
    "xformers",
)
VARIANT_ORDER = (
    "dit-torch",
    "dit-torch-compile",
    "dit-fastmask",
    "maskdit-torch",
    "maskdit-torch-compile",
    "maskdit-fastmask",
    "maskdit-fastmask-compile",
    "maskdit-torch-graph",
    "maskdit-fastmask-graph",
)
VARIANT_LABEL = {
    "dit-torch": "DiT, PyTorch eager (SDPA)",
    "dit-torch-compile": "DiT, PyTorch + torch.compile",
    "dit-fastmask": "DiT, fastmask kernels",
    "maskdit-torch": "MaskDiT, PyTorch reference eager",
    "maskdit-torch-compile": "MaskDiT, reference + torch.compile",
    "maskdit-fastmask": "MaskDiT, fastmask kernels",
    "maskdit-fastmask-compile": "MaskDiT, fastmask + torch.compile",
    "maskdit-fastmask-graph": "MaskDiT, fastmask, step as one CUDA graph",
    "maskdit-torch-graph": "MaskDiT, reference, step as one CUDA graph",
}


def load(paths) -> list[dict]:
    docs = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            d = json.loads(f.read_text())
            if "results" in d:
                d["_path"] = str(f)
                docs.append(d)
    return docs


def _ok(rows, **kw):
    return [r for r in rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in kw.items())]


def _fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _pct(x):
    return "-" if x is None else f"{x:.0f}%"


def header(doc: dict) -> list[str]:
    e, c = doc.get("env", {}), doc.get("ceilings", {})
    commit = (e.get("commit") or "?")[:10] + (" (dirty)" if e.get("dirty") else "")
    lines = [
        f"Measured on **{e.get('device')}** ({e.get('dtype')}), torch {e.get('torch')}, triton {e.get('triton')}, "
        f"CUDA {e.get('cuda')}, Python {e.get('python')}; commit {commit}; {e.get('date')}; mode `{e.get('mode')}`"
        + (f", {e.get('torch_threads')} CPU thread(s)" if e.get("device_type") == "cpu" else "")
        + "."
    ]
    if c:
        lines.append(
            f"Ceilings measured in the same run: copy {c['copy_gbps']:.0f} GB/s, "
            f"{c['matmul_dtype']} matmul (n={c['matmul_n']}) {c['matmul_tflops']:.3g} TFLOP/s."
        )
    return lines


def _input_label(r) -> str:
    s, c = r["input_size"], r.get("in_channels", 4)
    return f"{s * 8}px ({s}x{s}x4 latent)" if c == 4 else f"{s}x{s}x{c} input"


def _table_head(*columns: str) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def train_table(rows) -> list[str]:
    steps = _ok(rows, kind="train_step")
    if not steps:
        return []
    out = _table_head("model", "variant", "input", "batch", "mask ratio", "step (ms)", "images/s", "vs DiT",
                      "peak mem (GiB)", "MFU", "ops ran on")
    groups = sorted({(r["config"], r["input_size"], r["batch"]) for r in steps}, key=lambda g: (g[1], g[0]))
    for g in groups:
        rs = [r for r in steps if (r["config"], r["input_size"], r["batch"]) == g]
        base = next((r for r in rs if r["variant"] == "dit-torch"), None)
        rs.sort(key=lambda r: (VARIANT_ORDER.index(r["variant"]) if r["variant"] in VARIANT_ORDER else 99, r["mask_ratio"]))
        for r in rs:
            vs = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
            mfu = f"{r['mfu_pct']:.1f}%" if r.get("mfu_pct") is not None else "-"
            model = ("MaskDiT-" if r["model"] == "maskdit" else "DiT-") + r["config"]
            out.append(
                f"| {model} | {VARIANT_LABEL.get(r['variant'], r['variant'])} | {_input_label(r)} "
                f"| {r['batch']} | {r['mask_ratio']} | {_fmt_ms(r['median_ms'])} | {r['images_per_s']:.1f} | {vs} | {mem} | {mfu} "
                f"| {_ran_on(r.get('backends'))} |"
            )
    return out


def _ran_on(backends: dict | None) -> str:
    """'triton' when every op ran on one backend, else 'attention=triton, loss=torch, ...'."""
    if not backends:
        return "-"
    names = set(backends.values())
    if len(names) == 1:
        return names.pop()
    return ", ".join(f"{op}={b}" for op, b in sorted(backends.items()))


def attention_lines(rows) -> list[str]:
    """Attention at the headline shape against the SDPA kernels: % of the measured matmul rate
    and % of the copy bandwidth (the bytes of q, k, v, out and their gradients)."""
    hs = headline_shape(rows)
    sel = [r for r in _ok(rows, kind="op", op="attention") if (r["config"], r["input_size"], r["batch"]) == hs]
    if not sel:
        return []
    out = ["Attention at the headline shape (what ran; TFLOP/s and % of the matmul rate; GB/s and % of the copy bandwidth):",
           ""] + _table_head("stage", "shape", "mode", "provider", "ran", "median ms", "GPU ms", "TFLOP/s", "% matmul", "GB/s",
                      "% copy")
    order = {p: i for i, p in enumerate(PROVIDER_ORDER)}
    for r in sorted(sel, key=lambda r: (r["stage"], ("forward", "backward", "full").index(r["mode"]), order.get(r["provider"], 99))):
        out.append(
            f"| {r['stage']} | {_shape_label(r)} | {r['mode']} | {r['provider']} | {r.get('ran', '-')} | {_fmt_ms(r['median_ms'])} "
            f"| {_fmt_ms(r.get('gpu_ms'))} | {r.get('tflops', 0):.1f} | {_pct(r.get('pct_matmul'))} | {r.get('gbps', 0):.0f} | {_pct(r.get('pct_copy_bw'))} |"
        )
    return out


def masked_lines(doc) -> list[str]:
    out = []
    for m in doc.get("summary", {}).get("train", {}).get("masked_speedup", []):
        out.append(
            f"- masked vs unmasked step, {m['variant']} {m['config']} ({m['input_size']}x{m['input_size']} input, batch "
            f"{m['batch']}): {m['step_ms_ratio_0.0']:.1f} ms at ratio 0.0 vs {m['step_ms_ratio_0.5']:.1f} ms at 0.5: "
            f"**{m['speedup']:.2f}x** faster masked"
        )
    return out


def headline_shape(rows):
    """(config, input_size, batch) of the first op row: the suite runs the headline shape first."""
    ops = [r for r in rows if r.get("kind") == "op"]
    if not ops:
        return None
    r = ops[0]
    return r["config"], r["input_size"], r["batch"]


def _shape_label(r) -> str:
    d = r.get("dims") or {}
    keys = [k for k in ("B", "L", "N", "K", "H", "hd", "D", "P") if k in d]
    return " ".join(f"{k}={d[k]}" for k in keys)


def op_table(rows, mode="full") -> list[str]:
    hs = headline_shape(rows)
    if hs is None:
        return []
    sel = [
        r
        for r in _ok(rows, kind="op", mode=mode)
        if (r["config"], r["input_size"], r["batch"]) == hs and r.get("mask_ratio") in (0.5, None)
    ]
    if not sel:
        return []
    providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in sel)]
    # kernel time: GPU ms by CUDA-graph replay where the run measured it (a wall-clock median of
    # a small op is mostly the host's launch cost), else the wall-clock median
    graphed = all(r.get("gpu_ms") for r in sel)
    what = "GPU ms by CUDA-graph replay" if graphed else "median ms"

    def ms(r):
        return r["gpu_ms"] if graphed else r["median_ms"]

    keys = []
    for r in sel:
        k = (r["op"], r["stage"])
        if k not in keys:
            keys.append(k)
    out = [
        f"Per op, {hs[0]} at {hs[1] * 8}px (batch {hs[2]}, mask ratio 0.5 where it matters), `{mode}` mode"
        + (" (forward + backward)" if mode == "full" else "") + f": {what} (% of roofline: copy bandwidth for memory-bound ops, "
        "matmul rate for attention).",
        "",
        "| op | shape | " + " | ".join(providers) + " | fastmask vs torch | vs torch.compile |",
        "|---|---|" + "---|" * len(providers) + "---|---|",
    ]
    for op, stage in keys:
        rs = {r["provider"]: r for r in sel if (r["op"], r["stage"]) == (op, stage)}
        any_r = next(iter(rs.values()))
        cells = []
        for p in providers:
            r = rs.get(p)
            cells.append("-" if r is None else f"{_fmt_ms(ms(r))} ({_pct(r.get('roofline_pct'))})")
        fm = [r for p, r in rs.items() if p.startswith("fastmask")]
        best = min(fm, key=ms) if fm else None
        sp = lambda base: f"{ms(rs[base]) / ms(best):.2f}x" if best and base in rs else "-"  # noqa: E731
        out.append(f"| {op} ({stage}) | {_shape_label(any_r)} | " + " | ".join(cells) + f" | {sp('torch')} | {sp('torch-compile')} |")
    return out


def all_ops_table(rows) -> list[str]:
    ops = _ok(rows, kind="op")
    if not ops:
        return []
    out = _table_head("op", "stage", "config", "px", "ratio", "shape", "mode", "provider", "ran", "median ms",
                      "p20-p80 ms", "GPU ms", "GB/s", "TFLOP/s", "% roofline")
    for r in ops:
        gb = f"{r['gbps']:.0f}" if r.get("gbps") else "-"
        tf = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        out.append(
            f"| {r['op']} | {r['stage']} | {r['config']} | {r['res']} | {r.get('mask_ratio', '-')} | {_shape_label(r)} | {r['mode']} "
            f"| {r['provider']} | {r.get('ran', '-')} | {_fmt_ms(r['median_ms'])} | {_fmt_ms(r.get('p20_ms'))}-{_fmt_ms(r.get('p80_ms'))} "
            f"| {_fmt_ms(r.get('gpu_ms'))} | {gb} | {tf} | {_pct(r.get('roofline_pct'))} |"
        )
    return out


def status_lines(rows) -> list[str]:
    counts = {}
    for r in rows:
        counts[r.get("status")] = counts.get(r.get("status"), 0) + 1
    out = [f"Cases: {', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}."]
    failed = [r for r in rows if r.get("status") == "failed"]
    for r in failed[:30]:
        what = r.get("test") or r.get("op") or r.get("variant")
        out.append(f"- FAILED {what}: {str(r.get('error', '')).splitlines()[0][:300]}")
    if len(failed) > 30:
        out.append(f"- ... and {len(failed) - 30} more failures")
    return out


def extra_sections(doc) -> list[str]:
    """Stages of a GPU-script run (build, tests), when the JSON has them."""
    out = []
    for st in doc.get("stages", []):
        extra = f" ({st['detail']})" if st.get("detail") else ""
        out.append(f"- stage `{st['name']}`: {st['status']} in {st.get('seconds', 0):.0f} s{extra}")
    return out


def markdown(docs, all_ops=False) -> str:
    parts = []
    for doc in docs:
        rows = doc["results"]
        parts += header(doc) + [""]
        st = extra_sections(doc)
        if st:
            parts += st + [""]
        t = train_table(rows)
        if t:
            parts += ["Training step (forward + backward + AdamW):", ""] + t + [""]
        m = masked_lines(doc)
        if m:
            parts += m + [""]
        for mode in ("full", "forward", "backward"):  # the GPU script's headline stage: forward, backward
            o = op_table(rows, mode)
            if o:
                parts += o + [""]
        a = attention_lines(rows)
        if a:
            parts += a + [""]
        if all_ops:
            a = all_ops_table(rows)
            if a:
                parts += ["All op measurements:", ""] + a + [""]
        parts += status_lines(rows) + [""]
    return "\n".join(parts).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots
def plots(docs, outdir: Path, prefix: str = "") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    rows = [r for d in docs for r in d["results"]]
    device = docs[0].get("env", {}).get("device", "") if docs else ""

    # 1. speedup against mask ratio: training steps (vs DiT eager) and ops (fastmask vs torch)
    steps = _ok(rows, kind="train_step")
    hs = headline_shape(rows)
    op_rows = [r for r in _ok(rows, kind="op", mode="full") if hs and (r["config"], r["input_size"], r["batch"]) == hs]
    op_series = {}
    for r in op_rows:
        if r.get("mask_ratio") is None or not r["provider"].startswith("fastmask"):
            continue
        base = next(
            (
                b
                for b in op_rows
                if b["provider"] == "torch" and (b["op"], b["stage"], b.get("mask_ratio")) == (r["op"], r["stage"], r["mask_ratio"])
            ),
            None,
        )
        if base:
            key = f"{r['op']} ({r['stage']}, {r['provider'].split('-')[1]})"
            op_series.setdefault(key, []).append((r["mask_ratio"], base["median_ms"] / r["median_ms"]))
    train_series = {}
    for g in sorted({(r["config"], r["input_size"], r["batch"]) for r in steps}):
        rs = [r for r in steps if (r["config"], r["input_size"], r["batch"]) == g]
        base = next((r for r in rs if r["variant"] == "dit-torch"), None)
        if not base:
            continue
        for r in rs:
            if r["model"] == "maskdit":
                key = f"{r['variant']} {g[0]} {_input_label(r).split(' (')[0]}"
                train_series.setdefault(key, []).append((r["mask_ratio"], base["median_ms"] / r["median_ms"]))
    panels = [(s, t) for s, t in ((train_series, "training step, speedup over DiT eager"), (op_series, "ops (fwd+bwd), fastmask over torch eager")) if s]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        for ax, (series, title) in zip(axes[0], panels):
            for key, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("mask ratio")
            ax.set_ylabel("speedup (x)")
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.suptitle(f"fastmask: speedup vs mask ratio ({device})", fontsize=11)
        fig.tight_layout()
        p = outdir / f"{prefix}speedup_vs_mask_ratio.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    # 2. per-op % of roofline at the headline shape (full mode), one bar per provider
    sel = [r for r in op_rows if r.get("mask_ratio") in (0.5, None) and r.get("roofline_pct") is not None]
    if sel:
        keys = []
        for r in sel:
            if (r["op"], r["stage"]) not in keys:
                keys.append((r["op"], r["stage"]))
        providers = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in sel)]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(keys) * max(1, len(providers)) / 2 + 1.5))
        h = 0.8 / len(providers)
        for j, prov in enumerate(providers):
            ys, xs = [], []
            for i, k in enumerate(keys):
                r = next((r for r in sel if (r["op"], r["stage"]) == k and r["provider"] == prov), None)
                if r:
                    ys.append(i + j * h)
                    xs.append(r["roofline_pct"])
            ax.barh(ys, xs, height=h, label=prov)
        ax.set_yticks([i + 0.4 - h / 2 for i in range(len(keys))])
        ax.set_yticklabels([f"{o} ({s})" for o, s in keys], fontsize=8)
        ax.invert_yaxis()
        mm = (docs[0].get("ceilings") or {}).get("matmul_dtype", "")
        ax.set_xlabel(f"% of roofline (copy bandwidth; attention: {mm} matmul rate)")
        ax.set_title(f"Per-op roofline, {hs[0]} {hs[1] * 8}px, fwd+bwd ({device})", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        p = outdir / f"{prefix}roofline.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)
    return written


README_BEGIN = "<!-- benchmarks/report.py: begin -->"
README_END = "<!-- benchmarks/report.py: end -->"


def update_readme(path: Path, md: str) -> None:
    """Put ``md`` between the two marker lines of ``path`` (the results section of a README)."""
    text = path.read_text()
    i, j = text.find(README_BEGIN), text.find(README_END)
    if i < 0 or j < i:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} section")
    path.write_text(text[: i + len(README_BEGIN)] + "\n" + md.rstrip() + "\n" + text[j:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="result JSON files (or folders of them)")
    ap.add_argument("--md", help="write the markdown here (it is always printed)")
    ap.add_argument("--plots", help="folder for the PNG plots")
    ap.add_argument("--prefix", default="", help="prefix of the plot file names (e.g. the JSON's stem + '_')")
    ap.add_argument("--all-ops", action="store_true", help="also list every op measurement")
    ap.add_argument("--readme", help=f"replace the text between {README_BEGIN} and {README_END} in this file with the table")
    args = ap.parse_args(argv)
    docs = load(args.json)
    if not docs:
        print("report: no result JSON found", file=sys.stderr)
        return 1
    md = markdown(docs, all_ops=args.all_ops)
    if args.md:
        Path(args.md).write_text(md)
    if args.readme:
        try:
            update_readme(Path(args.readme), md)
        except (OSError, ValueError) as e:
            print(f"report: --readme: {e}", file=sys.stderr)
            return 2
    if args.plots:
        for p in plots(docs, Path(args.plots), args.prefix):
            print(f"plot: {p}", file=sys.stderr)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

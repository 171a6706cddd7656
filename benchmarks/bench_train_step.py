"""End-to-end training step: forward, backward, AdamW step (bf16 autocast on a GPU).

Variants (same config, input size and batch within a group):
    dit-torch                 plain DiT, eager, torch backend (attention = SDPA)
    dit-torch-compile         the same under torch.compile
    maskdit-torch             MaskDiT, reference ops, eager
    maskdit-torch-compile     the same under torch.compile (regional: every block compiled)
    maskdit-fastmask          MaskDiT with the fused kernels (automatic backend)
    maskdit-fastmask-compile  the same under torch.compile
    maskdit-fastmask-graph    the fused kernels, the whole step one CUDA graph (the trainer's
                              helper fastmask.step_graph; CPU dry run: its emulation)
    maskdit-torch-graph       the reference ops, one CUDA graph
Each at mask ratio 0.5 (MaskDiT's published ratio); lower-priority rows add other ratios
(0, 0.25, 0.75: speedup against mask ratio) and DiT with the fused kernels.

Each row: step time (median, 20/80 % quantiles), images/s, host-issue ms and GPU ms per step
(torch.profiler over 3 steps: CPU self time vs summed kernel time), peak memory, model FLOPs per step
(``fastmask.models.count_flops``: 3x the forward's matmul + attention FLOPs) and MFU
against the bf16 matmul rate measured in the same session. On the CPU the headline is the
masked (0.5) vs unmasked (0.0) step-time ratio of a small MaskDiT (reference backend).
"""
from __future__ import annotations

import dataclasses
import gc
import os
import time

import pytest
import torch

from benchmarks import common
from benchmarks.setups import build_training
from fastmask.models import ARCHITECTURES


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    model: str  # maskdit | dit
    backend: str  # torch | auto
    compile: str | None  # None | blocks | model
    graph: bool = False  # the whole step as one CUDA graph


VARIANTS = {
    v.name: v
    for v in (
        Variant("dit-torch", "dit", "torch", None),
        Variant("dit-torch-compile", "dit", "torch", "blocks"),
        Variant("maskdit-torch", "maskdit", "torch", None),
        Variant("maskdit-torch-compile", "maskdit", "torch", "blocks"),
        Variant("maskdit-fastmask", "maskdit", "auto", None),
        Variant("maskdit-fastmask-compile", "maskdit", "auto", "blocks"),
        Variant("dit-fastmask", "dit", "auto", None),
        Variant("maskdit-fastmask-graph", "maskdit", "auto", None, graph=True),
        Variant("maskdit-torch-graph", "maskdit", "torch", None, graph=True),
    )
}
MAIN = ("dit-torch", "maskdit-torch", "maskdit-torch-compile", "maskdit-fastmask", "maskdit-fastmask-compile")
# The headline rows (the first setting, the GPU script's "train" stage), most valuable first:
# what fastmask does, the two baselines of the targets (DiT-XL/2 eager, MaskDiT compiled),
# then the rest of the comparison. Compiled rows of the first setting come before any row of
# a larger one.
# Every other registered model family (token routing: TREAD, SPRINT, MicroDiT, ...) gets a row
# with the fused kernels, eager, at its own mask ratio, after the headline rows: against DiT in
# the same run.
FAMILIES = tuple(f for f in ARCHITECTURES if f not in ("maskdit", "dit"))
for _f in FAMILIES:
    VARIANTS[f"{_f}-fastmask"] = Variant(f"{_f}-fastmask", _f, "auto", None)
HEADLINE = ("maskdit-fastmask", "maskdit-fastmask-graph", "dit-torch", "maskdit-torch-graph",
            "maskdit-fastmask-compile", "maskdit-torch-compile", "maskdit-torch", "dit-torch-compile",
            *(f"{f}-fastmask" for f in FAMILIES))


def ratio_of(name: str) -> float:
    """The mask ratio a variant's row runs at: 0 for a family without masking, a family's own
    registered ratio, else MaskDiT's 0.5."""
    arch = ARCHITECTURES[VARIANTS[name].model]
    return float(arch.train_defaults.get("mask_ratio", 0.5)) if arch.masks else 0.0


@dataclasses.dataclass(frozen=True)
class Setting:
    config: str
    input_size: int
    batch: int
    in_channels: int = 4
    num_classes: int = 1000
    warmup: int = 2
    steps: int = 5

    def shape_kwargs(self) -> dict:
        """The arguments of :func:`benchmarks.setups.build_training` this setting fixes."""
        return {k: getattr(self, k) for k in ("input_size", "batch", "in_channels", "num_classes")}


def settings() -> list[tuple[Setting, tuple[tuple[str, float], ...], tuple[tuple[str, float], ...]]]:
    """[(setting, main (variant, ratio) pairs, extra pairs)] of this run's size set."""
    main = tuple((v, ratio_of(v)) for v in MAIN)
    headline = tuple((v, ratio_of(v)) for v in HEADLINE)
    families = tuple((f"{f}-fastmask", ratio_of(f"{f}-fastmask")) for f in FAMILIES)
    ratios = (("maskdit-fastmask", 0.0), ("maskdit-fastmask", 0.25), ("maskdit-fastmask", 0.75))
    ratios_ref = (("maskdit-torch", 0.0), ("maskdit-torch", 0.25), ("maskdit-torch", 0.75))
    sset = common.size_set()
    if sset == "dry":
        return [(Setting("T/2", 8, 4, warmup=1, steps=2), headline, (("maskdit-torch", 0.0),))]
    if sset == "cpu":
        # the no-download default's scale: ~1.5M parameters, 16x16 inputs, batch 128
        s = Setting("Digits/2", 16, 128, in_channels=1, num_classes=10, warmup=1, steps=5)
        return [(s, (("maskdit-torch", 0.5), ("maskdit-torch", 0.0), ("dit-torch", 0.0)) + families, ratios_ref[1:] + main)]
    if sset == "quick":
        return [
            (Setting("XL/2", 32, 64, warmup=2, steps=5), headline, ratios + (("maskdit-torch", 0.0), ("dit-fastmask", 0.0))),
            (Setting("XL/2", 64, 16, warmup=2, steps=5), main, ()),
        ]
    return [
        (Setting("XL/2", 32, 128, warmup=3, steps=10), headline, ratios + ratios_ref + (("dit-fastmask", 0.0),)),
        (Setting("XL/2", 64, 32, warmup=3, steps=10), main, ratios + (("maskdit-torch", 0.0), ("dit-fastmask", 0.0))),
    ]


@dataclasses.dataclass(frozen=True)
class StepCase:
    setting: Setting
    variant: Variant
    mask_ratio: float
    priority: tuple = ()
    headline: bool = False  # one of the first setting's main rows (FASTMASK_BENCH_PART)

    @property
    def id(self) -> str:
        s = self.setting
        return f"{self.variant.name}-{s.config.replace('/', '')}-{s.input_size * 8}px-b{s.batch}-r{int(round(self.mask_ratio * 100)):02d}"

    def row(self) -> dict:
        s, v = self.setting, self.variant
        return {
            "kind": "train_step",
            "variant": v.name,
            "model": v.model,
            "backend": v.backend,
            "compile": v.compile,
            "cuda_graph": v.graph,
            "config": s.config,
            "input_size": s.input_size,
            "res": s.input_size * 8,
            "batch": s.batch,
            "in_channels": s.in_channels,
            "mask_ratio": self.mask_ratio,
            "amp": "bf16" if common.on_gpu() else None,
        }


def build_cases() -> list[StepCase]:
    cases, seen = [], set()
    sets = settings()
    for rank, (s, main, extra) in enumerate(sets):
        for tier, pairs in ((0, main), (1, extra)):
            for name, r in pairs:
                if (s, name, r) in seen:
                    continue
                seen.add((s, name, r))
                # the first setting's main rows in their listed order, then the other settings'
                # main rows, then the extras (eager before compiled)
                v = VARIANTS[name]
                head = rank == 0 and tier == 0
                prio = (100, rank, len(cases)) if tier == 0 else (101, int(bool(v.compile)), rank, len(cases))
                cases.append(StepCase(s, v, r, priority=prio, headline=head))
    return cases


CASES = build_cases()


def _free():
    gc.collect()
    if common.on_gpu():
        torch.cuda.empty_cache()


@pytest.mark.bench_case
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_train_step(case: StepCase, benchmark, ceilings, bench_env, result_row):
    v, s = case.variant, case.setting
    if v.compile and common.compile_allowed():
        pytest.skip(common.compile_allowed())
    if v.backend == "auto" and not common.on_gpu():
        pytest.skip("no GPU: the automatic backend runs the torch reference here (the *-torch rows)")
    if v.graph and not common.on_gpu():
        if common.size_set() != "dry":
            pytest.skip("no GPU: CUDA graphs need CUDA")
        from fastmask import step_graph  # the dry run takes the graph rows' path in the CPU emulation

        step_graph.CPU_EMULATION = True
    scope = os.environ.get("FASTMASK_BENCH_COMPILE_SCOPE", "blocks") if v.compile else None
    torch._dynamo.reset()
    _free()
    if common.on_gpu():
        torch.cuda.reset_peak_memory_stats()
    ts = None
    try:
        ts = build_training(
            s.config, model=v.model, mask_ratio=case.mask_ratio, backend=v.backend, device=common.device(),
            compile=scope, graph=v.graph, **s.shape_kwargs(),
        )
        params = sum(p.numel() for p in ts.model.parameters())
        flops = ts.flops()
        with common.record_backends() as ran:  # which backend each op really ran on
            t0 = time.perf_counter()
            for _ in range(s.warmup):  # includes torch.compile's compile time
                ts.step()
            common.sync()
            warmup_s = time.perf_counter() - t0
            timed = common.RoundTimer(ts.step)
            benchmark.pedantic(timed, rounds=s.steps, iterations=1, warmup_rounds=0)
        stats = common.summarize(timed.times_ms())
        try:
            prof = common.profile_step_ms(ts.step, steps=3)
        except Exception as e:  # the profiler must not lose the row
            prof = {"host_issue_ms": None, "gpu_ms": None, "profile_error": f"{type(e).__name__}: {str(e)[:200]}"}
        timed = None  # it holds ts.step, hence the model: let the finally free it
        peak = torch.cuda.max_memory_allocated() / 2**30 if common.on_gpu() else None
    except torch.cuda.OutOfMemoryError as e:
        ts = None
        pytest.skip(f"out of memory at batch {s.batch}: {str(e)[:200]}")
    finally:
        del ts
        torch._dynamo.reset()
        _free()
    step_s = stats["median_ms"] * 1e-3
    tflops = flops["train_step"] / step_s / 1e12
    result_row.update(stats)
    result_row.update(
        compile=scope,
        params=params,
        warmup_s=warmup_s,
        images_per_s=s.batch / step_s,
        **prof,
        peak_mem_gib=peak,
        flops=flops["train_step"],
        tflops=tflops,
        mfu_pct=100.0 * tflops / ceilings["matmul_tflops"],
        tokens=flops.get("tokens"),  # DiT and MaskDiT (counted by formula); traced families: none
        backends=common.backends_field(ran),
        attn_autotune=os.environ.get("FASTMASK_ATTN_AUTOTUNE", "1") != "0",
    )
    benchmark.extra_info.update(case.row())
    benchmark.extra_info.update({k: v for k, v in result_row.items() if k != "tokens"})
    benchmark.extra_info.update(
        {k: bench_env.get(k) for k in ("device", "torch", "triton", "cuda", "commit", "date")}
    )

"""One training step as one CUDA graph: warm-up, capture and replay of a step function.

:class:`StepGraph` keeps one captured graph per shape key (the kept-token count K of a mask
ratio, the phase), up to ``max_graphs``; a step function reads only static tensors (input
buffers the caller fills with :meth:`StepGraph.inputs`, parameters, optimizer state, device
scalars such as the lr) and writes its results into tensors that outlive it. Its first
``warmup`` calls for a key run eagerly on a side stream (real steps, as PyTorch's CUDA-graph
documentation asks before a capture); the next one captures the function with
:func:`torch.cuda.graph` and replays it, which performs that step; later ones only replay.

``mode="emulate"`` is a CPU stand-in for tests: capture records the function without running
it and a replay runs it again on the same static buffers, so the trainer's plumbing (what is
copied in, what is updated in place, when) is checked on a machine without a GPU.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch
from torch import Tensor

MODES = ("cuda", "emulate")


class StepGraph:
    """Captured step functions, one per shape key, at most ``max_graphs`` keys. Every graph
    allocates from one memory pool, so that several shapes cost about one step's activations,
    not several: safe because replays never overlap and a replay writes every pool tensor
    before it reads it (what outlives a step lives outside the pool)."""

    def __init__(self, mode: str = "cuda", *, warmup: int = 2, max_graphs: int = 4):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if mode == "cuda" and not torch.cuda.is_available():
            raise ValueError("mode: 'cuda' needs a CUDA device; use mode='emulate' on the CPU")
        if warmup < 1:
            raise ValueError(f"warmup: expected at least 1 eager call before a capture, got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs: expected at least 1, got {max_graphs}")
        self.mode, self.warmup, self.max_graphs = mode, warmup, max_graphs
        self._buffers: dict[Hashable, dict[str, Tensor | None]] = {}
        self._calls: dict[Hashable, int] = {}
        self._graphs: dict[Hashable, object] = {}
        self._pool = None
        self._side = None
        self.failed: dict[Hashable, str] = {}  # keys whose capture failed (they run eagerly), and why
        self.captures = 0  # graphs captured so far
        self.replays = 0  # steps run by a replay (the capture's own replay included)

    def has_room(self, key: Hashable) -> bool:
        """Whether ``key`` has, or can still get, its own graph."""
        return key in self._buffers or len(self._buffers) < self.max_graphs

    def inputs(self, key: Hashable, **values: Tensor | None) -> dict[str, Tensor | None]:
        """The static input buffers of ``key``, with ``values`` copied into them (allocated like
        them on the key's first call). None stays None: a key fixes which inputs exist."""
        bufs = self._buffers.get(key)
        if bufs is None:
            if not self.has_room(key):
                raise ValueError(f"key: {key!r} is new and all {self.max_graphs} graphs are taken")
            bufs = {k: (None if v is None else torch.empty_like(v)) for k, v in values.items()}
            self._buffers[key] = bufs
            self._calls[key] = 0
        if set(bufs) != set(values):
            raise ValueError(f"values: expected the inputs {sorted(bufs)} of key {key!r}, got {sorted(values)}")
        for k, v in values.items():
            b = bufs[k]
            if (b is None) != (v is None) or (b is not None and (b.shape != v.shape or b.dtype != v.dtype)):
                raise ValueError(f"{k}: expected {None if b is None else (tuple(b.shape), b.dtype)} for key {key!r}, "
                                 f"got {None if v is None else (tuple(v.shape), v.dtype)}")
            if b is not None:
                b.copy_(v, non_blocking=True)
        return bufs

    def run(self, key: Hashable, fn: Callable[[], None]) -> str:
        """One step of ``key``: an eager warm-up call, the capture (then its replay) or a replay.
        ``fn`` is used only up to the capture; a replay runs what was captured. A capture that
        raises (an op waiting for the host, say) leaves ``key`` eager, with the reason in
        :attr:`failed`. Returns what was done: "warmup", "capture", "replay", "failed" (that
        step ran eagerly) or "eager"."""
        if key not in self._buffers:
            raise ValueError(f"key: fill the inputs of {key!r} (StepGraph.inputs) before running it")
        graph = self._graphs.get(key)
        if graph is not None:
            self._replay(graph)
            return "replay"
        if key in self.failed:
            self._warm(fn)
            return "eager"
        self._calls[key] += 1
        if self._calls[key] <= self.warmup:
            self._warm(fn)
            return "warmup"
        try:
            graph = self._capture(fn)
        except RuntimeError as e:  # e.g. an op that waits for the host: this key runs eagerly
            self.failed[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            self._warm(fn)  # a failed capture ran nothing: the step itself, eagerly
            return "failed"
        self._graphs[key] = graph
        self.captures += 1
        self._replay(graph)
        return "capture"

    # ---- the two modes
    def _warm(self, fn) -> None:
        if self.mode == "emulate":
            fn()
            return
        side = self._side = self._side or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, fn):
        if self.mode == "emulate":
            return fn  # recorded, not run: a capture performs no work
        torch.cuda.synchronize()  # the warm-up's side stream is done before a capture begins
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        if self._pool is None:
            self._pool = graph.pool()
        return graph

    def _replay(self, graph) -> None:
        self.replays += 1
        if self.mode == "emulate":
            graph()
        else:
            graph.replay()

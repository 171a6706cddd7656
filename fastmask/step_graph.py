"""One training step as a CUDA graph: capture once per shape key, replay per step.

:class:`StepGraphs` runs a step function ``fn(**buffers)`` whose every effect is in place (on
parameters, gradients, optimizer state, EMA weights and on-device accumulators the caller
allocated outside the graph). Per key (whatever changes the shapes: the kept-token count K,
phase 2's ratio 0), it keeps static input buffers; the caller's tensors are copied into them
before each run. The first run of a key is eager, on a side stream (the warm-up the PyTorch
CUDA-graphs notes ask for: lazy state such as the optimizer's is created outside the capture),
and does the step's real work; the second run captures the graph and replays it; later runs
replay. No step runs twice, so a graphed run equals an eager one step for step.

``CPU_EMULATION`` (tests only): on the CPU, "capture" records ``fn`` and "replay" re-runs it
on the static buffers, so that the buffer plumbing, the key cache and the trainer's use of them
are tested without a GPU.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

CPU_EMULATION = False  # tests: emulate capture/replay on the CPU


def unavailable_reason(device: torch.device) -> str | None:
    """Why a step cannot be graphed on ``device`` (None: it can)."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and CPU_EMULATION:
        return None
    return f"the device is {device.type}, not CUDA"


class StepGraphs:
    """Captured steps by key, at most ``max_graphs`` of them (all share one memory pool, and are
    replayed one at a time on one stream); a key beyond that runs eagerly, said once through
    ``say``."""

    def __init__(self, device, *, max_graphs: int = 3, say: Callable[[str], None] | None = None):
        self.device = torch.device(device)
        reason = unavailable_reason(self.device)
        if reason is not None:
            raise ValueError(f"device: cannot capture a CUDA graph: {reason}")
        self.emulated = self.device.type != "cuda"
        self.max_graphs = int(max_graphs)
        self.say = say or (lambda msg: None)
        self._static: dict = {}  # key -> {name: buffer or None}
        self._graphs: dict = {}  # key -> CUDAGraph (or the recorded fn when emulated)
        self._pool = None
        self._said_full = False
        self.counts = {"warmup": 0, "capture": 0, "replay": 0, "eager": 0}

    def __len__(self) -> int:
        return len(self._graphs)

    def _fill(self, key, inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        static = self._static.get(key)
        if static is None:
            static = {n: (None if t is None else torch.empty_like(t, memory_format=torch.contiguous_format))
                      for n, t in inputs.items()}
        if static.keys() != inputs.keys():
            raise ValueError(f"inputs: expected the names {sorted(static)}, got {sorted(inputs)}")
        for n, t in inputs.items():
            s = static[n]
            if (s is None) != (t is None) or (t is not None and (s.shape != t.shape or s.dtype != t.dtype)):
                raise ValueError(f"{n}: a different shape or dtype under the same key {key!r}")
            if t is not None:
                s.copy_(t, non_blocking=True)
        return static

    def run(self, key, fn: Callable[..., None], inputs: dict[str, Tensor | None]) -> str:
        """Run the step for ``key`` on ``inputs`` (copied into the key's buffers); returns what it
        did: "warmup", "capture" (captured and replayed), "replay" or "eager"."""
        if key not in self._static and len(self._static) >= self.max_graphs:
            if not self._said_full:
                self._said_full = True
                self.say(f"fastmask: step graphs: more than {self.max_graphs} step shapes; the new ones run "
                         "eagerly (no CUDA graph)")
            fn(**inputs)
            self.counts["eager"] += 1
            return "eager"
        warm = key in self._static
        static = self._fill(key, inputs)
        self._static[key] = static
        if not warm:  # the real step, eagerly: lazy state is created outside the capture
            if self.emulated:
                fn(**static)
            else:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    fn(**static)
                torch.cuda.current_stream(self.device).wait_stream(side)
            self.counts["warmup"] += 1
            return "warmup"
        graph = self._graphs.get(key)
        what = "replay"
        if graph is None:
            what = "capture"
            if self.emulated:
                graph = fn  # the "graph" is the recorded function, re-run on the same buffers
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    fn(**static)
                self._pool = graph.pool()
            self._graphs[key] = graph
            self.counts["capture"] += 1
        if self.emulated:
            graph(**static)
        else:
            graph.replay()
        self.counts["replay"] += 1
        return what

"""Training setups of the benchmark suite: a model, its optimizer and one fixed random batch.

``build_training(...).step()`` runs one training step (forward, backward, AdamW step; bf16
autocast on a GPU); ``.flops()`` is its model FLOP count (:func:`fastmask.models.count_flops`).
With ``graph=True`` the step runs as one CUDA graph through the trainer's helper
(:class:`fastmask.step_graph.StepGraph`; its CPU emulation off a GPU) with a capturable AdamW.
``fastmask profile`` builds its own step (the package does not import ``benchmarks``).
"""
from __future__ import annotations

import dataclasses

import torch

import fastmask
from fastmask import ops
from fastmask.models import EDMPrecond, compile_model, count_flops, dit, maskdit
from fastmask.step_graph import StepGraph

__all__ = ["TrainSetup", "build_training", "compile_model"]


@dataclasses.dataclass
class TrainSetup:
    """A model, its optimizer and one fixed batch: ``step()`` runs one training step."""

    model: torch.nn.Module  # EDMPrecond
    opt: torch.optim.Optimizer
    y: torch.Tensor
    labels: torch.Tensor
    mask_ratio: float
    backend: str
    amp: bool
    device: torch.device
    graph: StepGraph | None = None
    _loss: torch.Tensor | None = None

    def step(self) -> torch.Tensor:
        if self.graph is not None:
            b = self.graph.inputs("step", y=self.y, labels=self.labels)
            self.graph.run("step", lambda: self._graph_body(b))
            return self._loss
        with fastmask.backend(self.backend):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.model.loss(self.y, self.labels, mask_ratio=self.mask_ratio).mean()
            loss.backward()
        with torch.profiler.record_function("fastmask.optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _graph_body(self, b: dict) -> None:
        """The captured step: as :meth:`step`, with the grads allocated inside the graph and
        autocast's weight cache off (as in the trainer's step graph)."""
        self.opt.zero_grad(set_to_none=True)
        with fastmask.backend(self.backend), ops.checks.trusted_values():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
                loss = self.model.loss(b["y"], b["labels"], mask_ratio=self.mask_ratio).mean()
            loss.backward()
        self.opt.step()
        self._loss = loss.detach()

    def flops(self) -> dict:
        return count_flops(self.model, self.y.shape[0], self.mask_ratio)


def build_training(
    config: str = "XL/2",
    *,
    model: str = "maskdit",
    input_size: int = 32,
    batch: int = 8,
    in_channels: int = 4,
    num_classes: int = 1000,
    mask_ratio: float = 0.5,
    backend: str = "auto",
    device: str | torch.device | None = None,
    amp: bool | None = None,
    compile: str | None = None,
    lr: float = 1e-4,
    seed: int = 0,
    graph: bool = False,
) -> TrainSetup:
    """Build the model (``maskdit`` or ``dit`` of ``config``), AdamW and a random batch.

    ``amp`` (bf16 autocast) defaults to on for CUDA, off for the CPU; ``compile`` is None,
    ``"blocks"`` or ``"model"`` (see :func:`fastmask.models.compile_model`); ``graph``
    captures the whole step in a CUDA graph (emulated off CUDA), not with ``compile``.
    """
    if graph and compile:
        raise ValueError(f"graph: a CUDA-graphed step is not also compiled (compile={compile!r})")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dev.type == "cuda" if amp is None else amp
    torch.manual_seed(seed)
    build = {"maskdit": maskdit, "dit": dit}[model]
    with dev:  # parameters initialised on the device (fast for XL); numpy-made buffers are not:
        net = build(config, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
        edm = EDMPrecond(net).to(dev)  # so move the rest
        y = torch.randn(batch, in_channels, input_size, input_size)
        labels = torch.randint(0, num_classes, (batch,))
    if compile:
        compile_model(edm, compile)
    opt_kw = {"fused": True} if dev.type == "cuda" else {}
    if graph and dev.type == "cuda":
        opt_kw["capturable"] = True
    opt = torch.optim.AdamW(edm.parameters(), lr=lr, weight_decay=0.0, **opt_kw)
    sg = StepGraph("cuda" if dev.type == "cuda" else "emulate") if graph else None
    return TrainSetup(edm, opt, y, labels, mask_ratio if model == "maskdit" else 0.0, backend, amp, dev, sg)

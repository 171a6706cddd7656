"""Training setups of the benchmark suite: a model, its optimizer and one fixed random batch.

``build_training(...).step()`` runs one training step (forward, backward, AdamW step; bf16
autocast on a GPU); with ``graph=True`` the whole step is one CUDA graph, captured and replayed
through the trainer's helper :class:`fastmask.step_graph.StepGraphs`; ``.flops()`` is its model FLOP count (:func:`fastmask.models.count_flops`).
``fastmask profile`` builds its own step (the package does not import ``benchmarks``).
"""
from __future__ import annotations

import dataclasses

import torch

import fastmask
from fastmask import step_graph
from fastmask.models import ARCHITECTURES, EDMPrecond, compile_model, count_flops, traced_flops

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
    graph: bool = False
    _graphs: step_graph.StepGraphs | None = None
    _loss: torch.Tensor | None = None
    _gen: torch.Generator | None = None
    family: str = "maskdit"  # its fastmask.models.ARCHITECTURES name
    config: str = "XL/2"

    def step(self) -> torch.Tensor:
        if self.graph:
            return self._graphed_step()
        with fastmask.backend(self.backend):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.model.loss(self.y, self.labels, mask_ratio=self.mask_ratio).mean()
            loss.backward()
        with torch.profiler.record_function("fastmask.optimizer"):
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def _graphed_step(self) -> torch.Tensor:
        """The step as the trainer runs it: the draws outside (sigma, noise, ids), the rest one graph."""
        B, dev = self.y.shape[0], self.device
        if self._graphs is None:
            self._graphs = step_graph.StepGraphs(dev, max_graphs=1)
            self._loss = torch.zeros((), device=dev)
            self._gen = torch.Generator(device=dev).manual_seed(0)
        g, N = self._gen, self.model.model.num_patches
        sigma = fastmask.models.draw_sigma(B, generator=g, device=dev)
        noise = torch.randn(self.y.shape, generator=g, device=dev)
        ids = None
        if self.mask_ratio > 0:
            ids = fastmask.ops.random_mask(B, N, self.mask_ratio, generator=g, device=dev)[0]
        what = self._graphs.run("step", self._whole_step,
                                {"y": self.y, "labels": self.labels, "sigma": sigma, "noise": noise, "ids_keep": ids})
        if what == "eager":  # a graphed row that fell back would time eager steps under its name
            raise RuntimeError(f"the step could not be captured in a CUDA graph: {self._graphs.failure('step')}")
        return self._loss

    def _whole_step(self, y, labels, sigma, noise, ids_keep) -> None:
        with fastmask.backend(self.backend), fastmask.ops.checks.trusted_values():
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=False):
                loss = self.model.loss_given(y, labels, sigma, noise, ids_keep, check_ids=False)[0].mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        self._loss.copy_(loss.detach())

    def flops(self) -> dict:
        if self.family in ("maskdit", "dit"):
            return count_flops(self.model, self.y.shape[0], self.mask_ratio)
        B, C, H, _ = self.y.shape  # any other family: counted by tracing its forward (per image)
        net = self.model.model
        per = traced_flops(self.family, self.config, input_size=H, in_channels=C, num_classes=net.num_classes,
                           mask_ratio=self.mask_ratio)
        return {k: v * B for k, v in per.items()}


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
    graph: bool = False,
    lr: float = 1e-4,
    seed: int = 0,
) -> TrainSetup:
    """Build the model (any family of ``fastmask.models.ARCHITECTURES``: ``maskdit``, ``dit``, ...,
    of ``config``), AdamW and a random batch.

    ``amp`` (bf16 autocast) defaults to on for CUDA, off for the CPU; ``compile`` is None,
    ``"blocks"`` or ``"model"`` (see :func:`fastmask.models.compile_model`); ``graph``: the step
    as one CUDA graph (AdamW fused and capturable, the lr a device tensor).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dev.type == "cuda" if amp is None else amp
    torch.manual_seed(seed)
    build = ARCHITECTURES[model].build
    with dev:  # parameters initialised on the device (fast for XL); numpy-made buffers are not:
        net = build(config, input_size=input_size, in_channels=in_channels, num_classes=num_classes)
        edm = EDMPrecond(net).to(dev)  # so move the rest
        y = torch.randn(batch, in_channels, input_size, input_size)
        labels = torch.randint(0, num_classes, (batch,))
    if compile:
        compile_model(edm, compile)
    opt_kw = {"fused": True} if dev.type == "cuda" else {}
    if graph and dev.type == "cuda":
        opt_kw.update(capturable=True)
        lr = torch.tensor(lr, device=dev)
    opt = torch.optim.AdamW(edm.parameters(), lr=lr, weight_decay=0.0, **opt_kw)
    ratio = mask_ratio if ARCHITECTURES[model].masks else 0.0
    return TrainSetup(edm, opt, y, labels, ratio, backend, amp, dev, graph, family=model, config=config)

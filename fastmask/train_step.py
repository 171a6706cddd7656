"""One training step: the step's random draws and batch, the loss, backward, AdamW and the EMA.

The step runs eagerly, as one CUDA graph (:mod:`fastmask.step_graph`: forward, backward,
gradient clipping, a fused capturable AdamW and the EMA update, replayed per step), or with a
``torch.compile``'d forward pass (``compile_step``). It makes no host sync: the summed loss terms
and the first step whose loss was not finite stay on the device, in running tensors that the
trainer reads every ``log_every`` steps (:meth:`fastmask.train.Trainer._sync`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch import Tensor

from . import ops, step_graph
from .data import batch_indices
from .models import EDMPrecond, FlowPrecond, draw_sigma, draw_t
from .phases import ema_decay_at, lr_at

NO_BAD = 2**62  # "no non-finite step yet" in the on-device record of the first bad step


def step_randomness(
    seed: int,
    step: int,
    global_batch: int,
    shape: tuple[int, int, int],
    num_tokens: int,
    mask_ratio: "float | ops.TokenStrategy",
    label_dropout: float,
    latents: bool,
    device,
    t_schedule: str | None = None,
    path_drop_prob: float = 0.0,
) -> dict[str, Tensor | None]:
    """All random draws of global step ``step``, for the whole global batch, from one generator
    seeded by (seed, step): label-drop flags [B], sigma [B], noise [B, C, H, W] (unit, times
    sigma later), ids_keep [B, K] (None at ratio 0) and the latent posterior eps (or None).
    With ``t_schedule`` (the flow objective) the draw in sigma's place is the time t [B]
    (key ``t``; ``sigma`` is None) and the noise is x0. With ``path_drop_prob`` > 0 (SPRINT's),
    the path-drop flags [B] (bool, key ``path_drop``; else None) are drawn last, so the other
    draws are the same with or without them."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed((seed % 2**31) * 2**32 + step)
    B = global_batch
    drop = torch.rand(B, generator=g, device=dev) < label_dropout
    t = sigma = None
    if t_schedule is None:
        sigma = draw_sigma(B, generator=g, device=dev)
    else:
        t = draw_t(B, schedule=t_schedule, generator=g, device=dev)
    noise = torch.randn((B, *shape), generator=g, device=dev)
    tokens = ops.as_strategy(mask_ratio)  # a ratio: MaskDiT's random tokens (or any TokenStrategy)
    ids_keep = None if tokens.keeps_all(num_tokens) else tokens.draw(B, num_tokens, generator=g, device=dev)
    eps = torch.randn((B, *shape), generator=g, device=dev) if latents else None
    path_drop = torch.rand(B, generator=g, device=dev) < path_drop_prob if path_drop_prob > 0 else None
    return {"drop": drop, "sigma": sigma, "t": t, "noise": noise, "ids_keep": ids_keep, "eps": eps,
            "path_drop": path_drop}


class _LossModule(nn.Module):
    """The loss as a module, so that DistributedDataParallel sees the forward pass."""

    def __init__(self, precond: EDMPrecond | FlowPrecond, mae_coef: float):
        super().__init__()
        self.precond, self.mae_coef = precond, mae_coef

    def forward(self, y, labels, drop, sigma, noise, ids_keep, path_drop=None):  # sigma: the times t under flow
        kw = {} if path_drop is None else {"path_drop": path_drop}  # SPRINT's flags; other networks get none
        return self.precond.loss_given(
            y, labels, sigma, noise, ids_keep, mae_coef=self.mae_coef, force_drop_ids=drop, check_ids=False,
            check_sigma=False, **kw,
        )


class TrainingStep:
    """The step of a training run, the base of :class:`fastmask.train.Trainer`, which provides
    ``cfg``, ``hooks``, ``rank``, ``world``, ``device``, ``data``, ``num_classes``, ``net``,
    ``ema``, ``sampler``, ``amp``, ``phases`` (:class:`fastmask.phases.Phases`) and ``say``, then
    calls :meth:`_init_step`. :meth:`_wrap` readies a phase, :meth:`_train_step` runs one step."""

    def _init_step(self, compile_step: dict | None) -> None:
        """The optimizer, the on-device running state and the step function (compiled, graphed
        or eager)."""
        cfg, dev = self.cfg, self.device
        cuda = dev.type == "cuda"
        # On CUDA the lr and the EMA weight are device tensors, set before each step outside the
        # step's work, and AdamW is fused and capturable: the step can be one CUDA graph.
        self._lr_t = torch.full((), float(cfg.lr), device=dev) if cuda else None
        self._ema_w = torch.zeros((), device=dev) if cuda else None
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=self._lr_t if cuda else cfg.lr, betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay, **({"fused": True, "capturable": True} if cuda else {}),
        )
        self._in_update = False  # inside the optimizer/EMA update: an error there leaves a torn state
        self._loss_module = None
        # on-device bookkeeping, read by the host every log_every steps (no sync per step)
        acc_dtype = torch.float32 if dev.type == "mps" else torch.float64
        self._acc = torch.zeros(3, dtype=acc_dtype, device=dev)
        self._bad = torch.full((), NO_BAD, dtype=torch.int64, device=dev)
        self._bad_val = torch.zeros((), dtype=acc_dtype, device=dev)
        self._step_t = torch.zeros((), dtype=torch.int64, device=dev)
        self._step_fn = self.device_step
        self._compiled = compile_step is not None
        if self._compiled:
            self._step_fn = torch.compile(self.device_step, fullgraph=True, **compile_step)
        self._graphs: step_graph.StepGraphs | None = None
        self.graph_reason = self._graph_off_reason()
        if self.graph_reason is None:
            self._graphs = step_graph.StepGraphs(dev, max_graphs=3, say=self.say)
        elif cfg.cuda_graph and dev.type == "cuda":
            self.say(f"fastmask: the training step runs eagerly, not as a CUDA graph: {self.graph_reason}")

    def _graph_off_reason(self) -> str | None:
        """Why the step is not captured as one CUDA graph (None: it is)."""
        if not self.cfg.cuda_graph:
            return "cuda_graph is off in the config"
        why = step_graph.unavailable_reason(self.device)
        if why is not None:
            return why
        if self._compiled:
            return "the step is compiled (torch.compile's own CUDA graphs: mode='reduce-overhead')"
        if self.world > 1:
            return f"distributed training ({self.world} ranks): the gradient all-reduce is not captured"
        if "loss" in self.hooks:
            return "a 'loss' hook is set (it runs Python per step)"
        return None

    def _wrap(self, phase: int):
        """The (DDP-wrapped) loss module for a phase. The MaskDiT mask token is unused at ratio
        0, so it is frozen there (DDP insists that every trainable parameter gets a gradient)."""
        net = self.net.model
        end = self.cfg.mask_ratio if self.cfg.mask_schedule == "constant" else self.cfg.mask_ratio_end
        ratios_zero = phase == 2 or max(self.cfg.mask_ratio, end or 0.0) == 0
        if hasattr(net, "mask_token"):
            net.mask_token.requires_grad_(not ratios_zero)
        module = _LossModule(self.net, self.cfg.mae_coef)
        if self.world > 1:
            varying = self.cfg.mask_schedule != "constant" and phase == 1
            module = nn.parallel.DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=varying,
            )
        self._loss_module = module

    def _train_step(self, phase: int) -> None:
        """One optimizer step of ``phase``: eager or one CUDA graph (:meth:`_whole_step`, the same
        function either way), or the compiled forward pass (:meth:`_compiled_step`)."""
        inputs = self._step_inputs(phase)
        if self._compiled:
            self._compiled_step(inputs)
        else:
            self._in_update = True  # in place from the start of the step (a graph replays it as one)
            if self._graphs is not None:
                y, ids_keep = inputs["y"], inputs["ids_keep"]
                key = (tuple(y.shape), None if ids_keep is None else tuple(ids_keep.shape), inputs["labels"] is None,
                       inputs["path_drop"] is None)
                self._graphs.run(key, self._whole_step, inputs)
            else:
                self._whole_step(**inputs)
        self.phases.advance(phase)
        self._step_t += 1
        self._in_update = False

    def _step_inputs(self, phase: int) -> dict[str, Tensor | None]:
        """This rank's share of the step's draws and batch, on the device; sets the step's lr
        and EMA decay."""
        cfg, dev, step = self.cfg, self.device, self.phases.step
        ratio = self.phases.mask_ratio(phase)
        lr = lr_at(cfg, self.phases.sched_step(phase), phase)
        rnd = step_randomness(
            cfg.seed,
            step,
            cfg.batch_size,
            self.data.shape,
            self.net.model.num_patches,
            self.net.token_strategy(ratio),  # TREAD rounds K its own way
            cfg.label_dropout,
            self.data.kind == "latents",
            dev,
            cfg.t_schedule if cfg.objective == "flow" else None,
            self.net.path_drop_prob,  # SPRINT's path-drop flags, drawn with the rest (0: none)
        )
        level = rnd["t"] if cfg.objective == "flow" else rnd["sigma"]
        per = cfg.batch_size // self.world
        sl = slice(self.rank * per, (self.rank + 1) * per)
        idx = batch_indices(self.sampler, step, cfg.batch_size, self.rank, self.world)
        eps = rnd["eps"][sl] if rnd["eps"] is not None else None
        y, labels = self.data.batch(idx, eps=eps.cpu() if eps is not None else None)
        y = y.to(dev, non_blocking=True)
        labels = labels.to(dev, non_blocking=True) if self.num_classes > 0 else None
        ids_keep = rnd["ids_keep"][sl] if rnd["ids_keep"] is not None else None
        path_drop = rnd["path_drop"][sl] if rnd["path_drop"] is not None else None
        self._set_hyperparameters(lr, ema_decay_at(cfg, step))
        return {"y": y, "labels": labels, "drop": rnd["drop"][sl], "sigma": level[sl], "noise": rnd["noise"][sl],
                "ids_keep": ids_keep, "path_drop": path_drop}

    def _whole_step(self, y, labels, drop, sigma, noise, ids_keep, path_drop=None) -> None:
        """Forward, backward, gradient clipping, AdamW and the EMA update of one step, every
        effect in place (what :class:`fastmask.step_graph.StepGraphs` captures)."""
        amp = self.amp and self.device.type == "cuda"
        # the autocast cast cache must not outlive a capture
        ctx = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=self._graphs is None) if amp else \
            contextlib.nullcontext()
        with ctx, ops.checks.trusted_values():  # labels checked at start-up, ids and sigmas drawn here
            loss, dsm, mae = self._loss_module(y, labels, drop, sigma, noise, ids_keep, path_drop)
            mean, bad, bad_val, acc = self._tally(loss, dsm, mae, self._step_t, self._bad, self._bad_val, self._acc)
        self._bad.copy_(bad)
        self._bad_val.copy_(bad_val)
        self._acc.copy_(acc)
        self._update(mean, self._ema_weight)

    def _update(self, mean: Tensor, ema_weight=None) -> None:
        """Backward, gradient clipping, AdamW and the EMA update (by ``ema_weight``: 1 - decay)."""
        self.opt.zero_grad(set_to_none=True)
        mean.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self._in_update = True  # from here on an error leaves a torn state
        self.opt.step()
        self._update_ema(ema_weight)

    def _tally(self, loss, dsm, mae, step_t, bad, bad_val, acc):
        """The batch mean of the per-sample ``loss`` (after a "loss" hook), and the running state
        with this step in it: the summed loss terms ``acc`` and the first step whose loss was not
        finite (``bad``, with its value ``bad_val``). Functional: returns (mean, bad, bad_val, acc)."""
        if "loss" in self.hooks:
            loss = self.hooks["loss"](int(self.step), loss)
        mean = loss.mean()
        vals = torch.stack([mean.detach(), dsm.detach().float().mean(), mae.detach().float().mean()]).to(acc.dtype)
        first = (bad == NO_BAD) & ~torch.isfinite(vals[0])
        bad = torch.where(first, step_t, bad)
        bad_val = torch.where(first, vals[0], bad_val)
        return mean, bad, bad_val, acc + vals

    def _compiled_step(self, inputs: dict[str, Tensor | None]) -> None:
        """:meth:`_whole_step` with the compiled :meth:`device_step` (``compile_step``)."""
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA-graph outputs may be reused
        with ctx, ops.checks.trusted_values():  # labels checked at start-up, ids and sigmas drawn here
            mean, bad, bad_val, acc = self._step_fn(
                inputs["y"], inputs["labels"], inputs["drop"], inputs["sigma"], inputs["noise"], inputs["ids_keep"],
                inputs["path_drop"], self._step_t, self._bad, self._bad_val, self._acc,
            )
        # keep the running state out of the CUDA-graph memory pool
        self._bad, self._bad_val, self._acc = bad.clone(), bad_val.clone(), acc.clone()
        self._update(mean)

    def device_step(self, y, labels, drop, sigma, noise, ids_keep, path_drop, step_t, bad, bad_val, acc):
        """The device work of one step before the backward pass: the loss (returned as the batch
        mean, to differentiate) and the bookkeeping that replaces a per-step host sync
        (:meth:`_tally`). Traceable by ``torch.compile(fullgraph=True)``."""
        loss, dsm, mae = self._loss_module(y, labels, drop, sigma, noise, ids_keep, path_drop)
        return self._tally(loss, dsm, mae, step_t, bad, bad_val, acc)

    def _set_hyperparameters(self, lr: float, decay: float) -> None:
        """The step's lr and EMA decay: into device tensors on CUDA (read by the captured step),
        as Python numbers elsewhere."""
        if self._lr_t is not None:
            self._lr_t.fill_(lr)
            self._ema_w.fill_(1.0 - decay)
        for g in self.opt.param_groups:
            g["lr"] = self._lr_t if self._lr_t is not None else lr  # a resume may have replaced it
        self._ema_weight = self._ema_w if self._ema_w is not None else 1.0 - decay

    @torch.no_grad()
    def _update_ema(self, weight=None) -> None:
        """EMA towards the weights by ``weight`` (1 - decay; a device tensor in a graphed step),
        by default that of the current step."""
        ema_p = list(self.ema.parameters())
        p = [q.detach() for q in self.net.parameters()]
        if weight is None:
            weight = 1.0 - ema_decay_at(self.cfg, self.step)
        if isinstance(weight, Tensor):  # one 0-d weight per tensor: a lone tensor would be read as a number (a sync)
            weight = [weight] * len(ema_p)
        torch._foreach_lerp_(ema_p, p, weight)

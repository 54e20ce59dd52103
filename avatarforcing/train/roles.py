"""Trained networks (*roles*): the model, AdamW with linear warm-up, global-norm clipping and an EMA."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..model import build_model
from .distributed import local

log = logging.getLogger("avatarforcing.train")


def build_dit(cfg, init: str | None = None, use_ema: bool = False, what: str = "model"):
    """A WanDiT from ``cfg.model``; weights from ``init`` (any checkpoint ``load_dit`` accepts) or the seeded init."""
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model)
    if init:
        from ..checkpoint import load_dit
        report = load_dit(model, init, use_ema=bool(use_ema))
        log.info("%s initialised from %s", what, getattr(report, "path", init))
    return model


class EMA:
    """Exponential moving average of a role's parameters (fp32, on the parameters' device)."""

    def __init__(self, named_params, decay: float, start: int):
        self.decay, self.start = float(decay), int(start)
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    @torch.no_grad()
    def update(self, named_params, step: int) -> None:
        d = self.decay if step >= self.start else 0.0
        for n, p in named_params:
            s = self.shadow[n]
            if d == 0.0:
                s.copy_(p.detach().float())
            else:
                s.lerp_(p.detach().float(), 1.0 - d)

    def state_dict(self) -> dict:
        """Full CPU tensors (collective when the parameters are FSDP-sharded DTensors)."""
        return {k: local(v.detach()).cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            s = self.shadow[k]
            if hasattr(s, "device_mesh"):   # sharded like its parameter
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v.to(s.device, s.dtype), s.device_mesh, s.placements)
            s.copy_(v)


@dataclass
class Role:
    """A trained network: the module as called (maybe FSDP-sharded in place), AdamW, its LR schedule, EMA."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    grad_clip: float
    params: list = field(default_factory=list)

    @classmethod
    def create(cls, name: str, model, tc, lr: float, *, ema: bool = False, betas=None, weight_decay=None,
               grad_clip=None) -> "Role":
        """AdamW (``train.betas/adam_eps/weight_decay``), warm-up over ``train.warmup_steps``, EMA when asked."""
        params = [p for p in model.parameters() if p.requires_grad]
        betas = tuple(float(b) for b in (betas if betas is not None else tc.betas))
        opt = torch.optim.AdamW(params, lr=float(lr), betas=betas, eps=float(tc.adam_eps),
                                weight_decay=float(tc.weight_decay if weight_decay is None else weight_decay))
        warm = int(tc.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        e = EMA(model.named_parameters(), tc.ema_decay, tc.ema_start) if ema and tc.ema_decay is not None else None
        return cls(name, model, opt, sched, e, float(tc.grad_clip if grad_clip is None else grad_clip), params)

    def step(self, step: int) -> dict:
        """Clip the (already averaged) gradients, AdamW step, zero grads, EMA.  Returns grad norm and lr."""
        norm = local(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip if self.grad_clip > 0 else float("inf")))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model.named_parameters(), step)
        return {f"{self.name}/grad_norm": float(norm), f"{self.name}/lr": lr}

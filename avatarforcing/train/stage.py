"""What the training loop needs from a stage (teacher, ODE regression, DMD).

A stage is built as ``stage_cls(cfg, trainer)``: it builds its networks and data, registers the trained
networks with ``trainer.add_role`` (frozen ones with ``trainer.add_frozen``) and then answers the loop
through :class:`Stage`.  One optimisation step of a role is one call of ``trainer.accumulate(role, step,
micro_loss)``: the loop runs the ``train.grad_accum`` micro-batches (``micro_loss(micro) -> loss``), the
backward passes, the gradient averaging over processes and the optimizer step, so a stage only says what
the loss of one micro-batch is.  A stage with several updates per step (DMD: ``dmd.critic_updates`` critic
updates, then one generator update) calls ``accumulate`` once per update.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from .data import BatchStream
    from .roles import Role


class Stage(Protocol):
    """A training stage.  Subclass it explicitly to inherit the optional hooks' defaults."""

    name: ClassVar[str]          # checkpoint tag and log prefix: 'teacher', 'ode', 'dmd'

    def train_step(self, step: int) -> dict:
        """One training step (1-based ``step``): ``trainer.accumulate`` per role update.  Returns metrics."""
        ...

    def data_states(self) -> dict[str, BatchStream]:
        """The data streams whose positions are checkpointed (and resumed), by name."""
        ...

    def export_role(self) -> Role:
        """The role whose weights (and EMA) are exported in the released layout at the end."""
        ...

    # -- optional hooks (defaults here) -------------------------------------------------------------------
    def sample_video(self) -> torch.Tensor | None:
        """Latents [B, C, F, h, w] of a recent sample, decoded and logged to wandb every ``train.sample_every``."""
        return None

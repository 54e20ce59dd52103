"""The training loop shared by the teacher, ODE and DMD stages.

:class:`Trainer` runs a :class:`~.stage.Stage`: it owns the processes (:mod:`.distributed`), the roles
(:mod:`.roles`: AdamW, clipping, EMA), seeded per-(step, micro-step, rank) random generators so that resumed
and uninterrupted runs draw the same numbers, gradient accumulation (:meth:`Trainer.accumulate`, the only
micro-batch loop), logging (tqdm + ``metrics.jsonl``, wandb: :mod:`.logger`), checkpoints and export
(:mod:`.checkpointing`).  Entry points: :func:`run_stage` (from a config) and :func:`main` (the
``train_*.py`` scripts).
"""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from .. import AvatarForcingError
from ..units import stable_seed
from .checkpointing import Checkpointer
from .distributed import Processes
from .logger import MetricsLogger, SampleVideos
from .roles import Role
from .stage import Stage

log = logging.getLogger("avatarforcing.train")


class Trainer:
    """Processes, roles, randomness, accumulation, and the step loop of one stage."""

    def __init__(self, cfg, stage: str):
        tc = cfg.train
        self.procs = Processes(tc)
        self.cfg, self.stage_name = cfg, stage
        self.rank, self.world, self.main = self.procs.rank, self.procs.world, self.procs.main
        self.device, self.fsdp = self.procs.device, self.procs.fsdp
        self.out = Path(tc.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt = Checkpointer(cfg, stage, self.procs)
        self.roles: dict[str, Role] = {}
        self.frozen: dict[str, torch.nn.Module] = {}
        self.step = 0
        self.seed = int(cfg.seed)
        random.seed(self.seed + self.rank)
        np.random.seed((self.seed + self.rank) % 2 ** 32)
        torch.manual_seed(self.seed + self.rank)
        self.logger = MetricsLogger(cfg, self.out, self.main)
        self.samples = SampleVideos(cfg, self.logger, self.device, f"{stage}/sample")
        if self.main:
            (self.out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        self._trace = open(self.out / f"trace_rank{self.rank}.jsonl", "a") if tc.trace else None

    # -- randomness ----------------------------------------------------------------------------------------
    def generator(self, step: int, micro: int = 0, salt: int = 0, per_rank: bool = True) -> torch.Generator:
        """CPU generator keyed by (seed, step, micro-step, salt[, rank]): independent of history, so resume is exact."""
        g = torch.Generator()
        g.manual_seed(stable_seed(self.seed, step, micro, salt, self.rank if per_rank else "all"))
        return g

    def autocast(self):
        return self.procs.autocast()

    # -- networks -----------------------------------------------------------------------------------------
    def add_frozen(self, name: str, model) -> torch.nn.Module:
        model = self.procs.place(model, trainable=False)
        self.frozen[name] = model
        return model

    def add_role(self, name: str, model, lr: float, *, ema: bool = False, betas=None, weight_decay=None,
                 grad_clip=None) -> Role:
        model = self.procs.place(model, trainable=True)
        role = Role.create(name, model, self.cfg.train, lr, ema=ema, betas=betas, weight_decay=weight_decay,
                           grad_clip=grad_clip)
        self.roles[name] = role
        return role

    # -- optimisation -------------------------------------------------------------------------------------
    def accumulate(self, role: Role, step: int, micro_loss: Callable[[int], torch.Tensor]) -> tuple[list[float], dict]:
        """One update of ``role``: backward of ``micro_loss(micro)`` for each of the ``train.grad_accum``
        micro-batches (scaled by 1 / grad_accum by ``Accelerator.backward``), then :meth:`optimizer_step`.

        Returns the micro-batch losses (unscaled floats) and the optimizer metrics."""
        acc, losses = self.procs.acc, []
        for micro in range(self.procs.grad_accum):
            with acc.accumulate():
                loss = micro_loss(micro)
                acc.backward(loss)
            losses.append(loss.item())
        if not acc.sync_gradients:
            raise AvatarForcingError("gradient accumulation is out of step with accelerate's counter; call "
                                     "Trainer.accumulate for every update")
        return losses, self.optimizer_step(role, step)

    def optimizer_step(self, role: Role, step: int) -> dict:
        """Average gradients over processes, clip, AdamW step, zero grads, EMA.  Returns grad norm and lr."""
        self.procs.average_gradients(role.params)
        return role.step(step)

    def trace(self, record: dict) -> None:
        if self._trace is not None:
            self._trace.write(json.dumps(record) + "\n")
            self._trace.flush()

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self, stage: Stage) -> Path:
        return self.ckpt.save(self.step, self.roles, stage.data_states())

    def load(self, path: Path, stage: Stage) -> None:
        self.step = self.ckpt.load(path, self.roles, stage.data_states())

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, stage: Stage) -> dict:
        """Resume if asked, train to ``train.steps`` (or ``train.stop_after`` more), save, export.  Last metrics."""
        tc = self.cfg.train
        resume = self.ckpt.find_resume()
        if resume is not None:
            self.load(resume, stage)
        total = int(tc.steps)
        stop_after = int(tc.stop_after) if tc.stop_after is not None else None
        start = self.step
        last: dict = {}
        bar = None
        if self.main and tc.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=start, desc=self.stage_name, dynamic_ncols=True, file=sys.stderr)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        while self.step < total:
            step = self.step + 1
            t0 = time.perf_counter()
            metrics = stage.train_step(step)
            self.step = step
            metrics = self.procs.reduce_mean(metrics)
            metrics["time/step_s"] = time.perf_counter() - t0
            if self.device.type == "cuda":
                metrics["mem/peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
            for k, s in stage.data_states().items():
                metrics[f"{k}/skipped"] = s.ds.skipped
            last = metrics
            self._log(step, total, metrics, bar)
            if tc.sample_every and step % int(tc.sample_every) == 0 and self.logger.wandb is not None:
                self.samples.log(step, stage.sample_video())
            saved = False
            if (tc.save_every and step % int(tc.save_every) == 0) or step == total:
                self.save(stage)
                saved = True
            if stop_after is not None and step - start >= stop_after:
                if not saved:
                    self.save(stage)
                break
        if bar is not None:
            bar.close()
        if self.step >= total and tc.export:
            self.ckpt.export(stage.export_role())
        self.logger.close()
        return last

    def _log(self, step: int, total: int, metrics: dict, bar) -> None:
        if step % max(1, int(self.cfg.train.log_every)) == 0 or step == total:
            self.logger.log(step, metrics)
            if bar is None and self.main:
                print(f"[{self.stage_name}] step {step}/{total} " +
                      " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)), flush=True)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if "loss" in k})

    def close(self):
        if self._trace is not None:
            self._trace.close()
        self.procs.close()


# ---- entry points ---------------------------------------------------------------------------------------

def parse_args(argv, description: str):
    import argparse
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", required=True, help="experiment YAML merged over configs/default.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap.parse_args(argv)


def run_stage(stage_cls: type[Stage], cfg) -> dict:
    """Build the trainer and the stage from a config, train, export.  Returns the last metrics."""
    trainer = Trainer(cfg, stage_cls.name)
    try:
        return trainer.run(stage_cls(cfg, trainer))
    finally:
        trainer.close()


def main(stage_cls: type[Stage], argv=None, description: str = "") -> int:
    from ..config import load_config
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv, description)
    try:
        cfg = load_config(args.config, args.overrides)
        run_stage(stage_cls, cfg)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

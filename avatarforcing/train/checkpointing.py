"""Training checkpoints: atomic save, load, prune, resume, and export of the released layout.

``<output_dir>/checkpoints/step_XXXXXXXX/`` is written to a hidden temp directory and renamed (atomic):
``state.pt`` (models, EMA, optimizers, LR schedulers, step, data positions, config) and ``rank_R.pt`` per
process (python / numpy / torch / CUDA RNG states).  ``train.resume: auto`` continues from the newest
complete one; ``latest`` names it.  The export is the released layout ``{'generator', 'generator_ema'}``
(``checkpoint.export_released``) that inference.py / ``load_dit`` read.

accelerate's ``save_state`` / ``load_state`` are not used: they write one file per object and would change
this layout (tests, the world pipeline and resume of existing runs read ``state.pt``), and FSDP2 full state
dicts go through torch.distributed.checkpoint here either way.  The RNG states saved per rank are the same
ones ``save_state`` saves.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .. import AvatarForcingError
from .distributed import (Processes, full_state_dict, load_full_state_dict, load_optimizer_state_dict,
                          optimizer_state_dict)
from .roles import Role

log = logging.getLogger("avatarforcing.train")

CKPT_FORMAT = "avatarforcing-train-v1"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoint folders (renamed from their temp name), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    done = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.pt").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Checkpointer:
    """Save / load / prune / find the checkpoints of one stage's run, and export its released weights."""

    def __init__(self, cfg, stage_name: str, procs: Processes):
        self.cfg, self.stage_name, self.procs = cfg, stage_name, procs
        self.out = Path(cfg.train.output_dir)
        self.dir = self.out / "checkpoints"

    def save(self, step: int, roles: dict[str, Role], data_states: dict) -> Path:
        """Write ``step_XXXXXXXX`` atomically (all ranks call; collective under FSDP), then prune old ones."""
        procs = self.procs
        name = f"step_{step:08d}"
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        if procs.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        procs.barrier()
        torch.save({"rng": rng_state(), "rank": procs.rank, "world": procs.world}, tmp / f"rank_{procs.rank}.pt")
        models = {n: full_state_dict(r.model) for n, r in roles.items()}     # collective under FSDP
        optims = {n: optimizer_state_dict(r.model, r.optimizer) for n, r in roles.items()}
        emas = {n: r.ema.state_dict() for n, r in roles.items() if r.ema is not None}
        if procs.main:
            state = {
                "format": CKPT_FORMAT, "stage": self.stage_name, "step": step, "world": procs.world,
                "fsdp": procs.fsdp,
                "models": models, "optimizers": optims,
                "schedulers": {n: r.scheduler.state_dict() for n, r in roles.items()},
                "ema": emas,
                "data": {k: s.state_dict() for k, s in data_states.items()},
                "config": OmegaConf.to_yaml(self.cfg),
            }
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, "stage": self.stage_name,
                                                       "world": procs.world, "time": time.time()}))
            _fsync_dir(tmp)
            old = None
            if final.exists():
                old = self.dir / f".{name}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)                       # the commit
            _atomic_write(self.dir / "latest", name + "\n")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self.prune()
        procs.barrier()
        return final

    def prune(self) -> None:
        """Keep the newest ``train.keep_checkpoints`` complete checkpoints (0: keep all)."""
        keep = int(self.cfg.train.keep_checkpoints)
        if keep <= 0:
            return
        for p in complete_checkpoints(self.dir)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def find_resume(self) -> Path | None:
        """The checkpoint ``train.resume`` names: ``auto`` = the newest complete one, a folder, or none."""
        r = self.cfg.train.resume
        if r in (None, False) or str(r).lower() in ("none", "false", "never", "no"):
            return None
        if str(r) == "auto":
            done = complete_checkpoints(self.dir)
            return done[-1] if done else None
        p = Path(str(r))
        if not (p / "state.pt").is_file():
            raise AvatarForcingError(f"train.resume={r}: no checkpoint there (expected {p / 'state.pt'}); pass a "
                                     f"checkpoints/step_XXXXXXXX folder, 'auto' or null")
        return p

    def load(self, path: Path, roles: dict[str, Role], data_states: dict) -> int:
        """Restore roles, data positions and this rank's RNG states from ``path``.  Returns the step."""
        procs = self.procs
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except Exception as exc:
            raise AvatarForcingError(f"cannot read checkpoint {path / 'state.pt'} ({type(exc).__name__}); delete the "
                                     "folder to fall back to the previous one") from None
        if state.get("format") != CKPT_FORMAT or state.get("stage") != self.stage_name:
            raise AvatarForcingError(f"{path} is a '{state.get('stage')}' checkpoint, not '{self.stage_name}'; use "
                                     "another train.output_dir or train.resume=null")
        if bool(state.get("fsdp", False)) != procs.fsdp:
            raise AvatarForcingError(f"{path} was written with train.fsdp={state.get('fsdp')}; resume it with the same "
                                     "setting (optimizer states are laid out differently)")
        for n, r in roles.items():
            load_full_state_dict(r.model, state["models"][n])
            load_optimizer_state_dict(r.model, r.optimizer, state["optimizers"][n])
            r.scheduler.load_state_dict(state["schedulers"][n])
            if r.ema is not None and n in state.get("ema", {}):
                r.ema.load_state_dict(state["ema"][n])
        for k, s in data_states.items():
            s.load_state_dict(state["data"][k])
        step = int(state["step"])
        rank_file = path / f"rank_{procs.rank}.pt"
        if rank_file.is_file() and int(state.get("world", 1)) == procs.world:
            set_rng_state(torch.load(rank_file, map_location="cpu", weights_only=False)["rng"])
        else:
            log.warning("%s: saved with %s processes, resuming with %s: RNG states are re-seeded (the training "
                        "randomness itself is keyed by step and stays reproducible)", path, state.get("world"), procs.world)
        if procs.main:
            log.info("resumed from %s at step %d", path, step)
        return step

    def export(self, role: Role, path: Path | None = None) -> Path | None:
        """The released layout {'generator', 'generator_ema'} that inference.py / load_dit reads."""
        from ..checkpoint import export_released
        path = Path(path or self.out / "export" / "model.pt")
        sd = full_state_dict(role.model)
        ema = role.ema.state_dict() if role.ema is not None else None      # collective under FSDP
        if self.procs.main:
            tmp = path.with_name(f".{path.name}.tmp")
            export_released(sd, tmp, ema)
            os.replace(tmp, path)
        self.procs.barrier()
        return path if self.procs.main else None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())

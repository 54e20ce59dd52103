"""Training logs: ``<output_dir>/metrics.jsonl`` on the main process, wandb when ``train.wandb`` (offline by
default, optional dependency), and decoded sample videos for wandb."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from .. import AvatarForcingError

log = logging.getLogger("avatarforcing.train")


class MetricsLogger:
    """jsonl on the main process, wandb (offline by default) when enabled."""

    def __init__(self, cfg, out: Path, main: bool):
        self.main, self.out, self.wandb = main, out, None
        tc = cfg.train
        if main and tc.wandb:
            try:
                import wandb
            except ImportError:
                raise AvatarForcingError("train.wandb=true needs the wandb package (pip install wandb) "
                                         "or set train.wandb=false") from None
            os.environ.setdefault("WANDB_MODE", str(tc.wandb_mode))
            id_file = out / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            self.wandb = wandb.init(project=str(tc.wandb_project), dir=str(out), mode=str(tc.wandb_mode),
                                    config=OmegaConf.to_container(cfg, resolve=True), id=run_id, resume="allow",
                                    name=tc.wandb_name or None)
            id_file.write_text(self.wandb.id)

    def log(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def video(self, step: int, key: str, frames: np.ndarray, fps: int) -> None:
        if self.main and self.wandb is not None:
            import wandb
            self.wandb.log({key: wandb.Video(frames.transpose(0, 3, 1, 2), fps=fps, format="mp4")}, step=step)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


class SampleVideos:
    """Decodes a stage's sample latents with the VAE (built on first use) and logs them to wandb."""

    def __init__(self, cfg, logger: MetricsLogger, device, key: str):
        self.cfg, self.logger, self.device, self.key = cfg, logger, device, key
        self.vae = None

    def log(self, step: int, latents: torch.Tensor | None) -> None:
        if self.logger.wandb is None or latents is None:
            return
        try:
            if self.vae is None:
                from ..vae import build_vae
                with torch.random.fork_rng():   # a random init (no vae.path) follows cfg.seed, as in preprocessing
                    torch.manual_seed(int(self.cfg.seed))
                    self.vae = build_vae(self.cfg.vae).to(self.device)
            with torch.no_grad():
                video = self.vae.decode(latents[:1].to(self.device))          # [1, 3, T, H, W] in [-1, 1]
            frames = ((video[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).byte().cpu().numpy()
            self.logger.video(step, self.key, frames, int(self.cfg.inference.fps))
        except Exception as exc:  # sample videos are a convenience, never fatal
            log.warning("sample video at step %d failed: %s", step, exc)

"""Synthetic samples written through the real sample writer (tests and benchmarks; no VAE / audio / text models).

Latents are smooth random fields (a low-resolution Gaussian field upsampled, plus a per-clip drift) so that a
tiny model has structure to learn; audio and text are random features of the configured sizes.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D


def clip_shape(cfg) -> tuple[int, int, int, int]:
    """(C, F, h, w) of a clip sample for the config (data.clip_blocks, schedule.block_frames, data.height/width)."""
    frames = 1 + int(cfg.data.clip_blocks) * int(cfg.schedule.block_frames)
    return int(cfg.vae.z_dim), frames, int(cfg.data.height) // 8, int(cfg.data.width) // 8


def random_clip(cfg, generator: torch.Generator) -> dict[str, torch.Tensor]:
    C, Fn, h, w = clip_shape(cfg)
    base = F.interpolate(torch.randn(1, C, max(1, h // 4), max(1, w // 4), generator=generator), size=(h, w),
                         mode="bilinear", align_corners=False)[0]
    drift = 0.3 * torch.randn(C, 1, 1, generator=generator)
    lat = torch.stack([base + drift * (f / Fn) + 0.1 * torch.randn(C, h, w, generator=generator) for f in range(Fn)], 1)
    audio = torch.randn(Fn, int(cfg.model.audio_dim), generator=generator)
    audio[0] = 0
    text = torch.randn(3, int(cfg.model.text_dim), generator=generator)
    return {"latents": lat, "ref": lat[:, :1].clone(), "audio": audio, "text": text}


def write_clip_samples(cfg, directory, num: int, seed: int = 0, null_text: bool = True) -> list[Path]:
    """``num`` clip samples (kind ``clip``) plus the null-text file in ``directory``."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(num):
        paths.append(D.write_sample(D.sample_path(directory, f"synth-{seed}-{i:04d}"), random_clip(cfg, g),
                                    metadata={"caption": f"synthetic {i}", "source": "synthetic"}, kind="clip",
                                    dtype=D.storage_dtype(cfg.data.dtype)))
    if null_text:
        z = torch.zeros(1, int(cfg.model.text_dim))
        D.write_null_text(directory, z, torch.randn(2, int(cfg.model.text_dim), generator=g))
    return paths


def random_dit(cfg, seed: int = 0, head_std: float = 0.02):
    """A WanDiT of ``cfg.model`` with Wan's init and a random (non-zero) output head: a stand-in teacher."""
    from ..model import build_model
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.head.head.weight.normal_(0.0, head_std)
    return model


def write_checkpoint(model, path, ema: bool = True) -> Path:
    """Save ``model`` in the released layout ({'generator', 'generator_ema'}) that load_dit reads."""
    from ..checkpoint import export_released
    sd = model.state_dict()
    export_released(sd, path, sd if ema else None)
    return Path(path)

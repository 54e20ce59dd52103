"""Small shared builders for tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from avatarforcing.stream_state import CacheConfig
from avatarforcing.model import PRESETS, DiTConfig, WanDiT


def random_tiny_model(seed: int = 0, **overrides) -> WanDiT:
    """The tiny preset with every parameter random (the default init zeroes the output head)."""
    torch.manual_seed(seed)
    cfg = DiTConfig(**{**PRESETS["tiny"].__dict__, **overrides})
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm3" in name or "norm_out" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
    return model


def cache_cfg(**kw) -> CacheConfig:
    return CacheConfig(**kw)


def schedule_cfg(**kw):
    base = dict(num_train_timesteps=1000, shift=5.0, steps=[1000, 800, 400, 200], warp=True, block_frames=4,
                window_blocks=None, passes=1)
    base.update(kw)
    return OmegaConf.create(base)


def load_script(name: str, module_name: str | None = None):
    """scripts/<name>.py as a module (registered in sys.modules, so its dataclasses resolve), to call its main()."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name or name, path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

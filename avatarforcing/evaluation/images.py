"""Frame tensors for the evaluation networks: uint8 [N, H, W, 3] (RGB) <-> float [N, 3, H, W], resizing, batches."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def to_nchw(frames, device="cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch) -> float32 [N, 3, H, W] with values in [0, 255]."""
    x = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    return x.to(device).permute(0, 3, 1, 2).float()


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [0, 255] -> uint8 [N, H, W, 3] (rounded, clipped)."""
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of [N, C, H, W] to ``size`` (h, w) with half-pixel centres and no antialiasing: the
    semantics of OpenCV's ``cv2.resize(..., INTER_LINEAR)`` and of ``F.interpolate`` in pytorch-fid."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


@torch.no_grad()
def map_batches(fn: Callable[[slice], torch.Tensor], n: int, batch_size: int) -> np.ndarray:
    """``fn(slice)`` -> tensor [b, ...] for every batch of ``range(n)``, concatenated as float64 numpy."""
    outs = [fn(sl).float().cpu() for sl in batches(n, batch_size)]
    return torch.cat(outs).numpy().astype(np.float64) if outs else np.zeros((0,))


class BatchedNet:
    """A network (or anything callable) in eval mode on ``device``, run in batches of ``batch_size``."""

    batch_size = 32

    def __init__(self, net, device="cpu", batch_size: int | None = None):
        self.net = net.to(device).eval() if isinstance(net, nn.Module) else net
        self.device = device
        self.batch_size = batch_size or type(self).batch_size

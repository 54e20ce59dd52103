"""LPIPS (v0.1, AlexNet), as richzhang/PerceptualSimilarity's ``lpips.LPIPS(net='alex')`` computes it.

The trunk is torchvision's AlexNet ``features`` (keys ``features.0.weight`` ...; weights
``alexnet-owt-7be5be79.pth``, whose ``classifier.*`` keys are not used), tapped after the ReLUs at indices
1, 4, 7, 9 and 11 (64, 192, 384, 256, 256 channels).  Inputs in [-1, 1] are shifted / scaled by LPIPS's
ScalingLayer; each tap is unit-normalised over channels (eps 1e-10), the squared difference is weighted by the
layer's learned 1x1 conv (``lin{k}.model.1.weight``, file ``lpips_alex_v0.1.pth`` = the package's
``weights/v0.1/alex.pth``), averaged over positions and summed over layers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .images import BatchedNet, map_batches, to_nchw
from .weights import WeightsFolder

CHANNELS = (64, 192, 384, 256, 256)
TAPS = (1, 4, 7, 9, 11)                          # ReLU indices in AlexNet.features
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class AlexNetTrunk(nn.Module):
    """torchvision's ``AlexNet.features`` (same indices) returning the five LPIPS taps."""

    def __init__(self):
        super().__init__()
        relu, pool = (lambda: nn.ReLU(inplace=True)), (lambda: nn.MaxPool2d(3, 2))
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), relu(), pool(), nn.Conv2d(64, 192, 5, padding=2), relu(), pool(),
            nn.Conv2d(192, 384, 3, padding=1), relu(), nn.Conv2d(384, 256, 3, padding=1), relu(),
            nn.Conv2d(256, 256, 3, padding=1), relu())

    def forward(self, x) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


class NetLinLayer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPSHead(nn.Module):
    """The five learned layers; state-dict keys ``lin0.model.1.weight`` .. ``lin4.model.1.weight``."""

    def __init__(self):
        super().__init__()
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c))

    def forward(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        return sum(getattr(self, f"lin{k}")(d).mean((2, 3)) for k, d in enumerate(diffs))[:, 0]


class LPIPS(nn.Module):
    """(a, b) RGB [N, 3, H, W] in [-1, 1] -> distance [N]."""

    def __init__(self, trunk: AlexNetTrunk, head: LPIPSHead):
        super().__init__()
        self.trunk, self.head = trunk, head
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])

    @staticmethod
    def _normalize(x):
        return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    def forward(self, a, b):
        fa, fb = self.trunk((a - self.shift) / self.scale), self.trunk((b - self.shift) / self.scale)
        return self.head([(self._normalize(x) - self._normalize(y)) ** 2 for x, y in zip(fa, fb)])


class AdjacentLPIPS(BatchedNet):
    """LPIPS between frames t and t+1 of uint8 RGB frames -> [T-1]."""

    @classmethod
    def load(cls, weights: WeightsFolder, device="cpu") -> "AdjacentLPIPS":
        trunk = weights.load_module("alexnet", AlexNetTrunk(), only="features.")
        return cls(LPIPS(trunk, weights.load_module("lpips_alex", LPIPSHead())), device)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        def pairs(sl):
            x = to_nchw(frames[sl.start:sl.stop + 1], self.device) / 127.5 - 1
            return self.net(x[:-1], x[1:])
        return map_batches(pairs, max(0, len(frames) - 1), self.batch_size).reshape(-1)

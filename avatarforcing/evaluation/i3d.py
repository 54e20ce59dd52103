"""FVD features: the I3D (Kinetics-400) TorchScript detector of StyleGAN-V (``i3d_torchscript.pt``).

StyleGAN-V's ``frechet_video_distance.py`` calls the detector on uint8 clips [B, 3, T, H, W] with
``rescale=True, resize=True, return_features=True``: it maps 0..255 to [-1, 1], resizes to 224 x 224 and returns
the 400 Kinetics logits before the softmax, the features of the original TensorFlow FVD.  FVD is the Fréchet
distance of those features (``fvd2048_16f``: 16-frame clips).  Here every video contributes its consecutive
non-overlapping 16-frame clips (a shorter tail is dropped, as StyleGAN-V drops short videos) instead of one
random clip per video.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .images import BatchedNet, map_batches
from .weights import WeightsFolder

CLIP_FRAMES = 16
FEATURES = 400
DETECTOR_KWARGS = dict(rescale=True, resize=True, return_features=True)


def load_torchscript(weights: WeightsFolder, key: str, device="cpu") -> torch.jit.ScriptModule:
    """A TorchScript file of the weights folder, its ``forward`` checked to take StyleGAN-V's keywords."""
    path = weights.path(key)
    if not path.is_file():
        raise weights.error(key, "missing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # torch.jit is deprecated, the released file is TorchScript
            module = torch.jit.load(str(path), map_location=device).eval()
        names = {a.name for a in module.forward.schema.arguments}
    except Exception as exc:  # noqa: BLE001 - any failure means: not the real file
        raise weights.error(key, f"is not a TorchScript module ({type(exc).__name__})") from None
    if not set(DETECTOR_KWARGS) <= names:
        raise weights.error(key, f"forward takes {sorted(names - {'self'})}, not {sorted(DETECTOR_KWARGS)}")
    return module


def clips(frames: np.ndarray, length: int = CLIP_FRAMES) -> np.ndarray:
    """uint8 [T, H, W, 3] -> consecutive non-overlapping clips uint8 [T // length, 3, length, H, W]."""
    n = len(frames) // length
    x = np.asarray(frames[:n * length]).reshape(n, length, *frames.shape[1:])
    return np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))


class I3DFeatures(BatchedNet):
    """uint8 RGB frames -> I3D features of their 16-frame clips [n_clips, 400] (float64)."""

    batch_size = 4

    @classmethod
    def load(cls, weights: WeightsFolder, device="cpu") -> "I3DFeatures":
        return cls(load_torchscript(weights, "i3d", device), device)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = clips(frames)
        feats = map_batches(lambda sl: self.net(torch.from_numpy(x[sl]).to(self.device), **DETECTOR_KWARGS),
                            len(x), self.batch_size)
        return feats.reshape(len(x), -1)

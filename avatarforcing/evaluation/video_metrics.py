"""Weight-free metrics on face crops: colour drift (CIEDE2000), PSNR / SSIM against ground truth, pixel flicker.

* ΔE2000: mean CIEDE2000 (scikit-image's ``deltaE_ciede2000`` on ``rgb2lab``) between each frame's face crop and
  the reference image's, pixel by pixel (:func:`avatarforcing.metrics.delta_e` on the whole crop).
* PSNR: per frame, 8-bit peak, MSE floored at 1e-10 (identical frames give 148.1 dB, not infinity).
* SSIM: per frame, scikit-image's ``structural_similarity`` with Wang et al.'s settings (11 x 11 Gaussian window,
  sigma 1.5, population covariances, data range 255), averaged over RGB.
* Flicker: mean absolute difference of adjacent crops in [0, 255] (:func:`avatarforcing.metrics.adjacent_pixel_difference`).
"""
from __future__ import annotations

import numpy as np

from ..metrics import adjacent_pixel_difference, delta_e

__all__ = ["colour_drift", "psnr", "ssim", "flicker"]


def colour_drift(crops: np.ndarray, reference_crop: np.ndarray) -> np.ndarray:
    """CIEDE2000 between each crop [T, S, S, 3] and the reference crop [S, S, 3] -> [T]."""
    return delta_e(crops, reference_crop, crop=1.0)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR (dB) of uint8 frames a vs b [T, H, W, 3] -> [T]."""
    out = []
    for i in range(0, len(a), 256):
        diff = a[i:i + 256].astype(np.float64) - b[i:i + 256].astype(np.float64)
        out.append(10 * np.log10(255.0 ** 2 / np.maximum((diff ** 2).mean((1, 2, 3)), 1e-10)))
    return np.concatenate(out) if out else np.zeros(0)


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of uint8 frames a vs b [T, H, W, 3] -> [T]."""
    from skimage.metrics import structural_similarity

    return np.array([structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=255, channel_axis=-1) for x, y in zip(a, b)])


def flicker(crops: np.ndarray) -> np.ndarray:
    """Mean absolute pixel difference of adjacent crops -> [T-1]."""
    return adjacent_pixel_difference(crops)

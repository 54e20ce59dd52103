"""Fréchet distance between a feature set and a reference set's Gaussian (FID, FVD).

The value of pytorch-fid's ``calculate_frechet_distance`` (and :func:`avatarforcing.metrics.frechet_distance`):
``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``, with covariances normalised by N - 1.  The trace of
the matrix square root is computed from the features ``X`` [N, D] themselves: with ``A = (X - mu1) / sqrt(N - 1)``,
``S1 = A^T A`` and the non-zero eigenvalues of ``S1 S2`` are those of the symmetric N x N matrix ``A S2 A^T``, so
``tr(sqrtm(S1 S2)) = sum(sqrt(eigvalsh(A S2 A^T)))``.  Same quantity, no 2048 x 2048 ``scipy.linalg.sqrtm``
(40 s each on 2 CPU cores; this takes well under a second for a minute of video).
"""
from __future__ import annotations

import numpy as np

from .. import AvatarForcingError


def frechet_distance(features: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> float:
    """Fréchet distance of features [N >= 2, D] to the Gaussian ``stats`` = (mean [D], covariance [D, D])."""
    x = np.asarray(features, np.float64)
    mu2, sigma2 = stats
    if x.ndim != 2 or len(x) < 2 or x.shape[1] != len(mu2):
        raise AvatarForcingError(f"Fréchet distance needs features [N >= 2, {len(mu2)}], got {x.shape}; "
                                 "evaluate longer videos or more of them")
    mu1 = x.mean(0)
    a = (x - mu1) / np.sqrt(len(x) - 1)
    m = a @ sigma2 @ a.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + (a * a).sum() + np.trace(sigma2) - 2 * tr_sqrt)

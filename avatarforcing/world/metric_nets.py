"""The world's metric backend: renderer frames to train the metric nets on, and the speech envelope for lip sync.

Registered as metric backend ``world`` (:mod:`avatarforcing.backends`) by :mod:`avatarforcing.world`;
:class:`avatarforcing.metrics.MetricNets` trains on :func:`training_frames` and ``evaluate_video`` correlates
the sync expert's mouth opening with :func:`~avatarforcing.world.speech.speech_envelope`.
"""
from __future__ import annotations

import numpy as np

from ..backends import MetricBackend
from .render import render, sample_identity
from .speech import speech_envelope

ID_SEED_BASE = 10_000_000        # identity seeds used to train the metric nets (disjoint from clip seeds)


def training_frames(num_ids: int, per_id: int, size: int, seed: int):
    """Random poses / mouths / blinks of ``num_ids`` identities -> (uint8 [N,S,S,3], mouth [N], label [N])."""
    rng = np.random.default_rng([seed, 303])
    frames, mouth, labels = [], [], []
    for i in range(num_ids):
        ident = sample_identity(ID_SEED_BASE + 100_000 * seed + i)
        m = rng.uniform(0, 1, per_id) * (rng.uniform(size=per_id) < 0.8)        # ~20% closed mouths
        pose = np.stack([rng.uniform(-0.09, 0.09, per_id), rng.uniform(-0.06, 0.09, per_id),
                         rng.uniform(-0.11, 0.11, per_id)], 1)
        blink = rng.uniform(0, 1, per_id) * (rng.uniform(size=per_id) < 0.2)
        frames.append(render(ident, m, pose, blink, size=size, supersample=2))
        mouth.append(m)
        labels.append(np.full(per_id, i))
    return np.concatenate(frames), np.concatenate(mouth).astype(np.float32), np.concatenate(labels)


def envelope(wav, sample_rate: int, fps: int, num_frames: int) -> np.ndarray:
    """Per-frame loudness of the driving audio (the world's mouth follows it) -> float32 [T]."""
    return speech_envelope(np.asarray(wav, np.float32).reshape(-1), sample_rate, fps, num_frames)


METRIC_BACKEND = MetricBackend(training_frames=training_frames, envelope=envelope)

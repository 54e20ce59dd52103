"""The world's metric backends: renderer frames to train the metric nets on, and the speech envelope for lip sync.

Registered by :mod:`avatarforcing.world` (:mod:`avatarforcing.backends`) as metric backend ``world`` (v1's
renderer, :func:`training_frames`) and ``world_v2`` (:mod:`.render_v2`, :func:`training_frames_v2`);
:class:`avatarforcing.metrics.MetricNets` trains on their frames.  ``evaluate_video`` correlates the sync expert's
mouth opening with :func:`~avatarforcing.world.speech.speech_envelope` by default; the world's held-out v2 cases
pass their ground-truth mouth opening instead (:mod:`.evaluate`), so the v2 envelope is only a fallback.
"""
from __future__ import annotations

import numpy as np

from ..backends import MetricBackend
from .render import render, sample_identity
from .speech import speech_envelope

ID_SEED_BASE = 10_000_000        # identity seeds used to train the metric nets (disjoint from clip seeds)
ID_SEED_BASE_V2 = 40_000_000     # the same for world v2 (disjoint from v1's: 10M + 100k * seed + i, seed < 300)

# Uniform ranges of v2's head pose (POSE_KEYS) and light (LIGHT_KEYS): the bounds render_v2.sample_motion_v2's
# fast + slow terms reach over minutes (|_slow| <= its amplitude; yaw adds turns of up to 0.6 rad).
POSE_RANGE_V2 = ((-0.20, 0.20), (-0.13, 0.15), (-0.13, 0.13), (-0.72, 0.72), (-0.24, 0.24), (0.81, 1.23))
LIGHT_RANGE_V2 = ((-2.0, 2.0), (0.2, 0.8), (0.75, 1.25), (2800.0, 9000.0))


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


def _uniform(rng, ranges, n: int) -> np.ndarray:
    lo, hi = np.asarray(ranges, np.float64).T
    return rng.uniform(lo, hi, (n, len(lo)))


def mouth_shapes_v2(rng, n: int) -> np.ndarray:
    """Random v2 mouths [n, 5]: blends of the viseme shapes as co-articulation makes them, ~20% a pure viseme."""
    from .speech_tts import VISEME_SHAPES

    weights = rng.dirichlet(np.full(len(VISEME_SHAPES), 0.4), n)
    pure = rng.uniform(size=n) < 0.2
    weights[pure] = np.eye(len(VISEME_SHAPES))[rng.integers(len(VISEME_SHAPES), size=pure.sum())]
    return (weights @ VISEME_SHAPES).astype(np.float32)


def training_frames_v2(num_ids: int, per_id: int, size: int, seed: int):
    """World v2 frames of ``num_ids`` identities in random poses / zooms / lights / blinks / viseme mouths, rendered
    at ``size`` -> (uint8 [N,S,S,3], mouth opening [N] (= mouth[:, 0]), label [N])."""
    from .render_v2 import render_v2, sample_identity_v2

    rng = np.random.default_rng([seed, 707])
    frames, mouth, labels = [], [], []
    for i in range(num_ids):
        ident = sample_identity_v2(ID_SEED_BASE_V2 + 100_000 * seed + i)
        shapes = mouth_shapes_v2(rng, per_id)
        pose = _uniform(rng, POSE_RANGE_V2, per_id)
        light = _uniform(rng, LIGHT_RANGE_V2, per_id)
        blink = rng.uniform(0, 1, per_id) * (rng.uniform(size=per_id) < 0.2)
        frames.append(render_v2(ident, shapes, pose, light, blink, size=size))
        mouth.append(shapes[:, 0])
        labels.append(np.full(per_id, i))
    return np.concatenate(frames), np.concatenate(mouth).astype(np.float32), np.concatenate(labels)


def envelope(wav, sample_rate: int, fps: int, num_frames: int) -> np.ndarray:
    """Per-frame loudness of the driving audio (the world's mouth follows it) -> float32 [T]."""
    return speech_envelope(np.asarray(wav, np.float32).reshape(-1), sample_rate, fps, num_frames)


METRIC_BACKEND = MetricBackend(training_frames=training_frames, envelope=envelope)
METRIC_BACKEND_V2 = MetricBackend(training_frames=training_frames_v2, envelope=envelope)

"""The stream's units and the few conversions between them, written once.

* a latent frame is ``LATENT_STRIDE`` = 4 video frames (the Wan VAE's temporal compression), except latent
  frame 0, the reference, which is 1 video frame: F latent frames decode to 1 + 4 (F - 1) video frames;
* a block is ``block_frames`` latent frames (B, default 4); block b covers absolute latent frames
  1 + bB .. (b + 1)B (frame 0 is the reference);
* a timestep is 1000 sigma (the shift is applied when the levels are chosen: schedule.NoiseSchedule);
* derived seeds come from :func:`stable_seed`, a hash of their parts (the same on every machine and run).
"""
from __future__ import annotations

import hashlib

LATENT_STRIDE = 4          # video frames per latent frame


def block_latent_frames(block: int, block_frames: int) -> tuple[int, int]:
    """Absolute latent frames [first, stop) of block ``block`` (frame 0 is the reference)."""
    return 1 + block * block_frames, 1 + (block + 1) * block_frames


def video_frames(latent_frames: int) -> int:
    """Video frames decoded from ``latent_frames`` latent frames (the first one is a single frame)."""
    return 1 + LATENT_STRIDE * (latent_frames - 1)


def video_frames_of_latent(k: int) -> range:
    """Video frames decoded from latent frame k: range(0, 1) for k = 0, else 4k-3 .. 4k."""
    return range(0, 1) if k == 0 else range(LATENT_STRIDE * k - 3, LATENT_STRIDE * k + 1)


def stable_seed(*parts, bits: int = 63) -> int:
    """A seed derived from ``parts`` (e.g. run seed, step, micro-step, salt, rank) by SHA-256 of "a/b/c".

    ``bits`` 63 (trainer generators, ODE backfill) or 62 (DMD rollout noise): as the stored runs were made."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2 ** bits)

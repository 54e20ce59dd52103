"""Reference computations for tests: streaming attention written as ONE full forward with a mask.

The cached stream attends, for every group of query frames, to
[its own copy of the style anchor | the T clean frames right before it | itself].  Written as a single
sequence [anchor copies | clean frames | window] with a frame-level mask and explicit RoPE positions,
the same computation needs no cache at all; tests compare the two.
"""
from __future__ import annotations

import torch

from avatarforcing.attention import frame_mask

from avatarforcing.stream_state import CacheConfig
from avatarforcing.model import i2v_input


def full_window_forward(model, ref, text, clean_blocks, window, t_window, audio_all, cfg: CacheConfig, block_frames: int):
    """Flow prediction for ``window`` (frames after the clean blocks) by one masked forward.

    ref [B,16,1,h,w]; clean_blocks: list of emitted clean latents [B,16,Bf,h,w] (blocks 0..k-1);
    window [B,16,F,h,w]; t_window [B,F]; audio_all [B, n_frames, A] per absolute latent frame (or None).
    """
    Bsz = ref.shape[0]
    T = cfg.temporal_frames if cfg.temporal_anchor else 0
    clean = torch.cat(clean_blocks, 2) if clean_blocks else ref[:, :, :0]
    n_clean = clean.shape[2]
    Fw = window.shape[2]
    # query groups: each clean block, then the window; (first absolute frame, number of frames)
    qgroups = [(1 + b * block_frames, block_frames) for b in range(len(clean_blocks))] + [(1 + n_clean, Fw)]
    use_anchor = cfg.style_anchor
    n_anchor = len(qgroups) if use_anchor else 0

    frames_x, frames_t, frames_a, pos = [], [], [], []
    for gi, (first, _) in enumerate(qgroups):
        if not use_anchor:
            break
        u = max(1, first - T) if T else first
        rerun = gi < len(clean_blocks)          # a clean block's K/V come from the clean re-run
        absolute = not cfg.rope_reindex or (rerun and cfg.rerun_anchor == "absolute")
        pos.append(0 if absolute else u + cfg.anchor_offset)
        frames_x.append(i2v_input(ref, ref, 0, model.cfg.in_dim))
        frames_t.append(torch.zeros(Bsz, 1))
        frames_a.append(None if cfg.zero_anchor_audio else (first, first + 1))
    if n_clean:
        frames_x.append(i2v_input(clean, ref, 1, model.cfg.in_dim))
        frames_t.append(torch.full((Bsz, n_clean), float(cfg.context_noise)))
        frames_a.append((1, 1 + n_clean))
        pos.extend(range(1, 1 + n_clean))
    frames_x.append(i2v_input(window, ref, 1, model.cfg.in_dim))
    frames_t.append(t_window)
    frames_a.append((1 + n_clean, 1 + n_clean + Fw))
    pos.extend(range(1 + n_clean, 1 + n_clean + Fw))

    x = torch.cat(frames_x, 2)
    t = torch.cat(frames_t, 1)
    audio = None
    if audio_all is not None:
        parts = []
        for a in frames_a:
            parts.append(torch.zeros(Bsz, 1, audio_all.shape[-1]) if a is None else audio_all[:, a[0]:a[1]])
        audio = torch.cat(parts, 1)

    # frame-level groups: every frame is its own group; absolute frame f>=1 sits at index n_anchor + f - 1
    total = x.shape[2]
    allowed = [[] for _ in range(total)]
    for gi, (first, n) in enumerate(qgroups):
        ctx = ([gi] if use_anchor else [])
        ctx += [n_anchor + f - 1 for f in range(max(1, first - T), first)]
        own = [n_anchor + f - 1 for f in range(first, first + n)]
        for q in own:
            allowed[q] = ctx + own
        if use_anchor:
            allowed[gi] = [gi]
    h, w = window.shape[-2:]
    mask = frame_mask([1] * total, allowed, model.tokens_per_frame(h, w))
    out, _ = model(x, t, audio, text, torch.tensor(pos), None, mask)     # WanDiT.forward: x is built here
    return out[:, :, -Fw:]

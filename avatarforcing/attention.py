"""Attention primitives: Wan's 3-axis RoPE, SDPA on [B, S, H, D], the per-layer K/V container, masks.

The streaming context built from them ([style anchor | temporal cache | window], window-relative RoPE
positions) lives in avatarforcing/stream_state.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


class RotaryEmbedding:
    """Wan2.1 3-axis RoPE: head dim split into frame/height/width parts (44/42/42 for head dim 128)."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        assert head_dim % 2 == 0
        d6 = head_dim // 6
        self.axis_dims = (head_dim - 4 * d6, 2 * d6, 2 * d6)  # real dims per axis
        self.inv_freq = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in self.axis_dims]
        self._cache: dict = {}

    def __call__(self, frame_pos: torch.Tensor, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [F*h*w, head_dim/2] for frames at positions ``frame_pos`` [F] on an h x w grid."""
        key = (tuple(frame_pos.tolist()), h, w, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        pos = frame_pos.to(torch.float64)
        f_ang = pos[:, None] * self.inv_freq[0]                                   # [F, 22]
        h_ang = torch.arange(h, dtype=torch.float64)[:, None] * self.inv_freq[1]  # [h, 21]
        w_ang = torch.arange(w, dtype=torch.float64)[:, None] * self.inv_freq[2]  # [w, 21]
        nf = len(pos)
        ang = torch.cat([
            f_ang[:, None, None, :].expand(nf, h, w, -1),
            h_ang[None, :, None, :].expand(nf, h, w, -1),
            w_ang[None, None, :, :].expand(nf, h, w, -1),
        ], dim=-1).reshape(nf * h * w, -1)
        out = (ang.cos().float().to(device), ang.sin().float().to(device))
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = out
        return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[..., 2i], x[..., 2i+1]) as Wan's complex multiply.  x: [B, S, H, D]."""
    xf = x.float().unflatten(-1, (-1, 2))          # [B, S, H, D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA on [B, S, H, D] tensors; ``mask`` is a boolean [S_q, S_k] (True = may attend) or None."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@dataclass
class KV:
    """Pre-RoPE keys and values of some frames, per layer: lists of [B, frames*tokens_per_frame, H, D]."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    frames: int

    def tail(self, frames: int, tokens_per_frame: int) -> "KV":
        if frames >= self.frames:
            return self
        n = frames * tokens_per_frame
        return KV([k[:, -n:] for k in self.k], [v[:, -n:] for v in self.v], frames)

    @staticmethod
    def cat(a: "KV | None", b: "KV") -> "KV":
        if a is None or a.frames == 0:
            return b
        return KV([torch.cat([x, y], 1) for x, y in zip(a.k, b.k)],
                  [torch.cat([x, y], 1) for x, y in zip(a.v, b.v)], a.frames + b.frames)

    def detach(self) -> "KV":
        return KV([k.detach() for k in self.k], [v.detach() for v in self.v], self.frames)


def frame_mask(groups: list[int], allowed: list[list[int]], tokens_per_frame: int) -> torch.Tensor:
    """Token-level boolean mask from a frame-group structure.

    ``groups[g]`` is the number of frames in group g (in sequence order); ``allowed[g]`` lists the groups
    that group g's queries may attend to.  Used for block-causal training and as the oracle in tests.
    """
    sizes = [g * tokens_per_frame for g in groups]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    mask = torch.zeros(total, total, dtype=torch.bool)
    for g, targets in enumerate(allowed):
        for t in targets:
            mask[starts[g]:starts[g] + sizes[g], starts[t]:starts[t] + sizes[t]] = True
    return mask


def block_causal_groups(num_frames: int, block_frames: int, first_frame_alone: bool = True) -> tuple[list[int], list[list[int]]]:
    """Groups for a block-causal mask: [frame 0] + blocks of ``block_frames``; each group sees itself and earlier ones."""
    groups = [1] if first_frame_alone else []
    rest = num_frames - (1 if first_frame_alone else 0)
    while rest > 0:
        groups.append(min(block_frames, rest))
        rest -= groups[-1]
    allowed = [list(range(g + 1)) for g in range(len(groups))]
    return groups, allowed

"""Self-attention context for streaming: 3-axis RoPE, the dual-anchor KV cache, and attention masks.

Keys/values of one streaming forward are assembled as

    [ style anchor | temporal cache | window ]
      1 frame        <= T frames      F frames

Every key is stored *pre-RoPE* and rotated on the fly at a frame position *relative to the current
window*: the temporal frames sit at 0..n_t-1, the window at n_t..n_t+F-1, and the style anchor at the
virtual index ``d`` (= u_i + d with u_i the first frame of [temporal | window], so u_i = 0 here).
Attention under RoPE depends only on position differences, so this equals absolute positions while
the numbers never grow: streams are unbounded (no 1024-frame table).  With ``rope_reindex=False``
(ablation) the anchor keeps absolute position 0, i.e. relative position -u_i, drifting away.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

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


@dataclass
class CacheConfig:
    temporal_frames: int = 2       # temporal-anchor budget (latent frames)
    style_anchor: bool = True
    temporal_anchor: bool = True
    rope_reindex: bool = True
    anchor_offset: int = -1        # d
    zero_anchor_audio: bool = True
    context_noise: float = 0.0     # timestep of the clean re-run
    rerun_anchor: str = "window"   # anchor position in the clean re-run: window (u_i + d, as in the
                                   # denoising pass) | absolute (frame 0, the reference release)

    def __post_init__(self):
        if self.rerun_anchor not in ("window", "absolute"):
            from . import AvatarForcingError
            raise AvatarForcingError(f"cache.rerun_anchor is '{self.rerun_anchor}'; use window or absolute")

    @classmethod
    def from_config(cls, cfg) -> "CacheConfig":
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


@dataclass
class StreamCache:
    """Everything a stream carries between steps besides the window itself.

    anchor:   pre-RoPE K/V of the reference frame (one prefill at t=0 with zero audio)
    temporal: pre-RoPE K/V of the most recently emitted clean frames (<= temporal_frames)
    text:     cross-attention K/V of the prompt, computed once per stream
    next_frame: absolute latent index of the frame right after the temporal cache (= the window start)
    """

    cfg: CacheConfig
    tokens_per_frame: int
    grid: tuple[int, int]                  # (h, w) latent size of one frame
    text: list | None = None
    anchor: KV | None = None
    temporal: KV | None = None
    next_frame: int = 1
    rerun: bool = False                    # True inside clean_rerun(): the forward writes the temporal cache
    window_frames: int = 0                 # widest window forwarded so far (steady state: L*B)
    _rotated: tuple | None = field(default=None, repr=False)   # memo of rotated_context()

    @contextlib.contextmanager
    def clean_rerun(self):
        """Mark the forwards inside as the clean re-run of an emitted block (anchor position: cfg.rerun_anchor)."""
        self.rerun = True
        try:
            yield self
        finally:
            self.rerun = False

    def anchor_position(self, n_t: int) -> int:
        """Frame position of the style anchor relative to [temporal | window] (whose first frame is 0).

        Denoising pass: d (``anchor_offset``) with RoPE re-indexing, else the absolute frame 0, i.e. -u_i.
        Clean re-run with ``rerun_anchor = absolute`` (the reference release): absolute frame 0 as well."""
        u_abs = self.next_frame - n_t                       # absolute index of the first [temporal|window] frame
        if self.rerun and self.cfg.rerun_anchor == "absolute":
            return -u_abs
        return self.cfg.anchor_offset if self.cfg.rope_reindex else -u_abs

    def context(self) -> tuple[KV | None, torch.Tensor]:
        """K/V prepended to the window's own, and their frame positions relative to the window's context."""
        parts, pos = [], []
        n_t = self.temporal.frames if (self.temporal is not None and self.cfg.temporal_anchor) else 0
        if self.anchor is not None and self.cfg.style_anchor:
            parts.append(self.anchor)
            pos.append(self.anchor_position(n_t))
        if n_t:
            parts.append(self.temporal)
            pos.extend(range(n_t))
        kv = None
        for p in parts:
            kv = KV.cat(kv, p)
        return kv, torch.tensor(pos, dtype=torch.long)

    def rotated_context(self, rope: RotaryEmbedding, h: int, w: int, device=None) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer (RoPE-rotated keys, values) of [anchor | temporal], or None when there is no context.

        The window's N passes and the clean re-run of one step share the same context: it is assembled and
        rotated once per change of the cache (not per forward).  Context that carries gradients (training
        with a differentiable anchor) is rebuilt every call so that no graph is shared between backwards."""
        memo = self._rotated
        key = (self.next_frame, self.rerun, h, w, str(device))
        if memo is not None and memo[0] is self.anchor and memo[1] is self.temporal and memo[2] == key:
            return memo[3]
        kv, pos = self.context()
        out = None
        if kv is not None:
            cos, sin = rope(pos, h, w, device)     # (h, w): the token grid of one frame
            out = [(apply_rope(k, cos, sin), v) for k, v in zip(kv.k, kv.v)]
        if not (kv is not None and any(k.requires_grad for k in kv.k + kv.v)):
            self._rotated = (self.anchor, self.temporal, key, out)
        return out

    def steady_layout(self, num_frames: int) -> bool:
        """Whether a forward of ``num_frames`` frames has the steady-state layout, whose shapes repeat every
        step: the full context (anchor and ``temporal_frames`` of cache) and the widest window seen so far (L
        blocks; a window forward also records its width), or the clean re-run.  Warm-up and drain are not."""
        if not self.rerun:
            self.window_frames = max(self.window_frames, num_frames)
        if self.cfg.style_anchor and self.anchor is None:
            return False
        n_t = self.temporal.frames if (self.temporal is not None and self.cfg.temporal_anchor) else 0
        budget = self.cfg.temporal_frames if self.cfg.temporal_anchor else 0
        return n_t == max(budget, 0) and (self.rerun or num_frames == self.window_frames)

    def window_positions(self, num_frames: int) -> torch.Tensor:
        n_t = self.temporal.frames if (self.temporal is not None and self.cfg.temporal_anchor) else 0
        return torch.arange(n_t, n_t + num_frames)

    def push_temporal(self, kv: KV) -> None:
        """Append the clean re-run's K/V of an emitted block and keep the last ``temporal_frames`` frames."""
        self.next_frame += kv.frames
        if not self.cfg.temporal_anchor or self.cfg.temporal_frames <= 0:
            return
        self._rotated = None                  # the memo holds the previous temporal K/V: let them go now
        n = self.cfg.temporal_frames
        kv = kv.detach().tail(n, self.tokens_per_frame)
        old = n - kv.frames                   # frames still needed from the previous cache
        if old > 0 and self.temporal is not None:
            kv = KV.cat(self.temporal.tail(old, self.tokens_per_frame), kv)          # new tensors
        else:   # own the storage: a slice would keep the whole re-run block alive (a view stays a view)
            kv = KV([k.clone() for k in kv.k], [v.clone() for v in kv.v], kv.frames)
        self.temporal = kv

    def nbytes(self) -> int:
        total = 0
        for kv in (self.anchor, self.temporal):
            if kv is not None:
                total += sum(t.numel() * t.element_size() for t in kv.k + kv.v)
        if self.text is not None:
            total += sum(t.numel() * t.element_size() for kv in self.text for t in kv)
        return total


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

"""The state one stream carries between steps, and the operations that change it.

Keys/values of one streaming forward are assembled as

    [ style anchor | temporal cache | window ]
      1 frame        <= T frames      F frames

* :class:`StreamCache` holds the anchor's and the temporal frames' K/V (pre-RoPE), the prompt's
  cross-attention K/V and the absolute index of the next frame; :class:`CacheConfig` its switches.
* :func:`prefill_anchor` writes the style anchor: one forward of the reference frame at t = 0 (zero audio).
* :func:`write_temporal` is the clean re-run of an emitted block at t = ``context_noise`` (noised with the
  stream's noise at level -1 when it is > 0) whose K/V are pushed into the temporal cache.
* :class:`NoiseSource` is the stream's Gaussian noise keyed by (block, level).

The streaming sampler (inference and the DMD rollout) and the ODE trainer's context (train/ode.py) all
call these, so the context the student is trained with is built by the code that builds it at inference.

Every key is stored *pre-RoPE* and rotated on the fly at a frame position *relative to the current
window*: the temporal frames sit at 0..n_t-1, the window at n_t..n_t+F-1, and the style anchor at the
virtual index ``d`` (= u_i + d with u_i the first frame of [temporal | window], so u_i = 0 here).
Attention under RoPE depends only on position differences, so this equals absolute positions while
the numbers never grow: streams are unbounded (no 1024-frame table).  With ``rope_reindex=False``
(ablation) the anchor keeps absolute position 0, i.e. relative position -u_i, drifting away; with
``rerun_anchor=absolute`` (the reference release) it does so in the clean re-run only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .attention import KV, RotaryEmbedding, apply_rope
from .model import WanDiT
from .schedule import WindowSchedule, add_noise


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
    reference_in_temporal: bool = False   # the reference (latent frame 0, the video's first frame) starts the
                                   # temporal cache, as a causal model's first emitted frame would; it leaves
                                   # with the budget.  The only route of identity without the style anchor
                                   # when the model has no reference channels (model.in_dim = 16)

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
    text:     the prompt: its per-block cross-attention K/V, computed once per stream (inference), or its
              embeddings [batch, L, text_dim], projected at every forward (training, with grad)
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
        text = [self.text] if isinstance(self.text, torch.Tensor) else [t for kv in self.text or [] for t in kv]
        total += sum(t.numel() * t.element_size() for t in text)
        return total


class NoiseSource:
    """Gaussian noise keyed by (block, level): results do not depend on the order of draws."""

    def __init__(self, seed: int, device=None, dtype=torch.float32):
        self.seed, self.device, self.dtype = int(seed), torch.device(device or "cpu"), dtype

    def __call__(self, block: int, level: int, shape) -> torch.Tensor:
        g = torch.Generator(device=self.device)
        g.manual_seed((self.seed * 1_000_003 + block * 1_009 + level * 7 + 1) % (2 ** 63))
        return torch.randn(shape, generator=g, device=self.device, dtype=torch.float32).to(self.dtype)


# ----------------------------------------------------------------------------------------------
# operations on a stream's cache


@torch.no_grad()
def prefill_anchor(model: WanDiT, cache: StreamCache, ref: torch.Tensor, audio: torch.Tensor | None = None) -> None:
    """Style anchor: the reference frame [batch, z, 1, h, w] at t = 0, with zero audio (``audio`` only for the
    anchor-audio ablation)."""
    cache.anchor = model.reference_kv(ref, audio, cache)


@torch.no_grad()
def seed_temporal(model: WanDiT, cache: StreamCache, ref: torch.Tensor) -> None:
    """The reference frame [batch, z, 1, h, w] as absolute latent frame 0 of the temporal cache: its clean re-run
    at t = 0 with zero audio, attending to the style anchor if there is one (``cache.reference_in_temporal``)."""
    if not cache.cfg.temporal_anchor or cache.cfg.temporal_frames <= 0 or cache.next_frame != 1:
        return
    cache.next_frame = 0
    t = torch.zeros(ref.shape[0], 1, device=model.device)
    with cache.clean_rerun():
        kv = model.window_kv(ref, ref, t, None, cache)
    cache.push_temporal(kv)


@torch.no_grad()
def write_temporal(model: WanDiT, cache: StreamCache, schedule: WindowSchedule, ref: torch.Tensor, block: int,
                   clean: torch.Tensor, audio: torch.Tensor | None, noise: NoiseSource) -> None:
    """Clean re-run of emitted block ``block`` (x0 [batch, z, block_frames, h, w], its first latent frame is
    ``cache.next_frame``) at t = ``context_noise``; its K/V become the newest temporal frames."""
    if not cache.cfg.temporal_anchor or cache.cfg.temporal_frames <= 0:
        cache.next_frame += clean.shape[2]
        return
    tc = float(cache.cfg.context_noise)
    x = clean
    if tc > 0:
        x = add_noise(clean, noise(block, -1, clean.shape), float(schedule.noise.sigma(tc)))
    t = torch.full((clean.shape[0], clean.shape[2]), tc, device=model.device)
    with cache.clean_rerun():
        kv = model.window_kv(x, ref, t, audio, cache)
    cache.push_temporal(kv)

"""The Wan2.1 DiT with per-frame timesteps, audio injection and a streaming KV context.

Parameter names are Wan2.1's own (``wan/modules/model.py``) plus the AvatarForcing audio modules
(``audio_proj``, ``audio_cond_projs``), so released checkpoints load without renaming tables
(see avatarforcing/checkpoint.py).  One model class serves every role, through one method per use:

* ``clip(noisy, ref, t, audio, text)``: a whole clip, bidirectional (teacher, critic; with ``mask`` and
  ``frame_pos`` any structured attention, as the tests' oracle does),
* ``window(noisy, ref, t, audio, cache)``: the streaming student, attending to
  [style anchor | temporal cache | window] (avatarforcing/attention.py, avatarforcing/stream_state.py),
* ``window_kv(clean, ref, t, audio, cache)`` / ``reference_kv(ref, audio, cache)``: the K/V written into the
  cache by the clean re-run and the style-anchor prefill.

Each builds its input channels itself (:func:`i2v_input`: 33, or 16 without reference channels) and runs
:meth:`WanDiT.forward`, the tensor computation they share.

Shapes: latents [B, C, F, H, W]; tokens [B, S, dim] with S = F * h * w, h = H/2, w = W/2 (patch 1x2x2);
per-frame modulation e [B, F, 6, dim]; audio features per latent frame [B, F, audio_dim].
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.utils.checkpoint
from einops import rearrange

from .attention import KV, RotaryEmbedding, apply_rope, attention

if TYPE_CHECKING:
    from .stream_state import StreamCache


@dataclass
class DiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_layers: int = 30
    num_heads: int = 12
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_dim: int = 33
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    audio_dim: int = 43008
    audio_proj_dim: int = 32
    audio_layers: tuple = (2, 15)          # inclusive range of blocks that receive audio
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.in_dim not in (self.out_dim, 2 * self.out_dim + 1):
            from . import AvatarForcingError
            raise AvatarForcingError(
                f"model.in_dim={self.in_dim} with out_dim={self.out_dim}: use {2 * self.out_dim + 1} (noisy + "
                f"reference channels + mask, Wan2.1 I2V) or {self.out_dim} (identity through attention only)")

    @classmethod
    def from_config(cls, cfg) -> "DiTConfig":
        kw = {f.name: cfg[f.name] for f in fields(cls) if f.name in cfg}
        kw["patch_size"] = tuple(kw.get("patch_size", cls.patch_size))
        kw["audio_layers"] = tuple(kw.get("audio_layers", cls.audio_layers))
        return cls(**kw)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_block_ids(self) -> list[int]:
        lo, hi = self.audio_layers
        return list(range(lo, min(hi, self.num_layers - 1) + 1))


PRESETS = {
    "wan2.1-1.3b": DiTConfig(),
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_layers=4, num_heads=4, freq_dim=32, text_dim=32, text_len=8,
                      audio_dim=4 * 16, audio_proj_dim=8, audio_layers=(1, 2)),
}


def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    position = position.to(torch.float64)
    sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half, dtype=torch.float64,
                                                                       device=position.device).div(half)))
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1)


class WanRMSNorm(nn.Module):
    """RMS norm computed in fp32; the output keeps the input's dtype (no promotion by an fp32 weight)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class WanLayerNorm(nn.LayerNorm):
    """Layer norm computed in fp32 (weights upcast with it); the output keeps the input's dtype.

    The release's own norm does not upcast, and an fp32 input with a bf16 affine weight is rejected by the
    layer-norm kernels (CPU and CUDA), so both the statistics and the affine run in fp32 here."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__(dim, elementwise_affine=elementwise_affine, eps=eps)

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x, rope, ctx=None, mask=None):
        """x [B, S, dim]; rope (cos, sin) for x's tokens; ctx (k_rotated, v) to prepend, [B, S_c, H, D].

        Returns the output and this call's pre-RoPE (k, v), which the stream caches."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, self.head_dim))
        v = self.v(x).unflatten(-1, (self.num_heads, self.head_dim))
        q_r, k_r = apply_rope(q, *rope), apply_rope(k, *rope)
        if ctx is not None:
            k_all, v_all = torch.cat([ctx[0], k_r], 1), torch.cat([ctx[1], v], 1)
        else:
            k_all, v_all = k_r, v
        out = attention(q_r, k_all, v_all, mask)
        return self.o(out.flatten(2)), k, v


class WanCrossAttention(WanSelfAttention):
    """Text cross-attention (Wan T2V); its K/V depend only on the prompt and are computed once per stream."""

    def kv(self, context):
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, self.head_dim))
        v = self.v(context).unflatten(-1, (self.num_heads, self.head_dim))
        return k, v

    def forward(self, x, kv):
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        return self.o(attention(q, kv[0], kv[1]).flatten(2))


def _modulate(x, shift, scale, frames: int):
    """adaLN per latent frame: x [B, F*T, C], shift/scale [B, F, C]."""
    x = x.unflatten(1, (frames, -1))
    return (x * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


def _gate(y, gate, frames: int):
    return (y.unflatten(1, (frames, -1)) * gate[:, :, None]).flatten(1, 2)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = WanLayerNorm(dim, cfg.eps)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = WanLayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.ffn_chunk_tokens = 0          # > 0: run the FFN over this many tokens at a time (low-VRAM mode)

    def _ffn(self, x):
        """The FFN, optionally in token chunks: its [S, ffn_dim] hidden state is the largest activation."""
        n = self.ffn_chunk_tokens
        if n <= 0 or x.shape[1] <= n:
            return self.ffn(x)
        return torch.cat([self.ffn(part) for part in x.split(n, dim=1)], dim=1)

    def forward(self, x, e, rope, text_kv, ctx=None, mask=None):
        """x [B, S, C]; e [B, F, 6, C] per-frame modulation."""
        frames = e.shape[1]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (
            (self.modulation.float()[:, None] + e.float()).unbind(2))               # each [B, F, C]
        y, k, v = self.self_attn(_modulate(self.norm1(x).float(), shift_msa, scale_msa, frames).type_as(x),
                                 rope, ctx, mask)
        x = x + _gate(y.float(), gate_msa, frames).type_as(x)
        x = x + self.cross_attn(self.norm3(x), text_kv)
        y = self._ffn(_modulate(self.norm2(x).float(), shift_ffn, scale_ffn, frames).type_as(x))
        x = x + _gate(y.float(), gate_ffn, frames).type_as(x)
        return x, k, v


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        """e [B, F, C] (time embedding before the 6-way projection)."""
        shift, scale = (self.modulation.float()[:, None] + e.float()[:, :, None]).unbind(2)
        return self.head(_modulate(self.norm(x).float(), shift, scale, e.shape[1]).type_as(x))


class AudioProjection(nn.Module):
    """Per-latent-frame audio (4 video frames x features) -> a small code; names match the release."""

    def __init__(self, audio_dim: int, out_dim: int = 32):
        super().__init__()
        self.proj = nn.Linear(audio_dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(self, a):
        return self.norm_out(self.proj(a))


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.audio_proj = AudioProjection(cfg.audio_dim, cfg.audio_proj_dim)
        self.audio_cond_projs = nn.ModuleList([nn.Linear(cfg.audio_proj_dim, dim) for _ in cfg.audio_block_ids])
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self._compiled = None               # compile_streaming()
        self.init_weights()

    def init_weights(self):
        """Wan's init: xavier for linears, zero output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in self.text_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.time_embedding.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    @property
    def dtype(self):
        return self.patch_embedding.weight.dtype

    @property
    def device(self):
        return self.patch_embedding.weight.device

    def set_ffn_chunk(self, tokens: int) -> None:
        """Compute every block's FFN over ``tokens`` tokens at a time (0 = all at once); same result."""
        for blk in self.blocks:
            blk.ffn_chunk_tokens = int(tokens)

    def tokens_per_frame(self, height: int, width: int) -> int:
        """Tokens of one latent frame of size height x width (latent pixels)."""
        _, ph, pw = self.cfg.patch_size
        return (height // ph) * (width // pw)

    # ---- conditioning -------------------------------------------------------------------------
    def text_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prompt embeddings [B, L, text_dim] -> per-block cross-attention (k, v)."""
        c = self.text_embedding(context.to(self.dtype))
        return [blk.cross_attn.kv(c) for blk in self.blocks]

    def time_embed(self, t: torch.Tensor, frames: int, batch: int):
        """t [B] or [B, F] -> e [B, F, C], e0 [B, F, 6, C] (float32)."""
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() == 1:
            t = t[:, None].expand(-1, frames)
        with torch.autocast(self.device.type, enabled=False):
            e = self.time_embedding(sinusoidal_embedding_1d(self.cfg.freq_dim, t.reshape(-1)).float().to(
                self.time_embedding[0].weight.dtype)).float()
            e0 = self.time_projection(e.to(self.time_projection[1].weight.dtype)).float()
        return e.view(batch, frames, -1), e0.view(batch, frames, 6, -1)

    def audio_codes(self, audio: torch.Tensor | None, batch: int, frames: int):
        """audio [B, F, audio_dim] (None = zeros) -> per injected block [B, F, dim]."""
        if audio is None:
            audio = torch.zeros(batch, frames, self.cfg.audio_dim, device=self.device, dtype=self.dtype)
        a = self.audio_proj(audio.to(self.dtype))
        return [proj(a) for proj in self.audio_cond_projs]

    # ---- the four uses ---------------------------------------------------------------------------
    # Each builds the input channels (i2v_input), the frame positions and the attention context, then
    # runs ``self(...)`` (forward), so module hooks (FSDP2 unsharding, profilers) see every call.

    def clip(self, noisy: torch.Tensor, ref: torch.Tensor, t: torch.Tensor, audio: torch.Tensor | None,
             text: torch.Tensor, *, frame_pos: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Flow v = eps - x0 of a whole clip whose frame 0 is the reference (teacher, critic).

        noisy [B, 16, F, h, w] (frame 0 = the reference latent); ref [B, 16, 1, h, w]; t [B, F] per-frame
        timesteps (or [B]); audio [B, F, audio_dim] or None (zeros); text: prompt embeddings [B, L, text_dim].
        Attention is bidirectional over the clip, or restricted by a boolean token ``mask`` [S, S] at RoPE
        frame positions ``frame_pos`` [F] (default 0..F-1).  Returns [B, 16, F, h, w]."""
        pos = torch.arange(noisy.shape[2]) if frame_pos is None else frame_pos
        flow, _ = self(i2v_input(noisy, ref, 0, self.cfg.in_dim), t, audio, text, pos, None, mask)
        return flow

    def window(self, noisy: torch.Tensor, ref: torch.Tensor, t: torch.Tensor, audio: torch.Tensor | None,
               cache: StreamCache) -> torch.Tensor:
        """The student: flow of one streaming window that attends to [style anchor | temporal cache | window].

        noisy [B, 16, F, h, w] starts at absolute latent frame ``cache.next_frame``; t [B, F]; audio
        [B, F, audio_dim] or None; the prompt's K/V come from the cache.  Returns [B, 16, F, h, w]."""
        return self.run(self.window_call(noisy, ref, t, audio, cache))[0]

    def window_kv(self, clean: torch.Tensor, ref: torch.Tensor, t: torch.Tensor, audio: torch.Tensor | None,
                  cache: StreamCache) -> KV:
        """The clean re-run: pre-RoPE K/V of an emitted block (frames from ``cache.next_frame``) attending to
        the cache, for the temporal cache (no output head).  Call inside ``cache.clean_rerun()``."""
        return self.run(self.window_call(clean, ref, t, audio, cache, kv=True))[1]

    def reference_kv(self, ref: torch.Tensor, audio: torch.Tensor | None, cache: StreamCache) -> KV:
        """The style anchor: pre-RoPE K/V of the reference frame [B, 16, 1, h, w] at t = 0 on its own
        (frame position 0, no context); ``audio`` [B, 1, audio_dim] or None (zeros, as the paper)."""
        return self.run(self.reference_call(ref, audio, cache))[1]

    # The streaming uses as ForwardCalls: the arguments of one forward, which avatarforcing/multistream.py
    # stacks over several streams into one batched forward.
    def window_call(self, noisy, ref, t, audio, cache: StreamCache, kv: bool = False) -> "ForwardCall":
        x = i2v_input(noisy, ref, cache.next_frame, self.cfg.in_dim)
        ctx = cache.rotated_context(self.rope, *self._grid(x), self.device)
        steady = cache.steady_layout(x.shape[2])
        return ForwardCall(x, self._frame_t(t, x), audio, cache.text, cache.window_positions(x.shape[2]), ctx,
                           kv=kv, compiled=steady)

    def reference_call(self, ref, audio, cache: StreamCache) -> "ForwardCall":
        t = torch.zeros(ref.shape[0], 1, device=self.device)
        x = i2v_input(ref, ref, 0, self.cfg.in_dim)
        return ForwardCall(x, t, audio, cache.text, torch.arange(1), None, kv=True)

    def run(self, call: "ForwardCall") -> tuple[torch.Tensor | None, KV | None]:
        return self(call.x, call.t, call.audio, call.text, call.frame_pos, call.ctx, kv=call.kv,
                    compiled=call.compiled)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, audio: torch.Tensor | None,
                text: torch.Tensor | list, frame_pos: torch.Tensor, ctx: list | None = None,
                mask: torch.Tensor | None = None, *, kv: bool = False,
                compiled: bool = False) -> tuple[torch.Tensor | None, KV | None]:
        """The tensor computation behind :meth:`clip`, :meth:`window`, :meth:`window_kv` and
        :meth:`reference_kv` (call those).  Always returns (flow, None), or (None, this call's pre-RoPE
        K/V) with ``kv=True``.

        x [B, in_dim, F, H, W] (i2v_input); t [B, F] (or [B], or a scalar); text: prompt embeddings
        [B, L, text_dim], projected here (inside forward, where FSDP has unsharded the weights), or a cache's
        per-block cross-attention K/V; frame_pos [F]: RoPE frame positions of x's frames; ctx: per block
        (rotated k, v) of the cache, or None.  ``compiled`` (the caller's statement that the layout is the
        steady state) runs :meth:`compile_streaming`'s graph.
        """
        text_kv = self.text_kv(text) if isinstance(text, torch.Tensor) else list(text)
        rope = self.rope(torch.as_tensor(frame_pos), *self._grid(x), self.device)   # memoised per layout
        core = self._compiled.run if compiled and self._compiled is not None and mask is None else self.forward_core
        out, ks, vs = core(x, self._frame_t(t, x), audio, text_kv, rope, ctx, mask, kv=kv)
        return out, (KV(ks, vs, x.shape[2]) if kv else None)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        _, ph, pw = self.cfg.patch_size
        return x.shape[-2] // ph, x.shape[-1] // pw

    def _frame_t(self, t, x: torch.Tensor) -> torch.Tensor:
        """Timesteps as [B, F]: a scalar or [B] holds for every frame."""
        B, F = x.shape[0], x.shape[2]
        t = torch.as_tensor(t, device=self.device)
        if t.dim() == 0:
            t = t.expand(B)
        return t[:, None].expand(-1, F) if t.dim() == 1 else t

    def forward_core(self, x: torch.Tensor, t: torch.Tensor, audio: torch.Tensor | None,
                     text_kv: list[tuple[torch.Tensor, torch.Tensor]], rope: tuple[torch.Tensor, torch.Tensor],
                     ctx: list[tuple[torch.Tensor, torch.Tensor]] | None = None, mask: torch.Tensor | None = None,
                     kv: bool = False):
        """The forward on tensors only (no Python-side state): what torch.compile traces.

        x [B, in_dim, F, H, W]; t [B, F]; audio [B, F, audio_dim] or None; text_kv per block (k, v)
        [B, L, H, D]; rope (cos, sin) [F*h*w, D/2] for x's tokens; ctx per block (rotated k, v) [B, S_c, H, D]
        prepended to the self-attention K/V, or None.  Returns (flow, [], []), or with ``kv`` (None, per-block
        pre-RoPE k, per-block v) without running the output head.
        """
        B, _, Fn, H, W = x.shape
        _, ph, pw = self.cfg.patch_size
        h, w = H // ph, W // pw
        tokens = self.patch_embedding(x.to(self.dtype))                       # [B, C, F, h, w]
        tokens = rearrange(tokens, "b c f h w -> b (f h w) c")
        e, e0 = self.time_embed(t, Fn, B)

        codes = self.audio_codes(audio, B, Fn)
        audio_at = {blk_id: i for i, blk_id in enumerate(self.cfg.audio_block_ids)}
        ks, vs = [], []
        for i, blk in enumerate(self.blocks):
            if i in audio_at:   # additive per-frame audio, broadcast over the frame's tokens
                tokens = (tokens.unflatten(1, (Fn, -1)) + codes[audio_at[i]][:, :, None]).flatten(1, 2)
            ctx_i = ctx[i] if ctx is not None else None
            if self.cfg.gradient_checkpointing and torch.is_grad_enabled():
                tokens, k, v = torch.utils.checkpoint.checkpoint(blk, tokens, e0, rope, text_kv[i], ctx_i, mask,
                                                                 use_reentrant=False)
            else:
                tokens, k, v = blk(tokens, e0, rope, text_kv[i], ctx_i, mask)
            if kv:
                ks.append(k)
                vs.append(v)

        out = None
        if not kv:
            out = self.head(tokens, e)                                         # [B, S, out*p]
            out = rearrange(out, "b (f h w) (pf ph pw c) -> b c (f pf) (h ph) (w pw)", f=Fn, h=h, w=w,
                            pf=self.cfg.patch_size[0], ph=ph, pw=pw)
        return out, ks, vs

    # ---- compilation --------------------------------------------------------------------------
    def compile_streaming(self, mode: str = "default", backend="inductor") -> None:
        """Run the streaming steady state through ``torch.compile(forward_core)``; compiles lazily.

        Compiled: forwards with a cache whose layout repeats every step (full context [anchor | temporal]
        and the full window of L blocks, or the clean re-run), i.e. two static-shape graphs per batch size
        and dtype.  Warm-up, drain, the anchor prefill and cache-free forwards stay eager (each shape runs
        once per stream).  mode: ``default`` | ``reduce-overhead`` (CUDA graphs on GPU) | ``max-autotune``
        (as torch.compile); backend: as torch.compile (tests pass a counting backend)."""
        if mode not in _COMPILE_MODES:
            from . import AvatarForcingError
            raise AvatarForcingError(f"inference.compile_mode is '{mode}'; use one of {', '.join(_COMPILE_MODES)}")
        self._compiled = _CompiledCore(self, mode, backend)

    def compile_report(self) -> list[dict]:
        """One entry per compiled graph: its layout and the seconds of its first call (tracing + codegen)."""
        return [] if self._compiled is None else list(self._compiled.report)


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class _CompiledCore:
    """``torch.compile(model.forward_core)`` (static shapes, no graph breaks) plus a log of its compiles.

    With CUDA graphs (``reduce-overhead`` / ``max-autotune``) the outputs live in the graphs' memory pool,
    which the next replay overwrites: they are cloned before they leave (the cache keeps the K/V)."""

    def __init__(self, model: WanDiT, mode: str, backend):
        kw = {} if mode == "default" else {"mode": mode}
        # Dynamo's recompile limit (8) counts graphs per code object, i.e. of forward_core over every model
        # instance: 2 per model x batch size x dtype.  Past it, calls would silently fall back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.fn = torch.compile(model.forward_core, backend=backend, fullgraph=True, dynamic=False, **kw)
        self.clone = mode in ("reduce-overhead", "max-autotune")
        self.seen: set = set()
        self.report: list[dict] = []

    def __deepcopy__(self, memo):
        return None         # a copy of the model must not call this model's forward_core: it runs eager

    def run(self, x, t, audio, text_kv, rope, ctx, mask, kv=False):
        key = (tuple(x.shape), x.dtype, 0 if ctx is None else ctx[0][0].shape[1], kv)
        first = key not in self.seen
        if first:
            t0 = time.perf_counter()
        out, ks, vs = self.fn(x, t, audio, text_kv, rope, ctx, mask, kv=kv)
        if first:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            self.seen.add(key)
            self.report.append({"input": list(key[0]), "dtype": str(key[1]), "context_tokens": key[2],
                                "kv": kv,
                                "first_call_s": time.perf_counter() - t0})
        if self.clone:
            out = None if out is None else out.clone()
            ks, vs = [k.clone() for k in ks], [v.clone() for v in vs]
        return out, ks, vs


@dataclass
class ForwardCall:
    """The arguments of one :meth:`WanDiT.forward` (see there): a streaming use prepared for running."""
    x: torch.Tensor                      # [B, in_dim, F, H, W]
    t: torch.Tensor                      # [B, F]
    audio: torch.Tensor | None           # [B, F, audio_dim]
    text: torch.Tensor | list            # prompt embeddings [B, L, text_dim] or per-block (k, v) [B, L, H, D]
    frame_pos: torch.Tensor              # [F]
    ctx: list | None                     # per block (rotated k, v) [B, S_c, H, D]
    kv: bool = False
    compiled: bool = False


def i2v_input(noisy: torch.Tensor, ref: torch.Tensor, first_frame: int, in_dim: int = 33) -> torch.Tensor:
    """The DiT's input channels for ``in_dim``: the two layouts the model supports.

    * ``in_dim = 2C + 1`` (33; Wan2.1 I2V, the released checkpoint): [noisy (C) | reference latent repeated (C) |
      mask (1)].  The mask channel is 0 at absolute frame 0 (the reference) and 1 elsewhere (docs/spec.md section 3).
    * ``in_dim = C`` (16): the noisy latents alone.  Identity then reaches the model only through attention to the
      reference frame (frame 0 of a clip; the style anchor when streaming), as the paper describes its anchor.

    noisy [B, C, F, h, w] holds absolute latent frames first_frame..first_frame+F-1; ref [B, C, 1, h, w].
    """
    B, C, Fn, h, w = noisy.shape
    if in_dim == C:                                   # DiTConfig checks in_dim is C or 2C + 1
        return noisy
    y = ref.to(noisy.dtype).expand(B, -1, Fn, h, w)
    m = torch.ones(B, 1, Fn, h, w, dtype=noisy.dtype, device=noisy.device)
    if first_frame == 0:
        m[:, :, 0] = 0
    return torch.cat([noisy, y, m], dim=1)


def build_model(cfg_model) -> WanDiT:
    """Build from the ``model:`` config section (or a DiTConfig / preset name)."""
    if isinstance(cfg_model, str):
        return WanDiT(PRESETS[cfg_model])
    if isinstance(cfg_model, DiTConfig):
        return WanDiT(cfg_model)
    return WanDiT(DiTConfig.from_config(cfg_model))

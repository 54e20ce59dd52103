"""The streaming sampler B_{L,N} (paper Algorithm 1) on latents.

:class:`StreamingSampler` owns one stream: the reference latent, the dual-anchor cache, the blocks in
the window and the noise source.  ``step()`` runs one streaming step of the :class:`WindowSchedule`:

1. append fresh noise for the block that enters the window;
2. N times: one joint forward over the window (per-frame timesteps, window-aligned audio, anchors in
   the cache), x0 = x_t - sigma * v; every block not yet at its last level is re-noised with fresh
   noise to its next level;
3. emit the oldest block's x0 when it reached the last level, and write the temporal cache with a
   clean re-run of it (t = context_noise).

Per-step compute and memory depend only on B, L, N and the cache budget, never on the stream length.
The same object is used by the DMD rollout (``grad=True`` on the steps that backpropagate).

Latent frame indices are absolute: frame 0 is the reference, block b covers 1+bB .. (b+1)B.
Audio is pulled from a callable ``audio(start, stop) -> [batch, stop-start, audio_dim]`` (None = zeros)
so a live source can block until the window's audio has arrived.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from .model import WanDiT
from .schedule import StreamStep, WindowSchedule, add_noise, flow_to_x0
from .stream_state import CacheConfig, NoiseSource, StreamCache, prefill_anchor, seed_temporal, write_temporal
from .units import block_latent_frames

AudioSource = Callable[[int, int], torch.Tensor]


class StreamingSampler:
    """One stream of B_{L,N} windows with the dual-anchor KV cache."""

    def __init__(self, model: WanDiT, schedule: WindowSchedule, cache_cfg: CacheConfig, ref_latent: torch.Tensor,
                 text: torch.Tensor | list, audio: AudioSource | None = None, noise: NoiseSource | None = None,
                 num_blocks: int | None = None, plan: Iterator[StreamStep] | None = None):
        """ref_latent [batch, z, 1, h, w]; text: prompt embeddings [batch, L, text_dim] or ``model.text_kv`` output.

        ``plan`` replaces ``schedule.plan(num_blocks)``, e.g. a live stream that drains once its audio ends."""
        self.model, self.schedule, self.cfg = model, schedule, cache_cfg
        self.ref = ref_latent.to(model.device, model.dtype)
        self.batch, self.channels, _, self.h, self.w = self.ref.shape
        self.audio = audio
        self.noise = noise or NoiseSource(0, model.device, model.dtype)
        self.num_blocks = num_blocks
        self.plan: Iterator[StreamStep] = plan if plan is not None else schedule.plan(num_blocks)
        self.window: dict[int, torch.Tensor] = {}      # block -> current noisy latent [batch, z, B, h, w]
        with torch.no_grad():
            text_kv = model.text_kv(text) if isinstance(text, torch.Tensor) else text
        self.cache = StreamCache(cache_cfg, model.tokens_per_frame(self.h, self.w), (self.h, self.w), text=text_kv)
        if cache_cfg.style_anchor:
            prefill_anchor(model, self.cache, self.ref)
        if cache_cfg.reference_in_temporal:
            seed_temporal(model, self.cache, self.ref)

    # ---- helpers -------------------------------------------------------------------------------
    def _audio(self, start: int, stop: int) -> torch.Tensor | None:
        if self.audio is None:
            return None
        a = self.audio(start, stop)
        return a.to(self.model.device, self.model.dtype)

    # ---- one streaming step --------------------------------------------------------------------
    def step(self, grad: bool = False) -> dict | None:
        """Run the next streaming step.  Returns None when the stream is finished, else a dict with
        ``step`` (StreamStep), ``x0`` {block: x0 prediction of the last pass} and ``emitted`` (block, x0) or None."""
        step = next(self.plan, None)
        if step is None:
            return None
        sch, model = self.schedule, self.model
        B = sch.B
        for blk, age in zip(step.blocks, step.ages):
            if age == 0:
                self.window[blk] = self.noise(blk, 0, (self.batch, self.channels, B, self.h, self.w))
        first, _ = block_latent_frames(step.blocks[0], B)
        _, stop = block_latent_frames(step.blocks[-1], B)
        audio = self._audio(first, stop)
        if not self.cfg.zero_anchor_audio and self.cfg.style_anchor:
            # Ablation: the anchor receives the audio of the window's first latent frame.
            prefill_anchor(model, self.cache, self.ref, None if audio is None else audio[:, :1])

        x0 = {}
        for n in range(sch.N):
            levels = [sch.level(age, n) for age in step.ages]
            x = torch.cat([self.window[b] for b in step.blocks], dim=2)
            t = torch.tensor([sch.timesteps[l] for l in levels for _ in range(B)], device=model.device)
            sigma = torch.tensor([sch.sigmas[l] for l in levels for _ in range(B)], device=model.device)
            t, sigma = t.expand(self.batch, -1), sigma.expand(self.batch, -1)
            with torch.set_grad_enabled(grad):
                flow = model.window(x, self.ref, t, audio, self.cache)
                pred = flow_to_x0(x, flow, sigma)
            for i, (blk, level) in enumerate(zip(step.blocks, levels)):
                x0[blk] = pred[:, :, i * B:(i + 1) * B]
                if level + 1 < sch.num_levels:
                    eps = self.noise(blk, level + 1, x0[blk].shape)
                    self.window[blk] = add_noise(x0[blk].detach(), eps, sch.sigmas[level + 1])

        emitted = None
        if step.emits is not None:
            blk = step.emits
            emitted = (blk, x0[blk])
            del self.window[blk]
            write_temporal(model, self.cache, sch, self.ref, blk, x0[blk].detach(),
                           audio[:, :B] if audio is not None else None, self.noise)
        return {"step": step, "x0": x0, "emitted": emitted}

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (block, x0 [batch, z, B, h, w]) for every emitted block, in order (B = block_frames)."""
        while True:
            out = self.step()
            if out is None:
                return
            if out["emitted"] is not None:
                yield out["emitted"]

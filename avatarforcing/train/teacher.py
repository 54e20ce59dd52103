"""The bidirectional audio-conditioned teacher: flow-matching training, CFG, and its Euler ODE sampler.

The teacher is the same :class:`~avatarforcing.model.WanDiT` as the student, run over a whole latent clip
without a cache.  Frame 0 is the reference latent, kept clean (t = 0, mask channel 0 via
:meth:`WanDiT.clip`, zero audio); frames 1.. are noised at one timestep per sample and
the target is the flow v = eps - x0 on frames 1.. (docs/spec.md sections 2, 3, 6).

CFG (:func:`guided_flow`) combines up to three passes: c = (text, audio), m = (text, zero audio) and
u = (negative prompt, zero audio):  v = u + s_text (m - u) + s_audio (c - m).  With equal scales this is
v = u + s (c - u) and the m pass is skipped (docs/spec.md section 3: CFG 4.5, Wan negative prompt, zeroed audio).

The sampler's sigma grid contains the student's sigmas exactly (:func:`sigma_grid`), so ODE backfill stores
trajectory states at exactly the student's timesteps, whatever the teacher step count or shift.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import AvatarForcingError
from ..schedule import NoiseSchedule, add_noise, flow_to_x0, shift_sigma
from .stage import Stage


# ---- inputs -------------------------------------------------------------------------------------------

def with_reference(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Latent clip [B, C, F, h, w] with frame 0 replaced by the reference latent [B, C, 1, h, w]."""
    return torch.cat([ref.to(x.dtype), x[:, :, 1:]], dim=2)


def frame_timesteps(t: torch.Tensor, frames: int) -> torch.Tensor:
    """Per-sample t [B] -> per-frame [B, F] with frame 0 (the clean reference) at 0."""
    tf = t.float()[:, None].expand(-1, frames).clone()
    tf[:, 0] = 0
    return tf


def zero_ref_audio(audio: torch.Tensor | None) -> torch.Tensor | None:
    """The reference frame gets zero audio (as the style anchor does at inference)."""
    if audio is None:
        return None
    audio = audio.clone()
    audio[:, 0] = 0
    return audio


def noised_clip(x0: torch.Tensor, ref: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t of a clip: frames 1.. at timestep t [B] with ``noise``, frame 0 = ref.  Returns (x_t, t per frame)."""
    tf = frame_timesteps(t, x0.shape[2])
    x_t = add_noise(with_reference(x0, ref), noise, tf / num_train_timesteps)
    return with_reference(x_t, ref), tf


def clip_flow(model, x_t: torch.Tensor, t_frames: torch.Tensor, ref: torch.Tensor, audio, text) -> torch.Tensor:
    """The teacher / critic forward over a whole clip (bidirectional attention)."""
    return model.clip(x_t, ref, t_frames, zero_ref_audio(audio), text)


def flow_matching_loss(model, x0: torch.Tensor, ref: torch.Tensor, audio, text, t: torch.Tensor,
                       noise: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """MSE between the predicted flow and v = eps - x0 on frames 1.. (teacher training, DMD critic)."""
    x0 = with_reference(x0, ref)
    x_t, tf = noised_clip(x0, ref, t, noise, num_train_timesteps)
    flow = clip_flow(model, x_t, tf, ref, audio, text)
    target = noise.float() - x0.float()
    return F.mse_loss(flow[:, :, 1:].float(), target[:, :, 1:])


def condition_dropout(text: torch.Tensor, audio: torch.Tensor, empty_text: torch.Tensor, p_text: float,
                      p_audio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-sample dropout of text (-> the empty prompt) and audio (-> zeros) for CFG."""
    B = text.shape[0]
    drop_t = torch.rand(B, generator=generator) < p_text
    drop_a = torch.rand(B, generator=generator) < p_audio
    text = torch.where(drop_t[:, None, None].to(text.device), empty_text.to(text)[None].expand_as(text), text)
    audio = audio * (~drop_a).to(audio)[:, None, None]
    return text, audio


# ---- CFG ----------------------------------------------------------------------------------------------

def guidance_passes(guidance_scale: float, audio_guidance_scale: float) -> int:
    if guidance_scale == 1.0 and audio_guidance_scale == 1.0:
        return 1
    return 2 if guidance_scale == audio_guidance_scale else 3


def guidance_text(text: torch.Tensor, negative: torch.Tensor, passes: int) -> torch.Tensor:
    """Prompt embeddings of the stacked CFG batch [c | m | u] ([c | u] for 2 passes)."""
    neg = negative.to(text)[None].expand_as(text) if negative.dim() == 2 else negative.to(text)
    return {1: text, 2: torch.cat([text, neg]), 3: torch.cat([text, text, neg])}[passes]


def guided_flow(model, x_t: torch.Tensor, t_frames: torch.Tensor, ref: torch.Tensor, audio: torch.Tensor | None,
                text, guidance_scale: float, audio_guidance_scale: float) -> torch.Tensor:
    """CFG flow of the teacher.  ``text`` is :func:`guidance_text`'s stacked embeddings."""
    passes = guidance_passes(guidance_scale, audio_guidance_scale)
    B = x_t.shape[0]
    audio = zero_ref_audio(audio) if audio is not None else torch.zeros(
        B, x_t.shape[2], model.cfg.audio_dim, device=x_t.device)
    if passes == 1:
        return model.clip(x_t, ref, t_frames, audio, text).float()
    zeros = torch.zeros_like(audio)
    audios = [audio, zeros] if passes == 2 else [audio, zeros, zeros]
    out = model.clip(x_t.repeat(passes, 1, 1, 1, 1), ref.repeat(passes, 1, 1, 1, 1), t_frames.repeat(passes, 1),
                     torch.cat(audios), text).float()
    if passes == 2:
        c, u = out.chunk(2)
        return u + guidance_scale * (c - u)
    c, m, u = out.chunk(3)
    return u + guidance_scale * (m - u) + audio_guidance_scale * (c - m)


# ---- the ODE sampler ----------------------------------------------------------------------------------

def sigma_grid(num_steps: int, shift: float, required: list[float], tol: float = 1e-6) -> list[float]:
    """Descending sigmas 1 -> 0 of an Euler sampler with ``num_steps`` shifted-uniform steps, with every
    sigma of ``required`` present exactly (a grid point within ``tol`` is replaced, otherwise one is inserted)."""
    if num_steps < 1:
        raise AvatarForcingError(f"ode.teacher_steps must be >= 1, got {num_steps}")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    grid = [float(s) for s in shift_sigma(u, shift)]
    for s in required:
        s = float(s)
        if not 0.0 < s <= 1.0:
            raise AvatarForcingError(f"student sigma {s} is outside (0, 1]; check schedule.steps")
        near = [i for i, g in enumerate(grid) if abs(g - s) <= tol]
        if near:
            grid[near[0]] = s
        else:
            grid.append(s)
    grid = sorted(set(grid), reverse=True)
    if grid[0] != 1.0:
        grid.insert(0, 1.0)
    if grid[-1] != 0.0:
        grid.append(0.0)
    return grid


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, ref: torch.Tensor, audio: torch.Tensor | None, text, grid: list[float],
                 guidance_scale: float, audio_guidance_scale: float, record: list[float] = (),
                 num_train_timesteps: int = 1000, autocast=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Teacher Euler ODE sampling from ``noise`` (frames 1..; frame 0 is set to ``ref``) along ``grid``.

    ``text``: :func:`guidance_text`'s stacked prompt embeddings.  Returns the clean endpoint [B, C, F, h, w]
    and the states at each sigma of ``record`` (which must lie
    on the grid: build it with :func:`sigma_grid`)."""
    index = {s: i for i, s in enumerate(grid)}
    missing = [s for s in record if float(s) not in index]
    if missing:
        raise AvatarForcingError(f"sigmas {missing} are not on the sampler grid; build it with sigma_grid(required=...)")
    want = {index[float(s)]: k for k, s in enumerate(record)}
    states: list[torch.Tensor | None] = [None] * len(record)
    x = with_reference(noise.float(), ref.float())
    B, Fn = x.shape[0], x.shape[2]
    for i, (s, s_next) in enumerate(zip(grid[:-1], grid[1:])):
        if i in want:
            states[want[i]] = x.clone()
        t = torch.full((B,), s * num_train_timesteps, device=x.device)
        tf = frame_timesteps(t, Fn)
        ctx = autocast() if autocast is not None else torch.autocast(x.device.type, enabled=False)
        with ctx:
            v = guided_flow(model, x, tf, ref, audio, text, guidance_scale, audio_guidance_scale)
        x = with_reference(x + (s_next - s) * v.float(), ref.float())
    if len(grid) - 1 in want:
        states[want[len(grid) - 1]] = x.clone()
    return x, states


def teacher_x0(model, x_t, t_frames, ref, audio, text, guidance_scale, audio_guidance_scale) -> torch.Tensor:
    """The teacher's (CFG) x0 prediction of a noisy clip, float32 (DMD's real score)."""
    v = guided_flow(model, x_t, t_frames, ref, audio, text, guidance_scale, audio_guidance_scale)
    return flow_to_x0(x_t.float(), v, t_frames / 1000.0)


class TeacherStage(Stage):
    """``train_teacher.py``: flow matching of the bidirectional teacher on clip samples."""

    name = "teacher"

    def __init__(self, cfg, trainer):
        from .data import CLIP_FIELDS, BatchStream, ShardDataset, read_null_text
        from .roles import build_dit
        self.cfg, self.tr = cfg, trainer
        tc = cfg.train
        if not cfg.data.shards:
            from .. import AvatarForcingError as E
            raise E("data.shards is not set; pass data.shards=<directory written by scripts/preprocess.py>")
        self.noise = NoiseSchedule(int(cfg.schedule.num_train_timesteps), float(cfg.schedule.shift))
        ds = ShardDataset(cfg.data.shards, CLIP_FIELDS, cfg.model.text_len, on_error=cfg.data.on_error)
        self.data = BatchStream(ds, tc.batch_size, rank=trainer.rank, world=trainer.world, seed=cfg.seed,
                                prefetch=cfg.data.prefetch)
        self.null = read_null_text(cfg.data.shards, cfg.model.text_len, cfg.model.text_dim,
                                   allow_zeros=cfg.text.encoder == "none")
        model = build_dit(cfg, tc.init, use_ema=tc.init_ema)
        self.role = trainer.add_role("model", model, lr=tc.lr, ema=True)

    def data_states(self):
        return {"data": self.data}

    def loss(self, batch, generator, dropout: bool = True) -> torch.Tensor:
        dev = self.tr.device
        x0, ref = batch["latents"].to(dev), batch["ref"].to(dev)
        audio, text = batch["audio"].to(dev), batch["text"].to(dev)
        B = x0.shape[0]
        if dropout:
            text, audio = condition_dropout(text, audio, self.null["empty"], float(self.cfg.teacher.text_dropout),
                                            float(self.cfg.teacher.audio_dropout), generator)
        t = self.noise.sample_timesteps(B, generator=generator, min_t=float(self.cfg.teacher.t_min),
                                        max_t=float(self.cfg.teacher.t_max)).to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        with self.tr.autocast():
            return flow_matching_loss(self.role.model, x0, ref, audio, text, t, noise, self.noise.num_train_timesteps)

    def train_step(self, step: int) -> dict:
        losses, stats = self.tr.accumulate(
            self.role, step, lambda micro: self.loss(self.data.next(), self.tr.generator(step, micro)))
        return {"loss": sum(loss / len(losses) for loss in losses), **stats}

    @torch.no_grad()
    def eval_loss(self, batch, seed: int = 1234) -> float:
        g = torch.Generator().manual_seed(seed)
        return self.loss(batch, g, dropout=False).item()

    def export_role(self):
        return self.role

"""Stage 2: DMD on rolling-window rollouts with mixed-window backprop (paper section 3.4).

Rollout (:func:`rollout`): the student runs :class:`~avatarforcing.sampler.StreamingSampler` exactly as at
inference (B_{L,N} windows, heterogeneous noise, dual-anchor KV cache, clean re-run of emitted blocks) over
a clip of ``num_blocks`` blocks; the emitted blocks after the reference frame form the generated clip x.

Mixed-window backprop (:func:`choose_backprop_steps`): only some streaming steps run with grad (``grad=True``
in ``StreamingSampler.step``); the others run without.  The steps are drawn among the steps that emit a
block by a generator seeded from (seed, global step, micro-step) only, so every process picks the same ones.
Inside the sampler the window is re-noised from detached predictions, so the gradient of an emitted block
flows through the forward of the step that emitted it (its last, cleanest window position).

Which blocks the DMD loss reaches (``dmd.grad_blocks``):

* ``emitted`` (default): the clip is [ref | every emitted block]; only the emitted block of a chosen step
  carries gradient, i.e. the denoiser is trained at the oldest window position (t = 555.6 by default) only.
* ``window``: the rollout stops after the last chosen step and the clip is [ref | blocks emitted so far |
  that step's x0 predictions of the blocks still in its window]; every window position, i.e. every noise
  level of the heterogeneous window, receives DMD gradient (issue: "adapts the denoiser to
  heterogeneous-noise windows").

Generator loss (:func:`dmd_gradient`, :func:`dmd_loss`): with t ~ shifted uniform clamped to
[``dmd.t_min``, ``dmd.t_max``] (one t per sample, all frames), x_t = (1 - sigma) x + sigma eps on frames 1..
(frame 0 is the clean reference), real = frozen teacher x0 with CFG, fake = critic x0:

    g = (fake(x_t) - real(x_t)) / mean|x - real(x_t)|        L = 0.5 ||x - stopgrad(x - g)||^2

so dL/dx = g (``dmd.loss_reduction: sum``) or g / numel (``mean``, DMD's convention, the paper's lrs).
Critic (fake score): initialised from the teacher, trained by flow matching on no-grad rollouts,
``dmd.critic_updates`` updates per generator update.
"""
from __future__ import annotations


import torch

from .. import AvatarForcingError
from ..stream_state import CacheConfig, NoiseSource
from ..sampler import StreamingSampler
from ..schedule import NoiseSchedule, WindowSchedule, flow_to_x0
from ..units import stable_seed
from . import data as D
from .teacher import clip_flow, flow_matching_loss, guidance_passes, guidance_text, noised_clip, teacher_x0
from .distributed import full_params, param_digest
from .roles import build_dit
from .stage import Stage


def dmd_gradient(x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """g = (fake - real) / mean|x - real|, the normaliser per sample (float32, no grad)."""
    x, fake, real = x.detach().float(), fake_x0.detach().float(), real_x0.detach().float()
    dims = tuple(range(1, x.dim()))
    norm = (x - real).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
    return (fake - real) / norm


def dmd_loss(x: torch.Tensor, g: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """0.5 ||x - stopgrad(x - g)||^2: its gradient w.r.t. x is g (sum) or g / x.numel() (mean)."""
    target = (x.detach().float() - g.float())
    sq = (x.float() - target) ** 2
    if reduction == "sum":
        return 0.5 * sq.sum()
    if reduction == "mean":
        return 0.5 * sq.mean()
    raise AvatarForcingError(f"dmd.loss_reduction must be 'mean' or 'sum', got {reduction!r}")


def choose_backprop_steps(schedule: WindowSchedule, num_blocks: int, count: int, generator: torch.Generator) -> list[int]:
    """Indices of the streaming steps that run with grad: ``count`` of the steps that emit a block."""
    emitting = [s.index for s in schedule.plan(num_blocks) if s.emits is not None]
    count = len(emitting) if count < 0 else min(int(count), len(emitting))
    pick = torch.randperm(len(emitting), generator=generator)[:count].tolist()
    return sorted(emitting[i] for i in pick)


GRAD_BLOCKS = ("emitted", "window")


def rollout(model, schedule: WindowSchedule, cache_cfg: CacheConfig, ref: torch.Tensor, text, audio: torch.Tensor | None,
            num_blocks: int, noise: NoiseSource, grad_steps=(), grad_blocks: str = "emitted") -> torch.Tensor:
    """Inference rollout of the student: [B, C, 1 + n * B, h, w] = [ref | blocks 0..n-1].

    ``grad_blocks=emitted``: n = num_blocks, every block as emitted.  ``window``: the rollout ends after the
    last of ``grad_steps``; its window's blocks enter as that step's x0 predictions (n = its newest block + 1).
    ``text``: prompt embeddings or ``model.text_kv`` output (computed with grad to train the text path)."""
    if grad_blocks not in GRAD_BLOCKS:
        raise AvatarForcingError(f"dmd.grad_blocks is '{grad_blocks}'; use emitted or window")
    grad_steps = set(grad_steps)
    src = None if audio is None else (lambda s, e: audio[:, s:e])
    sampler = StreamingSampler(model, schedule, cache_cfg, ref, text, audio=src, noise=noise, num_blocks=num_blocks)
    blocks: dict[int, torch.Tensor] = {}
    i = 0
    while True:
        out = sampler.step(grad=i in grad_steps and torch.is_grad_enabled())
        if out is None:
            break
        if out["emitted"] is not None:
            blk, x0 = out["emitted"]
            blocks[blk] = x0
        if grad_blocks == "window" and grad_steps and i == max(grad_steps):
            blocks.update({b: x0 for b, x0 in out["x0"].items() if b not in blocks})
            break
        i += 1
    return torch.cat([ref.to(blocks[0].dtype)] + [blocks[b] for b in range(len(blocks))], dim=2)


class DMDStage(Stage):
    """``train_dmd.py``: generator (student) + critic (fake score) against the frozen CFG teacher."""

    name = "dmd"

    def __init__(self, cfg, trainer):
        self.cfg, self.tr = cfg, trainer
        dc = cfg.dmd
        src = dc.data
        if not src:
            raise AvatarForcingError("dmd.data is not set (default: data.ode); pass dmd.data=<ODE store or shards folder>")
        if dc.grad_blocks not in GRAD_BLOCKS:
            raise AvatarForcingError(f"dmd.grad_blocks is '{dc.grad_blocks}'; use emitted or window")
        if not dc.teacher:
            raise AvatarForcingError("dmd.teacher is not set; pass dmd.teacher=<teacher checkpoint> (real score, critic init)")
        self.schedule = WindowSchedule.from_config(cfg.schedule)
        self.cache_cfg = CacheConfig.from_config(cfg.cache)
        self.noise_sched = NoiseSchedule(int(cfg.schedule.num_train_timesteps), float(cfg.schedule.shift))
        ds = D.ShardDataset(src, D.COND_FIELDS, cfg.model.text_len, on_error=cfg.data.on_error)
        self.data = D.BatchStream(ds, cfg.train.batch_size, rank=trainer.rank, world=trainer.world, seed=cfg.seed,
                                  prefetch=cfg.data.prefetch)
        self.null = D.read_null_text(src, cfg.model.text_len, cfg.model.text_dim, allow_zeros=cfg.text.encoder == "none")
        self.gs, self.ags = float(cfg.teacher.guidance_scale), float(cfg.teacher.audio_guidance_scale)   # real score
        gen_init = dc.generator or dc.teacher
        gen = build_dit(cfg, gen_init, use_ema=dc.generator_ema if dc.generator else dc.teacher_ema, what="generator")
        critic = build_dit(cfg, dc.teacher, use_ema=dc.teacher_ema, what="critic")
        teacher = build_dit(cfg, dc.teacher, use_ema=dc.teacher_ema, what="teacher")
        self.teacher = trainer.add_frozen("teacher", teacher)
        self.gen = trainer.add_role("generator", gen, lr=dc.lr, ema=True, betas=dc.betas, grad_clip=dc.grad_clip)
        self.critic = trainer.add_role("critic", critic, lr=dc.lr_critic, ema=False, betas=dc.betas,
                                       grad_clip=dc.grad_clip_critic)
        self.last_video = None

    def data_states(self):
        return {"data": self.data}

    # -- pieces ---------------------------------------------------------------------------------------------
    def num_blocks(self, batch) -> int:
        nb = self.cfg.dmd.num_blocks
        if nb is None:
            return max(1, (batch["audio"].shape[1] - 1) // self.schedule.B)
        need = 1 + int(nb) * self.schedule.B
        if batch["audio"].shape[1] < need:
            raise AvatarForcingError(f"dmd.num_blocks={nb} needs {need} latent frames of audio, samples have "
                                     f"{batch['audio'].shape[1]}; lower dmd.num_blocks")
        return int(nb)

    def text_kv(self, role, text):
        """Cross-attention K/V of the prompt; with grad (trains the text path) unless FSDP shards the model."""
        if self.tr.fsdp:
            with torch.no_grad(), full_params(role.model):
                return role.model.text_kv(text)
        return role.model.text_kv(text)

    def generate(self, batch, step: int, micro: int, salt: str, grad_steps=()) -> torch.Tensor:
        dev = self.tr.device
        ref, audio, text = batch["ref"].to(dev), batch["audio"].to(dev), batch["text"].to(dev)
        noise = NoiseSource(stable_seed(self.cfg.seed, step, micro, salt, self.tr.rank, bits=62), dev)
        with self.tr.autocast():
            kv = self.text_kv(self.gen, text)
            return rollout(self.gen.model, self.schedule, self.cache_cfg, ref, kv, audio, self.num_blocks(batch),
                           noise, grad_steps, str(self.cfg.dmd.grad_blocks) if grad_steps else "emitted")

    def sample_t(self, batch_size: int, generator) -> torch.Tensor:
        dc = self.cfg.dmd
        return self.noise_sched.sample_timesteps(batch_size, generator=generator, min_t=float(dc.t_min),
                                                 max_t=float(dc.t_max)).to(self.tr.device)

    def critic_loss(self, x, batch, generator) -> torch.Tensor:
        dev = self.tr.device
        ref, audio, text = batch["ref"].to(dev), batch["audio"].to(dev), batch["text"].to(dev)
        audio = audio[:, :x.shape[2]]
        t = self.sample_t(x.shape[0], generator)
        eps = torch.randn(x.shape, generator=generator).to(dev)
        with self.tr.autocast():
            return flow_matching_loss(self.critic.model, x.detach().float(), ref, audio, text, t, eps,
                                      self.noise_sched.num_train_timesteps)

    @torch.no_grad()
    def scores(self, x, batch, generator):
        """(fake x0, real CFG x0) of the noised clip, float32."""
        dev = self.tr.device
        ref, text = batch["ref"].to(dev), batch["text"].to(dev)
        audio = batch["audio"].to(dev)[:, :x.shape[2]]
        t = self.sample_t(x.shape[0], generator)
        eps = torch.randn(x.shape, generator=generator).to(dev)
        x_t, tf = noised_clip(x.detach().float(), ref, t, eps, self.noise_sched.num_train_timesteps)
        with self.tr.autocast():
            fake = flow_to_x0(x_t, clip_flow(self.critic.model, x_t, tf, ref, audio, text).float(),
                              tf / self.noise_sched.num_train_timesteps)
            passes = guidance_passes(self.gs, self.ags)
            real = teacher_x0(self.teacher, x_t, tf, ref, audio,
                              guidance_text(text, self.null["negative"].to(dev), passes), self.gs, self.ags)
        return fake.float(), real.float()

    def generator_loss(self, x, batch, generator) -> tuple[torch.Tensor, torch.Tensor]:
        fake, real = self.scores(x, batch, generator)
        g = dmd_gradient(x[:, :, 1:], fake[:, :, 1:], real[:, :, 1:])
        return dmd_loss(x[:, :, 1:], g, str(self.cfg.dmd.loss_reduction)), g

    # -- the step ---------------------------------------------------------------------------------------------
    def critic_micro_loss(self, step: int, k: int, micro: int) -> torch.Tensor:
        """Critic update ``k``: flow matching on a no-grad rollout of the generator."""
        batch = self.data.next()
        with torch.no_grad():
            x = self.generate(batch, step, micro, f"critic{k}")
        return self.critic_loss(x, batch, self.tr.generator(step, micro, salt=100 + k))

    def train_step(self, step: int) -> dict:
        dc = self.cfg.dmd
        critic_losses = []
        stats = {}
        for k in range(int(dc.critic_updates)):
            losses, s = self.tr.accumulate(self.critic, step, lambda micro: self.critic_micro_loss(step, k, micro))
            critic_losses += losses
            stats.update(s)
        g_abs_micro, chosen = [], []

        def generator_micro_loss(micro: int) -> torch.Tensor:
            batch = self.data.next()
            steps = choose_backprop_steps(self.schedule, self.num_blocks(batch), int(dc.backprop_steps),
                                          self.tr.generator(step, micro, salt=3, per_rank=False))
            chosen.append(steps)
            x = self.generate(batch, step, micro, "gen", grad_steps=steps)
            loss, g = self.generator_loss(x, batch, self.tr.generator(step, micro, salt=4))
            g_abs_micro.append(g.abs().mean().item())
            self.last_video = x.detach()
            return loss

        losses, s = self.tr.accumulate(self.gen, step, generator_micro_loss)
        stats.update(s)
        gen_loss = sum(loss / len(losses) for loss in losses)
        g_abs = sum(v / len(g_abs_micro) for v in g_abs_micro)
        rec = {"step": step, "backprop_steps": chosen, "gen_loss": gen_loss}
        if self.cfg.train.trace:
            rec["generator"] = param_digest(self.gen.model)
            rec["critic"] = param_digest(self.critic.model)
        self.tr.trace(rec)
        return {"gen_loss": gen_loss, "critic_loss": sum(critic_losses) / max(1, len(critic_losses)),
                "dmd/g_abs": g_abs, **stats}

    def sample_video(self):
        return self.last_video

    def export_role(self):
        return self.gen

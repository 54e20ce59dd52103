"""Stage 1: ODE backfill (teacher trajectories) and one-step ODE regression of the streaming student.

Backfill (:func:`backfill`, ``scripts/ode_backfill.py``): for every clip sample, run the teacher's Euler
sampler with CFG from seeded noise along a sigma grid that contains the student's sigmas exactly, and store
the states at exactly ``WindowSchedule.from_config(cfg.schedule).timesteps`` (noisiest first) plus the clean
endpoint and the conditioning (format: :mod:`.data`).  The student timesteps are derived from the config,
never written down twice; the regression refuses a store made for other timesteps.

Regression (:class:`ODEStage`, ``train_ode.py``): a training example is one streaming step of the
:class:`~avatarforcing.schedule.WindowSchedule` plan of the clip (warm-up and drain windows included, or
only full windows): block j of the window sits at the schedule level of its age (``level = age * N + n``,
pass n random), its input is the stored trajectory at that level, its target the clean endpoint.  The
context is built exactly as at inference (:func:`build_cache`): a :class:`StreamCache` whose style anchor
is the reference frame prefilled at t = 0 with zero audio and whose temporal anchor is written by clean
re-runs (t = ``cache.context_noise``) of the clean endpoint's preceding blocks, pushed through
``StreamCache.push_temporal`` (the last ``cache.temporal_frames`` frames are kept).  Re-running
``ode.context_blocks`` preceding blocks reproduces inference exactly when it covers all earlier blocks (the
cache of a re-run depends on the re-runs before it); 2 blocks is a good approximation at a small cost.
The window forward then attends to [anchor | temporal | window] with window-relative RoPE, like
``StreamingSampler``.  The loss is the MSE between x0 = flow_to_x0(x_t, v, sigma) and the clean endpoint.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import AvatarForcingError
from ..schedule import StreamStep, WindowSchedule, flow_to_x0
from ..stream_state import CacheConfig, NoiseSource, StreamCache, prefill_anchor, seed_temporal, write_temporal
from ..units import block_latent_frames, stable_seed
from . import data as D
from .roles import build_dit
from .stage import Stage
from .teacher import euler_sample, guidance_passes, guidance_text, sigma_grid

log = logging.getLogger(__name__)


# ---- backfill -------------------------------------------------------------------------------------------

def student_schedule(cfg) -> WindowSchedule:
    return WindowSchedule.from_config(cfg.schedule)


def backfill_grid(cfg) -> tuple[list[float], list[float]]:
    """(teacher sigma grid, student sigmas on it) from the config."""
    sch = student_schedule(cfg)
    shift = float(cfg.ode.teacher_shift if cfg.ode.teacher_shift is not None else cfg.schedule.shift)
    grid = sigma_grid(int(cfg.ode.teacher_steps), shift, sch.sigmas)
    return grid, list(sch.sigmas)


def backfill(cfg, rank: int = 0, world: int = 1, device=None, progress: bool = True) -> dict:
    """Write ODE samples for this process's share of ``data.shards`` into ``data.ode``.  Resumable."""
    if not cfg.data.shards or not cfg.data.ode:
        raise AvatarForcingError("ODE backfill needs data.shards=<clip samples> and data.ode=<output directory>")
    if not cfg.ode.teacher:
        raise AvatarForcingError("ode.teacher is not set; pass ode.teacher=<teacher checkpoint> (train_teacher.py export)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sch = student_schedule(cfg)
    grid, sigmas = backfill_grid(cfg)
    out_dir = Path(cfg.data.ode)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = D.list_samples(cfg.data.shards)
    per_clip = int(cfg.ode.samples_per_clip)
    work = [(f, k) for f in files for k in range(per_clip)]
    if cfg.ode.num_samples is not None:
        work = work[:int(cfg.ode.num_samples)]
    mine = D.shard_work(work, rank, world)
    gs, ags = float(cfg.teacher.guidance_scale), float(cfg.teacher.audio_guidance_scale)
    passes = guidance_passes(gs, ags)
    null = D.read_null_text(cfg.data.shards, cfg.model.text_len, cfg.model.text_dim,
                            allow_zeros=cfg.text.encoder == "none")
    if rank == 0 and not (out_dir / D.NULL_TEXT).is_file():
        D.write_null_text(out_dir, null["empty"], null["negative"])
    dtype = torch.bfloat16 if (device.type == "cuda" and str(cfg.ode.dtype) in ("bf16", "bfloat16")) else torch.float32
    teacher = None
    stats = {"written": 0, "skipped_done": 0, "bad": 0, "bad_files": []}
    store_dtype = D.storage_dtype(cfg.data.dtype)
    from tqdm.auto import tqdm
    bar = tqdm(mine, desc=f"backfill[{rank}/{world}]", disable=not progress, dynamic_ncols=True)
    for path, k in bar:
        sample_id = f"{path.stem}_n{k}" if per_clip > 1 else path.stem
        out = D.sample_path(out_dir, sample_id)
        if out.is_file():
            stats["skipped_done"] += 1
            continue
        try:
            s, meta = D.read_sample(path, D.CLIP_FIELDS, with_metadata=True)
        except D.BadSample as exc:
            if cfg.data.on_error == "fail":
                raise AvatarForcingError(f"{exc} (data.on_error=fail)") from None
            log.warning("skipping bad sample %s", exc)
            stats["bad"] += 1
            stats["bad_files"].append(str(path))
            continue
        lat = s["latents"].float()
        if (lat.shape[1] - 1) % sch.B:
            raise AvatarForcingError(f"{path}: {lat.shape[1]} latent frames; (F - 1) must be a multiple of "
                                     f"schedule.block_frames={sch.B}; preprocess with matching data.clip_blocks")
        if teacher is None:
            teacher = build_dit(cfg, cfg.ode.teacher, use_ema=cfg.ode.teacher_ema, what="teacher")
            teacher.requires_grad_(False).eval().to(device, dtype)
        ref = s["ref"].float()[None].to(device)
        audio = s["audio"].float()[None].to(device)
        text = D.pad_text(s["text"].float(), int(cfg.model.text_len))[None].to(device)
        g = torch.Generator().manual_seed(stable_seed(int(cfg.seed), sample_id))
        noise = torch.randn((1,) + tuple(lat.shape), generator=g).to(device)
        text = guidance_text(text, null["negative"].to(device), passes)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dtype == torch.bfloat16 else None
        clean, states = euler_sample(teacher, noise, ref, audio, text, grid, gs, ags, record=sigmas,
                                     num_train_timesteps=sch.noise.num_train_timesteps, autocast=autocast)
        D.write_sample(out, {
            "trajectory": torch.stack([x[0] for x in states]), "timesteps": torch.tensor(sch.timesteps, dtype=torch.float64),
            "clean": clean[0], "ref": s["ref"], "audio": s["audio"], "text": s["text"],
        }, metadata={"source": path.name, "caption": meta.get("caption", ""), "teacher": str(cfg.ode.teacher),
                     "sigma_grid": [round(x, 8) for x in grid], "shift": float(cfg.schedule.shift),
                     "guidance_scale": gs, "audio_guidance_scale": ags, "noise_seed": str(stable_seed(int(cfg.seed), sample_id))},
            kind="ode", dtype=store_dtype)
        stats["written"] += 1
    return stats


# ---- regression -----------------------------------------------------------------------------------------

def choose_window(schedule: WindowSchedule, num_blocks: int, generator: torch.Generator,
                  mode: str = "plan") -> tuple[StreamStep, int]:
    """A streaming step of the clip's plan (uniform; ``steady`` = only full windows when there are any) and a pass."""
    steps = list(schedule.plan(num_blocks))
    if mode == "steady":
        full = [s for s in steps if len(s.blocks) == schedule.L]
        steps = full or steps
    elif mode != "plan":
        raise AvatarForcingError(f"ode.windows must be 'plan' or 'steady', got {mode!r}")
    i = int(torch.randint(len(steps), (1,), generator=generator))
    n = int(torch.randint(schedule.N, (1,), generator=generator))
    return steps[i], n


def _audio_slice(audio, start, stop):
    return None if audio is None else audio[:, start:stop]


@torch.no_grad()
def build_cache(model, cache_cfg: CacheConfig, schedule: WindowSchedule, ref: torch.Tensor, text, clean: torch.Tensor,
                audio: torch.Tensor | None, first_block: int, context_blocks: int,
                noise: NoiseSource | None = None) -> StreamCache:
    """The inference cache before the step whose oldest block is ``first_block``, from a clean history.

    ``clean`` [B, C, F, h, w] holds the emitted blocks (absolute frames); ``text`` (prompt embeddings) is kept
    in the cache and projected by every forward, with grad where the forward has it;
    ``noise`` noises the re-runs when ``context_noise`` > 0 (level -1 of the block, as at inference).  The
    anchor prefill and the clean re-runs are the sampler's own (avatarforcing/stream_state.py)."""
    B = schedule.B
    h, w = ref.shape[-2:]
    cache = StreamCache(cache_cfg, model.tokens_per_frame(h, w), (h, w), text=text)
    temporal = cache_cfg.temporal_anchor and cache_cfg.temporal_frames > 0
    start = max(0, first_block - int(context_blocks)) if temporal else first_block
    cache.next_frame = block_latent_frames(start, B)[0]
    noise = noise or NoiseSource(0, ref.device)
    anchor_audio = not cache_cfg.zero_anchor_audio      # ablation: the anchor takes the window's first frame

    if cache_cfg.style_anchor:
        prefill_anchor(model, cache, ref)
    if cache_cfg.reference_in_temporal:
        seed_temporal(model, cache, ref)     # the reference as latent frame 0 of a history that starts at block 0
    for b in range(start, first_block):
        f0, f1 = block_latent_frames(b, B)
        if cache_cfg.style_anchor and anchor_audio:
            prefill_anchor(model, cache, ref, _audio_slice(audio, f0, f0 + 1))
        write_temporal(model, cache, schedule, ref, b, clean[:, :, f0:f1], _audio_slice(audio, f0, f1), noise)
    if cache_cfg.style_anchor and anchor_audio:
        f0 = block_latent_frames(first_block, B)[0]
        prefill_anchor(model, cache, ref, _audio_slice(audio, f0, f0 + 1))
    return cache


def window_inputs(schedule: WindowSchedule, step: StreamStep, pass_index: int, trajectory: torch.Tensor):
    """Stacked window latents from a trajectory [B, S, C, F, h, w] and per-frame t, sigma [B, nF]."""
    B = schedule.B
    xs, ts = [], []
    for blk, age in zip(step.blocks, step.ages):
        level = schedule.level(age, pass_index)
        f0, f1 = block_latent_frames(blk, B)
        xs.append(trajectory[:, level, :, f0:f1])
        ts += [schedule.timesteps[level]] * B
    x = torch.cat(xs, dim=2)
    t = torch.tensor(ts, device=x.device, dtype=torch.float32)[None].expand(x.shape[0], -1)
    sigma = schedule.noise.sigma(ts).to(x.device, torch.float32)[None].expand(x.shape[0], -1)
    return x, t, sigma


def window_x0(model, cache: StreamCache, schedule: WindowSchedule, step: StreamStep, x: torch.Tensor, t, sigma,
              ref, audio) -> torch.Tensor:
    """The student's x0 of a window (one forward with the cache), float32."""
    f0 = block_latent_frames(step.blocks[0], schedule.B)[0]
    f1 = block_latent_frames(step.blocks[-1], schedule.B)[1]
    flow = model.window(x, ref, t, _audio_slice(audio, f0, f1), cache)
    return flow_to_x0(x.float(), flow.float(), sigma)


class ODEStage(Stage):
    """``train_ode.py``: one-step regression of the student onto the teacher's clean endpoints."""

    name = "ode"

    def __init__(self, cfg, trainer):
        self.cfg, self.tr = cfg, trainer
        if not cfg.data.ode:
            raise AvatarForcingError("data.ode is not set; pass data.ode=<directory written by scripts/ode_backfill.py>")
        self.schedule = student_schedule(cfg)
        self.cache_cfg = CacheConfig.from_config(cfg.cache)
        ds = D.ShardDataset(cfg.data.ode, D.ODE_FIELDS, cfg.model.text_len, check=self.check,
                            on_error=cfg.data.on_error)
        self.data = D.BatchStream(ds, cfg.train.batch_size, rank=trainer.rank, world=trainer.world, seed=cfg.seed,
                                  prefetch=cfg.data.prefetch)
        ds.get(0)  # fail early on a store made for another schedule
        model = build_dit(cfg, cfg.train.init, use_ema=cfg.train.init_ema, what="student")
        self.role = trainer.add_role("generator", model, lr=cfg.train.lr, ema=True)

    def check(self, path, sample) -> None:
        ts = sample["timesteps"].double()
        want = torch.tensor(self.schedule.timesteps, dtype=torch.float64)
        if ts.shape != want.shape or not torch.allclose(ts, want, rtol=0, atol=1e-4):
            raise AvatarForcingError(
                f"{path} stores trajectories at timesteps {[round(v, 3) for v in ts.tolist()]} but the student schedule "
                f"(schedule.steps/shift/warp) has {[round(v, 3) for v in want.tolist()]}; re-run scripts/ode_backfill.py "
                "with this config into a new data.ode")
        traj, clean = sample["trajectory"], sample["clean"]
        if traj.dim() != 5 or traj.shape[0] != len(ts) or tuple(traj.shape[1:]) != tuple(clean.shape):
            raise D.BadSample(f"{path}: trajectory {list(traj.shape)} does not match timesteps {len(ts)} x clean "
                              f"{list(clean.shape)}")
        if (clean.shape[1] - 1) % self.schedule.B:
            raise AvatarForcingError(f"{path}: {clean.shape[1]} latent frames; (F - 1) must be a multiple of "
                                     f"schedule.block_frames={self.schedule.B}")

    def data_states(self):
        return {"data": self.data}

    def loss(self, batch, step: StreamStep, pass_index: int, noise_gen: torch.Generator | None = None) -> torch.Tensor:
        dev, model = self.tr.device, self.role.model
        traj, clean = batch["trajectory"].to(dev), batch["clean"].to(dev)
        ref, audio, text = batch["ref"].to(dev), batch["audio"].to(dev), batch["text"].to(dev)
        first = step.blocks[0]
        with self.tr.autocast():
            seed = 0 if noise_gen is None else int(torch.randint(2 ** 62, (1,), generator=noise_gen))
            cache = build_cache(model, self.cache_cfg, self.schedule, ref, text, clean, audio, first,
                                int(self.cfg.ode.context_blocks), NoiseSource(seed, dev))
            x, t, sigma = window_inputs(self.schedule, step, pass_index, traj)
            x0 = window_x0(model, cache, self.schedule, step, x, t, sigma, ref, audio)
        f0 = block_latent_frames(step.blocks[0], self.schedule.B)[0]
        f1 = block_latent_frames(step.blocks[-1], self.schedule.B)[1]
        return F.mse_loss(x0, clean[:, :, f0:f1].float())

    def num_blocks(self, batch) -> int:
        return (batch["clean"].shape[2] - 1) // self.schedule.B

    def train_step(self, step: int) -> dict:
        windows = []

        def micro_loss(micro: int) -> torch.Tensor:
            batch = self.data.next()
            win, n = choose_window(self.schedule, self.num_blocks(batch),
                                   self.tr.generator(step, micro, salt=1, per_rank=False), str(self.cfg.ode.windows))
            windows.append([win.index, n])
            return self.loss(batch, win, n, self.tr.generator(step, micro, salt=2))

        losses, stats = self.tr.accumulate(self.role, step, micro_loss)
        total = sum(loss / len(losses) for loss in losses)
        self.tr.trace({"step": step, "windows": windows, "loss": total})
        return {"loss": total, **stats}

    @torch.no_grad()
    def eval_loss(self, batch) -> float:
        """Mean loss over every window of the plan (pass 0): a deterministic fixed-batch measure."""
        steps = list(self.schedule.plan(self.num_blocks(batch)))
        return sum(self.loss(batch, s, 0).item() for s in steps) / len(steps)

    def export_role(self):
        return self.role

"""Flow-matching noise schedule and the sliding-window schedule of B_{L,N}.

Units (docs/spec.md section 2): 1000 training timesteps, shift s.  sigma(u) = s*u / (1 + (s-1)*u), u = t/1000.
x_t = (1 - sigma) x0 + sigma eps, the DiT predicts v = eps - x0, so x0 = x_t - sigma v.

The window schedule is the single place that knows which block sits at which noise level at every
streaming step; the sampler and the DMD rollout both iterate over :meth:`WindowSchedule.plan`.

Levels are numbered 0..L*N-1 from the noisiest (timestep 1000) to the cleanest.  A block that enters
the window at step s is denoised at level ``age*N + n`` in pass n of step s+age (age = 0..L-1); after
its last level its x0 prediction is emitted.  Steady-state window, oldest -> newest block:
``555.56 | 769.23 | 952.38 | 1000`` for the default steps [1000, 800, 400, 200] with shift 5.
Warm-up: the first L-1 windows hold 1, 2, .. L-1 blocks (the noisy tail of the layout); drain: the
last L-1 windows shrink as no fresh noise enters.  A clip of n blocks takes n + L - 1 steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from . import AvatarForcingError


def shift_sigma(u: torch.Tensor | float, shift: float):
    """Shifted sigma for a uniform u in [0, 1] (Wan / SD3 time shift)."""
    return shift * u / (1 + (shift - 1) * u)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps; ``sigma`` broadcasts from the left ([B], [B, F] or scalar)."""
    sigma = _expand_like(sigma, x0)
    return ((1 - sigma) * x0.float() + sigma * noise.float()).to(x0.dtype)


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma * v, computed in float32 (never in bf16)."""
    sigma = _expand_like(sigma, x_t).float()
    return (x_t.float() - sigma * flow.float()).to(x_t.dtype)


def _expand_like(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma [B] -> [B,1,1,1,1]; sigma [B, F] -> [B,1,F,1,1] for latents laid out [B, C, F, H, W]."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.dim() == 0:
        return sigma
    if sigma.dim() == 1:
        return sigma.view(-1, *([1] * (x.dim() - 1)))
    if sigma.dim() == 2:  # per frame
        return sigma[:, None, :, None, None]
    raise ValueError(f"sigma of shape {tuple(sigma.shape)} cannot broadcast to {tuple(x.shape)}")


@dataclass(frozen=True)
class NoiseSchedule:
    """Timestep <-> sigma mapping of the Wan flow-matching model (t = 1000 * sigma)."""

    num_train_timesteps: int = 1000
    shift: float = 5.0

    def sigma(self, t):
        return torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps

    def warp(self, steps: Sequence[float]) -> list[float]:
        """Indices into the shifted 1000-step table -> timesteps (1000, 800, 400, 200 -> 1000, 952.4, 769.2, 555.6)."""
        u = torch.as_tensor(list(steps), dtype=torch.float64) / self.num_train_timesteps
        return (shift_sigma(u, self.shift) * self.num_train_timesteps).tolist()

    def sample_timesteps(self, shape, generator=None, device=None, min_t: float = 20.0, max_t: float = 980.0):
        """Training timesteps: uniform u, shifted, clamped to [min_t, max_t] (docs/spec.md section 6)."""
        u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
        t = shift_sigma(u, self.shift) * self.num_train_timesteps
        return t.clamp(min_t, max_t).to(device)


@dataclass(frozen=True)
class StreamStep:
    """One streaming step: the window's blocks (oldest first), their ages, and the block emitted after it."""

    index: int
    blocks: tuple[int, ...]
    ages: tuple[int, ...]          # 0 = entered this step (noisiest) .. L-1 = emitted this step
    emits: int | None              # block whose x0 leaves the window at the end of this step


class WindowSchedule:
    """The timesteps of B_{L,N} and the block layout of every streaming step."""

    def __init__(self, timesteps: Sequence[float], block_frames: int = 4, window_blocks: int | None = None,
                 passes: int = 1, noise: NoiseSchedule = NoiseSchedule()):
        timesteps = [float(t) for t in timesteps]
        if passes < 1:
            raise AvatarForcingError(f"schedule.passes must be >= 1, got {passes}")
        if window_blocks is None:
            if len(timesteps) % passes:
                raise AvatarForcingError(
                    f"{len(timesteps)} schedule.steps do not split into {passes} passes; give L*N steps or set schedule.window_blocks")
            window_blocks = len(timesteps) // passes
        if window_blocks < 1 or block_frames < 1:
            raise AvatarForcingError("schedule.window_blocks and schedule.block_frames must be >= 1")
        if len(timesteps) != window_blocks * passes:
            raise AvatarForcingError(
                f"schedule.steps has {len(timesteps)} entries but L*N = {window_blocks}*{passes} = {window_blocks * passes}; "
                "give that many steps or set schedule.steps=null for evenly spaced ones")
        if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise AvatarForcingError(f"schedule.steps must be strictly decreasing (noisiest first), got {timesteps}")
        self.timesteps = timesteps
        self.sigmas = [t / noise.num_train_timesteps for t in timesteps]
        self.B, self.L, self.N = block_frames, window_blocks, passes
        self.noise = noise

    @classmethod
    def from_config(cls, cfg) -> "WindowSchedule":
        """``cfg`` is the ``schedule:`` section of the config."""
        noise = NoiseSchedule(int(cfg.num_train_timesteps), float(cfg.shift))
        passes = int(cfg.passes)
        L = cfg.window_blocks
        steps = cfg.steps
        if steps is None:
            if L is None:
                raise AvatarForcingError("schedule.steps=null needs schedule.window_blocks (L) to be set")
            n = int(L) * passes
            steps = [noise.num_train_timesteps * (1 - k / n) for k in range(n)]
        steps = list(steps)
        timesteps = noise.warp(steps) if cfg.warp else steps
        return cls(timesteps, int(cfg.block_frames), None if L is None else int(L), passes, noise)

    @property
    def num_levels(self) -> int:
        return self.L * self.N

    def level(self, age: int, pass_index: int) -> int:
        return age * self.N + pass_index

    def num_steps(self, num_blocks: int) -> int:
        return num_blocks + self.L - 1 if num_blocks > 0 else 0

    def plan(self, num_blocks: int | None) -> Iterator[StreamStep]:
        """Streaming steps for ``num_blocks`` blocks (None = unbounded: no drain)."""
        i = 0
        while num_blocks is None or i < self.num_steps(num_blocks):
            first = max(0, i - self.L + 1)
            last = i if num_blocks is None else min(i, num_blocks - 1)
            blocks = tuple(range(first, last + 1))
            ages = tuple(i - b for b in blocks)
            emits = blocks[0] if ages[0] == self.L - 1 else None
            yield StreamStep(i, blocks, ages, emits)
            i += 1

    def latent_frames(self, num_blocks: int) -> int:
        """Latent frames of a clip: the reference frame plus B per block."""
        return 1 + num_blocks * self.B

    def blocks_for_video_frames(self, video_frames: int) -> int:
        """Whole blocks covering ``video_frames`` (1 + 4(n-1) frames for n latent frames); rounds up."""
        latent = max(0, -(-(video_frames - 1) // 4))
        return max(1, -(-latent // self.B))

    def __repr__(self) -> str:
        ts = ", ".join(f"{t:.2f}" for t in self.timesteps)
        return f"WindowSchedule(B={self.B}, L={self.L}, N={self.N}, timesteps=[{ts}])"

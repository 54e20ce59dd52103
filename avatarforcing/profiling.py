"""Profiling hooks of the streaming pipeline (the default does nothing), and the steady-state latency of a
profiled stream (shared by scripts/bench_latency.py and the world's evaluation)."""
from __future__ import annotations

import contextlib
import statistics
import time

import torch


class NullProfiler:
    """Does nothing; bench_latency passes one that times the named parts of every streaming step.

    ``part(name)`` times a section; ``next_step()`` closes the current step's record.  A step's record
    holds its sampler step ("step", with the audio encoding inside it as "audio") and the decode of the
    block it emitted ("vae")."""

    def part(self, name: str):
        return contextlib.nullcontext()

    def next_step(self) -> None:
        pass


class StepProfiler:
    """Seconds per named part of every streaming step (the pipeline's profiler interface).

    ``pipe.stream(..., profiler=prof)`` fills ``prof.records`` (one dict of part -> seconds per step);
    ``with prof.hooks(model):`` splits the DiT forwards by forward hooks on the model: calls with
    ``kv=True`` are the KV update (clean re-run; also the anchor prefill, which happens at start-up),
    the rest the window forward(s).  On CUDA every boundary synchronizes, so parts are exact but the
    host cannot run ahead of the GPU while profiling."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.records: list[dict[str, float]] = []
        self.current: dict[str, float] = {}
        self._t0: list[float] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def part(self, name: str):
        t0 = self._now()
        try:
            yield
        finally:
            self.add(name, self._now() - t0)

    def next_step(self) -> None:
        if self.current:
            self.records.append(self.current)
        self.current = {}

    @contextlib.contextmanager
    def hooks(self, model: torch.nn.Module):
        def pre(module, args, kwargs):
            self._t0.append(self._now())

        def post(module, args, kwargs, out):
            self.add("kv" if kwargs.get("kv") else "dit", self._now() - self._t0.pop())

        handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                   model.register_forward_hook(post, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def emitting_steps(self) -> list[dict[str, float]]:
        """Records of steps that emitted (and decoded) a block, with the derived parts ``other`` (the step
        minus audio, DiT and KV) and ``total`` (step + VAE decode)."""
        out = []
        for r in self.records:
            if "step" not in r or "vae" not in r:
                continue
            r = dict(r)
            for k in ("audio", "dit", "kv"):
                r.setdefault(k, 0.0)
            r["other"] = max(0.0, r["step"] - r["audio"] - r["dit"] - r["kv"])
            r["total"] = r["step"] + r["vae"]
            out.append(r)
        return out


def steady_state_seconds_per_frame(records: list[dict], frames_per_step: int, drain_steps: int,
                                   warmup: int = 1) -> tuple[float, dict]:
    """Emitting-step records (StepProfiler.emitting_steps) -> (s/frame, details).

    Drops the first ``warmup`` and the last ``drain_steps`` records (falls back to what is left, then to all)."""
    steady = records[warmup:len(records) - drain_steps] if drain_steps else records[warmup:]
    used = "steady"
    if not steady:
        steady, used = (records[warmup:] or records), "all_emitting"
    if not steady:
        return float("nan"), {"steps_timed": 0}
    parts = {k: statistics.fmean(r.get(k, 0.0) for r in steady) / frames_per_step
             for k in ("audio", "dit", "kv", "vae", "other", "total")}
    return parts["total"], {"steps_timed": len(steady), "steps_emitting": len(records), "used": used,
                            "s_per_frame_parts": parts}

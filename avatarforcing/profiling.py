"""Profiling hooks of the streaming pipeline (the default does nothing)."""
from __future__ import annotations

import contextlib


class NullProfiler:
    """Does nothing; bench_latency passes one that times the named parts of every streaming step.

    ``part(name)`` times a section; ``next_step()`` closes the current step's record.  A step's record
    holds its sampler step ("step", with the audio encoding inside it as "audio") and the decode of the
    block it emitted ("vae")."""

    def part(self, name: str):
        return contextlib.nullcontext()

    def next_step(self) -> None:
        pass

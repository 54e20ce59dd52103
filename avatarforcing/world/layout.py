"""The run folder of the world pipeline: the one definition of where every stage's output lives.

    RUN/state.json                      finished stages with their results and wall times
    RUN/config.yaml                     the resolved pipeline config
    RUN/data/index.csv                  the rendered world (stage data)
    RUN/codec.pt                        the light codec (stage codec; vae.path)
    RUN/shards/                         preprocessed training samples (stage shards; data.shards)
    RUN/ode/, RUN/ode_causal/           ODE pairs of the teacher's backfill, windowed / causal (data.ode)
    RUN/ode_ln<k>/                      ... at k evenly spaced levels, for Table 3 cells of budget L*N = k
    RUN/<stage dir>/export/model.pt     a trained stage's export (teacher, ode_student, dmd, causal_ode, self_forcing,
                                        dmd_window)
    RUN/metric_nets.pt                  the metric networks (stage metric_nets)
    RUN/eval/                           evaluation tables and samples (stage evaluate)

Used by :mod:`avatarforcing.world.pipeline` (writes), :mod:`avatarforcing.world.evaluate` and
``scripts/world_ablations.py`` (read).
"""
from __future__ import annotations

import os
from pathlib import Path

# model name -> training folder under RUN (the folder holds export/model.pt)
MODEL_DIRS = {"teacher": "teacher", "ode": "ode_student", "dmd": "dmd", "causal_ode": "causal_ode",
              "self_forcing": "self_forcing", "dmd_window": "dmd_window"}


class RunLayout:
    """Paths of a world run folder (nothing is created or read)."""

    def __init__(self, root: os.PathLike | str):
        d = self.dir = Path(root)
        self.state_path = d / "state.json"          # finished stages, their results and wall times
        self.config_path = d / "config.yaml"
        self.data = d / "data"                       # rendered videos + wavs + ground truth
        self.index = self.data / "index.csv"
        self.codec = d / "codec.pt"
        self.shards = d / "shards"                   # preprocessed clip samples
        self.ode_store = d / "ode"                   # ODE backfill (teacher trajectories)
        self.ode_causal_store = d / "ode_causal"     # ... for the causal baselines
        self.metric_nets = d / "metric_nets.pt"
        self.eval_dir = d / "eval"

    def levels_store(self, k: int) -> Path:
        """ODE backfill at k evenly spaced levels (Table 3 cells of budget L*N = k other than the world's)."""
        return self.dir / f"ode_ln{int(k)}"

    def stage_dir(self, stage: str) -> Path:
        """A training stage's output folder (``train.output_dir``), by folder name (e.g. ``ode_student``)."""
        return self.dir / stage

    def export(self, stage: str) -> Path:
        """A training stage's exported model, by folder name (e.g. ``ode_student``)."""
        return self.stage_dir(stage) / "export" / "model.pt"

    def model(self, name: str) -> Path:
        """A trained model's export by model name (:data:`MODEL_DIRS`: teacher, ode, dmd, causal_ode, self_forcing)."""
        return self.export(MODEL_DIRS[name])

    def models(self) -> dict[str, Path]:
        """Every trained model's export, by model name."""
        return {name: self.model(name) for name in MODEL_DIRS}

"""The paper's whole pipeline on the synthetic world, as one resumable command.

    data -> codec -> shards -> teacher -> backfill -> ode -> dmd -> metric_nets -> evaluate [-> ship]
    [world.baselines: causal_backfill -> causal_ode -> self_forcing (Table 6's one-step causal baselines)]
    [world.anchor_free_baselines: [causal_backfill ->] causal_ode_anchor_free -> self_forcing_anchor_free (the same
     baselines trained without anchors, the reference only as their first temporal frame: a plain causal model)]
    [world.dmd_window: dmd_window (DMD with dmd.grad_blocks=window, to compare with the emitted-block default)]
    [world.grid: [backfill_ln<L*N> ->] ode_LxN -> dmd_LxN per Table 3 cell B_{L,N}, each trained with its own ODE + DMD]

Every stage calls the same package code a user runs on real data (``scripts/preprocess.py``,
``train_teacher.py``, ``scripts/ode_backfill.py``, ``train_ode.py``, ``train_dmd.py``); only the config
differs (``configs/world/``).  The run folder (``world.run``) holds each stage's output and ``state.json``;
a finished stage is skipped on the next call and the trainers resume from their own checkpoints, so an
interrupted run picks up where it stopped.  ``world.ship=true`` copies the final student and the codec to
``assets/demo/``, which ``configs/demo.yaml`` (the default of ``inference.py``) uses.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from .. import AvatarForcingError
from ..ablations import NO_STYLE_ANCHOR
from ..config import REPO_ROOT, apply_overrides, resolve_path
from .layout import RunLayout

log = logging.getLogger(__name__)

STAGES = ("data", "codec", "shards", "teacher", "backfill", "ode", "dmd", "metric_nets", "evaluate")
# Optional (world.baselines=true): the paper's one-step causal baselines of Table 6, trained like the student
# but with L = 1 (one level, t = 1000, no look-ahead): causal ODE regression, then DMD on it (Self-Forcing 1-step).
BASELINE_STAGES = ("causal_backfill", "causal_ode", "self_forcing")
CAUSAL = ("schedule.steps=[1000]", "schedule.window_blocks=null")
# Optional (world.anchor_free_baselines=true): the causal baselines trained and run as a plain causal model is, with
# no style anchor and only its rolling cache of recent frames (the temporal cache, 2 latent frames): the reference is
# the first frame of that cache and leaves it with the budget, so identity can only be carried forward through the
# model's own recent frames (the long-horizon failure the anchors target).  The anchored baselines above are the
# paper's comparison at equal conditioning; these test the failure itself.
ANCHOR_FREE_STAGES = ("causal_ode_anchor_free", "self_forcing_anchor_free")
# Optional (world.dmd_window=true): the same DMD stage with the loss on every block of the chosen window
# (dmd.grad_blocks=window) instead of the emitted block only, from the same teacher and ODE student.
COMPARISON_STAGES = ("dmd_window",)
# Optional (world.grid, e.g. [2x2, 1x4, 2x1, 1x2]): Table 3's cells B_{L,N} trained with their own ODE regression and
# DMD on their own window schedule (schedule.window_blocks=L, schedule.passes=N).  A cell whose L*N equals the
# world's number of noise levels uses those levels, so the main backfill serves it and a matched-L*N comparison with
# the main student differs only in how the levels are spent.  A cell of another budget k = L*N runs k evenly spaced
# (shift-warped) levels, as the inference-only Table 3 cells do, from its own backfill (stage backfill_ln<k>,
# RUN/ode_ln<k>, shared by every cell of that budget).
GRID_CELL = re.compile(r"^(\d+)x(\d+)$")
GRID_BACKFILL = re.compile(r"^backfill_ln(\d+)$")
DEMO_DIR = REPO_ROOT / "assets" / "demo"


class Run(RunLayout):
    """The run folder (paths: :class:`~avatarforcing.world.layout.RunLayout`) and ``state.json`` (finished stages
    with their results and wall times)."""

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg.world.run)
        self.cfg = cfg
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def stage_cfg(self, overrides_key: str | None = None, extra=()) -> DictConfig:
        """The pipeline config with the run's paths and a stage's overrides applied."""
        paths = [f"vae.path={self.codec}", f"data.source={self.index}", f"data.shards={self.shards}",
                 f"data.ode={self.ode_store}"]
        stage = list(self.cfg.world[overrides_key]) if overrides_key else []
        return apply_overrides(self.cfg, paths + list(extra) + stage, f"world.{overrides_key or 'paths'}")

    def done(self, stage: str) -> bool:
        return bool(self.state.get(stage, {}).get("done"))

    def mark(self, stage: str, result: dict, seconds: float) -> None:
        self.state[stage] = {"done": True, "seconds": round(seconds, 1), "result": result}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, default=str))
        os.replace(tmp, self.state_path)


# ---- stages ------------------------------------------------------------------------------------------

def stage_data(run: Run) -> dict:
    from .dataset import write_world
    w = run.cfg.world
    index = write_world(run.data, num_clips=int(w.clips), seconds=float(w.seconds), size=int(w.size),
                        seed=int(w.seed), workers=int(w.workers), log=log.info, version=int(w.version))
    return {"index": str(index), "clips": int(w.clips), "seconds_each": float(w.seconds)}


def stage_codec(run: Run) -> dict:
    from .codec import WorldCodec, train_codec
    w = run.cfg.world
    if w.codec_from:                       # a shipped codec: the training stops on a wall clock, so it cannot be redone
        src = resolve_path(str(w.codec_from))
        if not src.is_file():
            raise AvatarForcingError(f"world.codec_from={w.codec_from} not found; give a trained codec (e.g. "
                                     "assets/world_v2/codec.pt) or leave it empty to train one")
        codec = WorldCodec.load(src)       # a codec file, or a clear error before it enters the run
        if codec.z_dim != int(run.cfg.vae.z_dim):
            raise AvatarForcingError(f"world.codec_from={w.codec_from} has {codec.z_dim} latent channels but "
                                     f"vae.z_dim={run.cfg.vae.z_dim}; give a codec of this world or set vae.z_dim")
        shutil.copy2(src, run.codec)
        return {"copied_from": str(w.codec_from)}
    res = train_codec(run.codec, steps=int(w.codec_steps), size=int(w.size), seed=int(w.seed),
                      time_budget_s=float(w.codec_minutes) * 60, z_dim=int(run.cfg.vae.z_dim),
                      crop=int(w.codec_crop) or None, refresh_every=int(w.codec_refresh_every), version=int(w.version),
                      latent_scale=str(w.codec_latent_scale))
    return {k: res[k] for k in ("psnr", "steps", "seconds") if k in res}


def stage_shards(run: Run) -> dict:
    from ..train.preprocess import preprocess
    stats = preprocess(run.stage_cfg(), progress=True)
    if stats.get("bad"):
        raise AvatarForcingError(f"preprocessing rejected {stats['bad']} world videos: {stats['bad_files'][:3]}")
    return {k: v for k, v in stats.items() if k != "bad_files"}


def _train(run: Run, stage_cls, name: str, overrides_key: str, extra=()) -> dict:
    from ..train.loop import run_stage
    cfg = run.stage_cfg(overrides_key, [f"train.output_dir={run.stage_dir(name)}", *extra])
    metrics = run_stage(stage_cls, cfg)
    if not run.export(name).is_file():
        raise AvatarForcingError(f"stage {name} finished without writing {run.export(name)}")
    return {"export": str(run.export(name)), **{k: float(v) for k, v in (metrics or {}).items()
                                                 if isinstance(v, (int, float))}}


def stage_teacher(run: Run) -> dict:
    from ..train.teacher import TeacherStage
    return _train(run, TeacherStage, "teacher", "teacher_overrides")


def stage_backfill(run: Run) -> dict:
    from ..train.ode import backfill
    cfg = run.stage_cfg("backfill_overrides", [f"ode.teacher={run.export('teacher')}", "ode.teacher_ema=true"])
    stats = backfill(cfg, progress=True)
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, list))}


def stage_ode(run: Run) -> dict:
    from ..train.ode import ODEStage
    return _train(run, ODEStage, "ode_student", "ode_overrides", [f"train.init={run.export('teacher')}",
                                                                  "train.init_ema=true"])


def stage_dmd(run: Run, name: str = "dmd", extra=()) -> dict:
    from ..train.dmd import DMDStage
    return _train(run, DMDStage, name, "dmd_overrides", [
        f"dmd.teacher={run.export('teacher')}", "dmd.teacher_ema=true",
        f"dmd.generator={run.export('ode_student')}", "dmd.generator_ema=true", *extra])


def stage_dmd_window(run: Run) -> dict:
    return stage_dmd(run, "dmd_window", ["dmd.grad_blocks=window"])


def grid_cells(cfg: DictConfig) -> list[tuple[int, int]]:
    """world.grid ("LxN" strings) -> [(L, N)], checked before any training."""
    cells = []
    for cell in cfg.world.grid:
        m = GRID_CELL.match(str(cell))
        if not m or int(m[1]) < 1 or int(m[2]) < 1:
            raise AvatarForcingError(f"world.grid cell '{cell}': write LxN with L, N >= 1, e.g. world.grid=[2x2,1x4]")
        cells.append((int(m[1]), int(m[2])))
    return cells


def grid_stages(cells, levels: int) -> tuple[str, ...]:
    """The grid's stages in order: per cell ode_LxN, dmd_LxN, preceded by backfill_ln<k> for the first cell of a budget
    k = L*N other than the world's ``levels``."""
    stages: list[str] = []
    for L, N in cells:
        if L * N != levels and f"backfill_ln{L * N}" not in stages:
            stages.append(f"backfill_ln{L * N}")
        stages += [f"ode_{L}x{N}", f"dmd_{L}x{N}"]
    return tuple(stages)


def cell_overrides(L: int, N: int, levels: int | None = None) -> tuple[str, ...]:
    """The schedule of cell B_{L,N}; with ``levels`` (the world's number of noise levels) other than L*N, the cell's
    own L*N evenly spaced, shift-warped levels."""
    own = () if levels is None or L * N == levels else ("schedule.steps=null", "schedule.warp=true")
    return (f"schedule.window_blocks={L}", f"schedule.passes={N}", *own)


def stage_grid(run: Run, name: str) -> dict:
    """backfill_ln<k>: the teacher's ODE pairs at k evenly spaced levels; ode_LxN: ODE regression of cell B_{L,N} from
    the teacher; dmd_LxN: DMD from that ODE student."""
    from ..train.dmd import DMDStage
    from ..train.ode import ODEStage, backfill
    levels = len(run.cfg.schedule.steps or [])
    if m := GRID_BACKFILL.match(name):
        k = int(m[1])
        cfg = run.stage_cfg("backfill_overrides", [f"ode.teacher={run.export('teacher')}", "ode.teacher_ema=true",
                                                   *cell_overrides(k, 1, levels), f"data.ode={run.levels_store(k)}"])
        return {k: v for k, v in backfill(cfg, progress=True).items() if isinstance(v, (int, float, str, list))}
    kind, cell = name.split("_", 1)
    L, N = (int(v) for v in GRID_CELL.match(cell).groups())
    schedule = cell_overrides(L, N, levels)
    store = [f"data.ode={run.levels_store(L * N)}"] if L * N != levels else []
    if kind == "ode":
        return _train(run, ODEStage, name, "ode_overrides", [f"train.init={run.export('teacher')}",
                                                             "train.init_ema=true", *schedule, *store])
    return _train(run, DMDStage, name, "dmd_overrides", [
        f"dmd.teacher={run.export('teacher')}", "dmd.teacher_ema=true", f"dmd.generator={run.export('ode_' + cell)}",
        "dmd.generator_ema=true", *schedule, *store])


def stage_metric_nets(run: Run) -> dict:
    from ..metrics import MetricNets
    w = run.cfg.world
    t0 = time.time()
    MetricNets.train(run.metric_nets, num_ids=int(w.metric_ids), frames_per_id=int(w.metric_frames_per_id),
                     sync_steps=int(w.metric_sync_steps), id_steps=int(w.metric_steps),
                     size=int(w.metric_size), seed=int(w.seed), threads=int(w.threads), log=log.info,
                     backend=metric_backend_name(int(w.version)))
    return {"path": str(run.metric_nets), "seconds": time.time() - t0}


def stage_evaluate(run: Run) -> dict:
    """Teacher vs ODE student vs DMD student on held-out identities (Total / Last over the rollouts)."""
    from . import evaluate as E
    w = run.cfg.world
    cfg = run.stage_cfg()
    cases = E.held_out_cases(int(w.eval_cases), float(w.eval_seconds), size=int(w.size), version=int(w.version),
                             cache_dir=run.dir / "cases", workers=int(w.workers))
    nets = E.load_metric_nets(run.metric_nets)
    variants = {
        "Teacher": ("teacher", run.export("teacher"), []),
        "Student (ODE)": ("student", run.export("ode_student"), []),
        "AvatarForcing (DMD)": ("student", run.export("dmd"), []),
    }
    rows = E.evaluate_run(run.dir, cfg, variants, cases, nets, out_dir=run.eval_dir,
                          teacher_steps=int(w.eval_teacher_steps))         # E.run_overrides: the exports' EMA weights
    return {"rows": rows, "table": str(run.eval_dir / "table.md")}


def stage_causal_backfill(run: Run) -> dict:
    from ..train.ode import backfill
    cfg = run.stage_cfg("backfill_overrides", [f"ode.teacher={run.export('teacher')}", "ode.teacher_ema=true",
                                               *CAUSAL, f"data.ode={run.ode_causal_store}"])
    stats = backfill(cfg, progress=True)
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, list))}


def stage_causal_ode(run: Run, name: str = "causal_ode", extra=()) -> dict:
    from ..train.ode import ODEStage
    return _train(run, ODEStage, name, "ode_overrides", [
        f"train.init={run.export('teacher')}", "train.init_ema=true", *CAUSAL, f"data.ode={run.ode_causal_store}",
        *extra])


def stage_self_forcing(run: Run, name: str = "self_forcing", generator: str = "causal_ode", extra=()) -> dict:
    from ..train.dmd import DMDStage
    return _train(run, DMDStage, name, "dmd_overrides", [
        f"dmd.teacher={run.export('teacher')}", "dmd.teacher_ema=true", f"dmd.generator={run.export(generator)}",
        "dmd.generator_ema=true", *CAUSAL, f"data.ode={run.ode_causal_store}", *extra])


def stage_causal_ode_anchor_free(run: Run) -> dict:
    return stage_causal_ode(run, "causal_ode_anchor_free", NO_STYLE_ANCHOR)


def stage_self_forcing_anchor_free(run: Run) -> dict:
    return stage_self_forcing(run, "self_forcing_anchor_free", "causal_ode_anchor_free", NO_STYLE_ANCHOR)


def metric_backend_name(version: int) -> str:
    """The metric backend (avatarforcing/backends.py) that matches a world version."""
    return "world" if version == 1 else "world_v2"     # v3 is v2's renderer: its identities and mouths


STAGE_FUNCS: dict[str, Callable[[Run], dict]] = {
    "causal_backfill": stage_causal_backfill, "causal_ode": stage_causal_ode, "self_forcing": stage_self_forcing,
    "data": stage_data, "codec": stage_codec, "shards": stage_shards, "teacher": stage_teacher,
    "backfill": stage_backfill, "ode": stage_ode, "dmd": stage_dmd, "metric_nets": stage_metric_nets,
    "evaluate": stage_evaluate, "dmd_window": stage_dmd_window,
    "causal_ode_anchor_free": stage_causal_ode_anchor_free, "self_forcing_anchor_free": stage_self_forcing_anchor_free,
}


def ship(run: Run, dest: Path = DEMO_DIR) -> Path:
    """Copy the final student (EMA weights, fp16, released format) and the codec into the repo."""
    from ..checkpoint import export_released, load_student_state
    dest.mkdir(parents=True, exist_ok=True)
    state = load_student_state(run.export("dmd"), use_ema=True)
    half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}
    export_released(half, dest / "model.pt")
    shutil.copy2(run.codec, dest / "codec.pt")
    summary = {k: {"seconds": v.get("seconds")} for k, v in run.state.items()}
    (dest / "pipeline_state.json").write_text(json.dumps(summary, indent=2))
    write_examples(dest.parent, version=int(run.cfg.world.version))
    return dest


def write_examples(assets: Path, seconds: float = 8.0, seed: int = 4242, version: int = 1) -> None:
    """The default inputs of inference.py: a held-out identity's reference frame and 8 s of its speech."""
    from PIL import Image

    from ..media import write_wav
    from .dataset import clip_seed, generate_clip, sample_reference
    s = clip_seed(seed, 0)
    if version == 1:
        from .speech import synth_speech
        Image.fromarray(sample_reference(s, 256)).save(assets / "example.png")
        write_wav(assets / "example.wav", synth_speech(seconds, s).wav, 16000)
        return
    clip = generate_clip(s, seconds, 256, version)
    Image.fromarray(clip.frames[0]).save(assets / "example.png")
    write_wav(assets / "example.wav", clip.wav, 16000)


def run_pipeline(cfg: DictConfig, stages=None, progress=print) -> dict:
    """Run (or resume) the stages in order; returns ``state.json``'s content."""
    from .dataset import check_world_version
    check_world_version(int(cfg.world.version), f"world.version={cfg.world.version} (configs/world/v2.yaml, sway.yaml)")
    torch.set_num_threads(int(cfg.world.threads))
    torch.set_flush_denormal(True)
    run = Run(cfg)
    OmegaConf.save(cfg, run.config_path)
    grid = grid_stages(grid_cells(cfg), len(cfg.schedule.steps or []))
    every = STAGES + BASELINE_STAGES + ANCHOR_FREE_STAGES + COMPARISON_STAGES + grid
    causal = BASELINE_STAGES if cfg.world.baselines else ()
    if cfg.world.anchor_free_baselines:          # they train on the causal backfill's store
        causal = tuple(dict.fromkeys(causal + ("causal_backfill",) + ANCHOR_FREE_STAGES))
    order = STAGES + causal + (COMPARISON_STAGES if cfg.world.dmd_window else ()) + grid
    wanted = list(stages or order)
    unknown = [s for s in wanted if s not in every]
    if unknown:
        raise AvatarForcingError(f"unknown stage(s) {unknown}; choose from {', '.join(every)}")
    t_all = time.time()
    for name in every:
        if name not in wanted:
            continue
        if run.done(name):
            progress(f"[world] {name}: done earlier ({run.state[name]['seconds']} s), skipped")
            continue
        progress(f"[world] {name} ...")
        t0 = time.time()
        result = stage_grid(run, name) if name in grid else STAGE_FUNCS[name](run)
        run.mark(name, result, time.time() - t0)
        progress(f"[world] {name}: finished in {time.time() - t0:.1f} s")
    total = sum(v.get("seconds", 0) for v in run.state.values() if isinstance(v, dict))
    progress(f"[world] all stages: {total / 60:.1f} min of stage time ({(time.time() - t_all) / 60:.1f} min this call)")
    if cfg.world.ship:
        progress(f"[world] shipped the demo model to {ship(run)}")
    return run.state

"""Paired per-case evaluation of one trained student under several arms, resumable case by case.

    from avatarforcing.world.bench import Arm, evaluate_arms, metric_nets_for
    from avatarforcing.world.evaluate import held_out_cases

    cfg = load_config("configs/demo.yaml")
    nets = metric_nets_for(cfg, "runs/controls")                 # trained by the world pipeline's stage
    results = evaluate_arms(cfg, "assets/demo/model.pt", [Arm("clean"), Arm("no style", ("cache.style_anchor=false",))],
                            held_out_cases(10, 20.0), nets, cache_dir="runs/controls/cache/<fingerprint>")
    results["clean"][case_index]["csim_last"]

An :class:`Arm` is one way of running the student: config ``overrides``, an input transform ``drive`` (the case the
stream is driven with; the metrics always compare against the original case: its audio, reference and real
frames) and an ``inject`` context manager around the rollout (``avatarforcing/world/controls.py``).  Every arm
runs every case with the same noise seed, so the arms' metrics are paired by case (``stats.py``).  With a
``baseline`` arm, each result also says how much the arm changes the video itself (``pixel_change``): a defect
that no metric sees but that changes the video is a blind metric; one that barely changes it is a component the
student does not use.

Each finished (arm, case) is written to ``cache_dir/<arm key>/case<i>.json`` at once, so an interrupted run
continues where it stopped.  The arm key hashes what the arm does (overrides and tag), not its name, so two
scripts that run the same arm under different names share it.  The caller chooses ``cache_dir`` per settings
(:func:`fingerprint`): a different checkpoint, metric nets, clip length or case set never reads old results.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import numpy as np

from .. import AvatarForcingError
from ..ablations import resolve_config, rollout_student, write_json
from .evaluate import CURVE_SECONDS, Case, evaluate_variant, real_feature_stats
from .layout import RunLayout
from ..stats import RESAMPLES, column, compare
from ..units import LATENT_STRIDE

# the per-case metrics the tables and side tables report (avatarforcing/metrics.py's evaluate_video keys)
REPORTED_METRICS = ("csim_total", "csim_last", "delta_e_total", "delta_e_last", "adj_feat_total", "adj_feat_last",
                    "seam_feat_total", "adj_pixel_total", "sync_conf_total", "sync_dist_total", "sync_offset_total",
                    "fid_total")

# bump when evaluate_video's metrics change: cached per-case results of another version are recomputed
# (2: seam_feat, block seams against the other latent-frame seams)
METRICS_VERSION = 2

Injection = Callable[[object, Case, Sequence[Case]], ContextManager]


@dataclass(frozen=True)
class Arm:
    """One way of running the student on a case (see the module docstring).

    ``tag`` names what ``drive`` / ``inject`` do, with their parameters (e.g. ``temporal_rope_offset=64``): it is
    part of the cache key, so an arm with a transform or an injection needs one."""
    name: str
    overrides: tuple[str, ...] = ()
    tag: str = ""
    drive: Callable[[Case], Case] | None = None
    inject: Injection | None = None
    checkpoint: str | None = None          # other weights than the bench's student (e.g. a trained baseline)

    def __post_init__(self):
        if (self.drive is not None or self.inject is not None) and not self.tag:
            raise AvatarForcingError(f"arm '{self.name}' transforms its input or injects a change but has no tag; "
                                     "give it a tag naming what it does")

    @property
    def key(self) -> str:
        """Hash of what the arm does (overrides, tag): the name of its cache folder."""
        what = [list(self.overrides), self.tag] + ([file_digest(self.checkpoint)] if self.checkpoint else [])
        return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:12]

    @classmethod
    def trained(cls, name: str, export, overrides: Sequence[str] = ()) -> "Arm":
        """An arm that runs another model a world run trained (``RUN/<stage>/export/model.pt``) with its EMA weights.

        An export holds the raw weights ('generator') and their EMA ('generator_ema'); the shipped student is the
        EMA of its run (``world.pipeline.ship``) and the pipeline's own evaluation reads the EMA too, so a trained
        comparison arm must read the EMA as well, or it is judged on noisier weights than the student it is
        compared with."""
        return cls(name, (*overrides, "inference.use_ema=true"), checkpoint=str(export))

    def pipe(self, cfg, checkpoint):
        """The pipeline this arm runs: its own weights (or ``checkpoint``, the bench's student) and overrides."""
        return build_pipe(cfg, self.checkpoint or checkpoint, self.overrides)

    def injected(self, pipe, case: Case, cases: Sequence[Case]) -> ContextManager:
        return self.inject(pipe, case, cases) if self.inject is not None else contextlib.nullcontext()


def rollout_arm(arm: Arm, pipe, case: Case, cases: Sequence[Case], seed: int = 0):
    """The student's frames for ``case`` under ``arm`` -> (uint8 [T, H, W, 3], steady-state s/frame)."""
    driven = arm.drive(case) if arm.drive is not None else case
    with arm.injected(pipe, case, cases):
        return rollout_student(None, None, driven, seed=seed, pipe=pipe)


def build_pipe(cfg, checkpoint, overrides: Sequence[str] = ()):
    from ..pipeline import AvatarPipeline
    return AvatarPipeline.from_config(resolve_config(cfg, overrides), checkpoint)


def evaluate_arms(cfg, checkpoint, arms: Sequence[Arm], cases: Sequence[Case], nets, cache_dir=None, seed: int = 0,
                  tail_seconds: float = 10.0, baseline: str | None = None,
                  log: Callable | None = print, curve_seconds: float = CURVE_SECONDS) -> dict[str, dict[int, dict]]:
    """Every arm on every case -> {arm name: {case index: evaluate_video metrics + rollout_seconds}}.

    ``cfg``: a config path or loaded config (the student's); ``checkpoint``: its weights; FID's reference
    statistics are the identity features of all the cases' real frames.  With ``baseline`` (an arm's name) every
    result also has ``pixel_change``: the mean absolute difference (0-255) between the arm's video and the
    baseline's on that case, i.e. how much the arm changes what the student makes, whatever any metric says.
    With ``cache_dir`` each (arm, case) result is stored as it finishes and reused on the next call."""
    say = log or (lambda *_: None)
    if len(cases) < 1 or len({c.index for c in cases}) != len(cases):
        raise AvatarForcingError("evaluate_arms needs at least one case and distinct case indices")
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise AvatarForcingError(f"arm names must be distinct, got {names}")
    if baseline is not None and baseline not in names:
        raise AvatarForcingError(f"the baseline '{baseline}' is not one of the arms {names}")
    cfg = resolve_config(cfg)
    seam_period = LATENT_STRIDE * int(cfg.schedule.block_frames)      # video frames per streamed block
    order = sorted(arms, key=lambda a: a.name != baseline)            # the baseline first
    pipes: dict[str, object] = {}
    real_feats = None
    out: dict[str, dict[int, dict]] = {a.name: {} for a in arms}

    def rollout(arm, case):
        if arm.name not in pipes:
            pipes[arm.name] = arm.pipe(cfg, checkpoint)
        return rollout_arm(arm, pipes[arm.name], case, cases, seed)

    for case in cases:
        base = None                                                   # the baseline's frames of this case
        for arm in order:
            path = Path(cache_dir) / arm.key / f"case{case.index}.json" if cache_dir is not None else None
            record = json.loads(path.read_text()) if path is not None and path.is_file() else {}
            cached = record.get("metrics") if record.get("metrics_version") == METRICS_VERSION else None
            if cached is not None and (baseline is None or "pixel_change" in cached):
                out[arm.name][case.index] = cached
                continue
            if real_feats is None:
                real_feats = real_feature_stats(cases, nets)
            t0 = time.perf_counter()
            frames, spf = rollout(arm, case)
            t1 = time.perf_counter()
            metrics = evaluate_variant(frames, case, nets, real_feats, tail_seconds, spf, seam_period=seam_period,
                                       curve_seconds=curve_seconds)
            metrics.update(rollout_seconds=t1 - t0, eval_seconds=time.perf_counter() - t1)
            if baseline is not None:
                if arm.name == baseline:
                    base = frames
                elif base is None:                                    # the baseline's result came from the cache
                    base = rollout(next(a for a in arms if a.name == baseline), case)[0]
                metrics["pixel_change"] = float(np.abs(frames.astype(np.float32) - base).mean())
            out[arm.name][case.index] = metrics
            if path is not None:
                write_json(path, {"metrics_version": METRICS_VERSION, "arm": arm.name,
                                  "overrides": list(arm.overrides), "tag": arm.tag,
                                  "case": case.index, "clip_seed": case.seed, "metrics": metrics})
            say(f"[bench] {arm.name} case {case.index}: " + " ".join(
                f"{k} {metrics[k]:.4f}" for k in ("csim_last", "adj_feat_total", "sync_dist_total", "fid_total"))
                + f" ({t1 - t0:.1f} + {metrics['eval_seconds']:.1f} s)")
    return out


def per_case_rows(results: dict[str, dict[int, dict]], cases: Sequence[Case]) -> list[dict]:
    """{arm: {case: metrics}} -> CSV rows (arm, case, clip_seed and every reported metric)."""
    seeds = {c.index: c.seed for c in cases}
    keys = REPORTED_METRICS + ("pixel_change",)
    return [{"arm": arm, "case": i, "clip_seed": seeds.get(i, ""), **{k: m.get(k) for k in keys}}
            for arm, rows in results.items() for i, m in sorted(rows.items())]


def mean_pixel_change(results: dict[str, dict[int, dict]], arm: str) -> float | None:
    """The arm's mean ``pixel_change`` over its cases (None without a baseline)."""
    values = [m.get("pixel_change") for m in results[arm].values()]
    return None if any(v is None for v in values) else float(np.mean(values))


# ----------------------------------------------------------------------------------------------
# settings and metric nets


def file_digest(path) -> str:
    """sha1 of a file's bytes (first 16 hex digits)."""
    p = Path(path)
    if not p.is_file():
        raise AvatarForcingError(f"{p} not found; pass an existing file")
    return hashlib.sha1(p.read_bytes()).hexdigest()[:16]


def fingerprint(settings: dict) -> str:
    """A short hash of the settings that determine every per-case result (the cache folder's name)."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def metric_nets_for(cfg, run_dir, threads: int = 1, progress: Callable = print):
    """The metric nets of ``run_dir`` (``RUN/metric_nets.pt``), trained first by the world pipeline's
    ``metric_nets`` stage (its settings: ``cfg.world.metric_*``, world seed ``cfg.world.seed``) if absent."""
    from ..config import apply_overrides
    from .evaluate import load_metric_nets
    from .pipeline import run_pipeline

    layout = RunLayout(run_dir)
    if not layout.metric_nets.is_file():
        cfg = apply_overrides(resolve_config(cfg), [f"world.run={layout.dir}", f"world.threads={int(threads)}",
                                                    "world.ship=false", "world.baselines=false"])
        run_pipeline(cfg, stages=["metric_nets"], progress=progress)
    return load_metric_nets(layout.metric_nets)


# ----------------------------------------------------------------------------------------------
# one benchmark: the student, its metric nets, the held-out cases and the cache folder of these settings


@dataclass
class Bench:
    """A student, its metric nets, held-out cases and the cache folder of these settings (:func:`open_bench`)."""
    cfg: object                    # the loaded config of the student
    checkpoint: str
    nets: object                   # MetricNets
    cases: list
    settings: dict                 # everything that determines the per-case results (and the cache folder)
    cache_dir: Path

    def evaluate(self, arms: Sequence[Arm], baseline: str | None = None,
                 log: Callable | None = print) -> dict[str, dict[int, dict]]:
        return evaluate_arms(self.cfg, self.checkpoint, arms, self.cases, self.nets, self.cache_dir,
                             seed=self.settings["seed"], tail_seconds=self.settings["tail_seconds"],
                             baseline=baseline, log=log, curve_seconds=self.curve_seconds)

    @property
    def curve_seconds(self) -> float:
        """The span of each point of the results' ``csim_curve`` (seconds)."""
        return float(self.settings.get("curve_seconds", CURVE_SECONDS))


def open_bench(config, checkpoint=None, run="runs/controls", cases: int = 10, seconds: float = 20.0, seed: int = 0,
               case_seed: int | None = None, tail_seconds: float = 10.0, metric_nets=None, threads: int = 1,
               progress: Callable = print, curve_seconds: float = CURVE_SECONDS) -> Bench:
    """The student of ``config`` (weights: ``checkpoint``, default ``inference.checkpoint``), the metric nets
    (``metric_nets``, default ``RUN/metric_nets.pt``, trained if absent: :func:`metric_nets_for`), ``cases``
    held-out cases of ``seconds``, and the cache folder ``RUN/cache/<fingerprint of the settings>``."""
    from ..config import load_config, resolve_path
    from .evaluate import HELD_OUT_WORLD_SEED, held_out_cases, load_metric_nets, world_version

    cfg = load_config(config)
    ckpt = resolve_path(checkpoint or cfg.inference.checkpoint or "")
    if not Path(ckpt).is_file():
        raise AvatarForcingError(f"student checkpoint not found: '{ckpt}'; pass --checkpoint or set "
                                 "inference.checkpoint in the config")
    nets = load_metric_nets(metric_nets) if metric_nets else metric_nets_for(cfg, run, threads, progress)
    nets_path = Path(metric_nets) if metric_nets else RunLayout(run).metric_nets
    case_seed = HELD_OUT_WORLD_SEED if case_seed is None else int(case_seed)
    version = world_version(cfg)
    held = held_out_cases(cases, seconds, size=int(cfg.inference.height), seed=case_seed, version=version,
                          cache_dir=Path(run) / "cases", workers=max(1, int(threads)))
    codec = resolve_path(cfg.vae.path) if cfg.vae.path else None
    settings = {"config": str(config), "checkpoint": str(ckpt), "checkpoint_sha1": file_digest(ckpt),
                "codec_sha1": file_digest(codec) if codec else None, "metric_nets": str(nets_path),
                "metric_nets_sha1": file_digest(nets_path), "cases": int(cases), "seconds": float(seconds),
                "frames": held[0].num_frames, "case_world_seed": case_seed, "world_version": version,
                "clip_seeds": [c.seed for c in held],
                "seed": int(seed), "tail_seconds": float(tail_seconds)}
    if float(curve_seconds) != CURVE_SECONDS:          # only then, so that benches cached before it keep their folder
        settings["curve_seconds"] = float(curve_seconds)
    return Bench(cfg, str(ckpt), nets, held, settings, Path(run) / "cache" / fingerprint(settings))


def comparison_entry(results: dict, a: str, b: str, metric: str, resamples: int = RESAMPLES,
                     metrics: Sequence[str] = REPORTED_METRICS) -> dict:
    """Arm ``a`` vs arm ``b`` (paired over cases): the comparison on ``metric`` (effect > 0: a is better) and, under
    ``all_metrics``, the same on every reported metric."""
    def one(m):
        return compare(column(results[a], m), column(results[b], m), m, resamples=resamples)

    main = one(metric).as_dict()
    main["all_metrics"] = {m: {k: v for k, v in one(m).as_dict().items() if k in ("effect", "ci_low", "ci_high",
                                                                                  "verdict")}
                           for m in metrics}
    return main


def effects_table(entries: Sequence[dict], key: str, metrics: Sequence[str] = REPORTED_METRICS) -> str:
    """Markdown: one row per entry (named by ``entry[key]``), the effect [95 % CI] on every metric; the entry's own
    metric in bold."""
    head = [key] + list(metrics)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for e in entries:
        cells = []
        for m in metrics:
            c = e["all_metrics"][m]
            cell = f"{c['effect']:+.4g} [{c['ci_low']:+.3g}, {c['ci_high']:+.3g}]"
            cells.append(f"**{cell}**" if m == e["metric"] else cell)
        lines.append("| " + " | ".join([e[key]] + cells) + " |")
    return "\n".join(lines)

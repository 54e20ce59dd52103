"""Evaluation of trained models in the synthetic world: held-out clips, student / teacher rollouts, metrics.

    from avatarforcing.metrics import MetricNets
    from avatarforcing.world.evaluate import evaluate_run, held_out_cases

    cases = held_out_cases(2, seconds=60)
    rows = evaluate_run("runs/world", "configs/world/base.yaml",
                        {"AvatarForcing": ("student", "runs/world/dmd/export/model.pt", []),
                         "w/o style anchor": ("student", "runs/world/dmd/export/model.pt",
                                              ["cache.style_anchor=false"]),
                         "Teacher": ("teacher", "runs/world/teacher/export/model.pt", [])},
                        cases, MetricNets.load("runs/world/metric_nets.pt"), out_dir="results/world", name="table4")

Held-out cases
    Clip i of world seed ``seed`` (default :data:`HELD_OUT_WORLD_SEED` = 10_000) is
    ``generate_clip(clip_seed(10_000, i), seconds, size)``.  Training data comes from world seed 0
    (``clip_seed(0, i)``, the codec's pool, the preprocessing of ``write_world(seed=0)``), the codec's held-out
    PSNR from world seed 1_000_003 + s and the metric nets from identity seeds 10_000_000 + ..., so the
    evaluation identities / speech / motion are never seen in training (clip seeds are 32-bit hashes of
    (world seed, index); ``tests/test_world_evaluate.py`` checks disjointness against 20k training indices).

Frame / audio convention
    A case has ``T = round(25 * seconds)`` real frames; frame 0 is the reference (mouth closed).  The pipeline
    generates the whole blocks covering the audio (1 + 16 k frames >= T) and its frame 0 is the decoded
    reference latent, so frame t of a rollout corresponds to real frame t; rollouts are cut to T frames.

Latency
    Student: the pipeline's profiler interface (``avatarforcing.profiling.StepProfiler``): per emitting streaming
    step, the sampler step (audio encoding, DiT window forward, KV update) plus the VAE decode of the emitted
    block, over the 4B frames it emits.  Start-up (model build, reference encode, anchor prefill), the first
    ``warmup`` emitting steps and the final L-1 drain steps (shrinking windows) are excluded: the Table 2 protocol
    on a finite clip.  Teacher: wall time of reference / audio encoding + the Euler ODE sample + decode over T.
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from .. import AvatarForcingError
from ..profiling import StepProfiler, steady_state_seconds_per_frame
from .dataset import clip_seed, generate_clip
from .layout import RunLayout
from .speech import FPS, SAMPLE_RATE


TRAIN_WORLD_SEED = 0              # world seed of every training stage (clip_seed(0, i))
HELD_OUT_WORLD_SEED = 10_000      # world seed of the evaluation clips
CODEC_HELD_OUT_WORLD_SEED = 1_000_003   # world/codec.py's held-out PSNR clips (seed 1_000_003 + s)
GAP = 2                           # px between tiles of the side-by-side videos (even: H.264 needs even sizes)

# ----------------------------------------------------------------------------------------------
# held-out cases


@dataclass
class Case:
    reference: np.ndarray          # uint8 [H, W, 3] (= real_frames[0])
    wav: np.ndarray                # float32 [N], 16 kHz
    real_frames: np.ndarray        # uint8 [T, H, W, 3]
    seed: int                      # clip seed (generate_clip)
    index: int = 0                 # index within the held-out world
    world_seed: int = HELD_OUT_WORLD_SEED

    @property
    def num_frames(self) -> int:
        return len(self.real_frames)

    @property
    def seconds(self) -> float:
        return len(self.wav) / SAMPLE_RATE


def held_out_cases(num: int, seconds: float, size: int = 64, seed: int = HELD_OUT_WORLD_SEED) -> list[Case]:
    """``num`` evaluation clips: clip i is ``generate_clip(clip_seed(seed, i), seconds, size)`` (deterministic)."""
    if num < 1 or seconds <= 0:
        raise AvatarForcingError(f"held_out_cases needs num >= 1 and seconds > 0, got {num} and {seconds}")
    if seed in (TRAIN_WORLD_SEED, CODEC_HELD_OUT_WORLD_SEED):
        raise AvatarForcingError(f"world seed {seed} is used in training; pick another held-out world seed "
                                 f"(default {HELD_OUT_WORLD_SEED})")
    cases = []
    for i in range(num):
        clip = generate_clip(clip_seed(seed, i), seconds, size)
        if len(clip.frames) < 2:
            raise AvatarForcingError(f"{seconds} s is too short for an evaluation clip; use >= 0.1 s")
        cases.append(Case(reference=clip.frames[0].copy(), wav=clip.wav.astype(np.float32), real_frames=clip.frames,
                          seed=clip.seed, index=i, world_seed=seed))
    return cases


def training_clip_seeds(num: int, world_seed: int = TRAIN_WORLD_SEED) -> set[int]:
    """Clip seeds of the first ``num`` training clips (for disjointness checks)."""
    return {clip_seed(world_seed, i) for i in range(num)}


# ----------------------------------------------------------------------------------------------
# configs


def resolve_config(cfg, overrides: Sequence[str] = ()):
    """A config path or a loaded config, plus ``key=value`` overrides -> a new loaded config."""
    from omegaconf import DictConfig

    from ..config import apply_overrides, load_config

    if not isinstance(cfg, DictConfig):
        return load_config(cfg, list(overrides))
    return apply_overrides(cfg, list(overrides), "the variant's overrides")


# ----------------------------------------------------------------------------------------------
# rollouts (latency: avatarforcing.profiling's StepProfiler and steady_state_seconds_per_frame)


def rollout_student(cfg, checkpoint, case: Case, overrides: Sequence[str] = (), seed: int = 0, warmup: int = 1,
                    timing: dict | None = None, pipe=None) -> tuple[np.ndarray, float]:
    """Stream the student over the case's whole audio -> (uint8 frames [T, H, W, 3], steady-state s/frame).

    ``cfg``: a config path or loaded config; ``overrides`` are applied on top (e.g. schedule.window_blocks=1).
    ``timing`` (a dict) receives the latency breakdown.  ``pipe``: a prebuilt AvatarPipeline to reuse."""
    from ..pipeline import AvatarPipeline

    if pipe is None:
        pipe = AvatarPipeline.from_config(resolve_config(cfg, overrides), checkpoint)
    _check_size(pipe, case)
    prof = StepProfiler(pipe.device)
    chunks = []
    t0 = time.perf_counter()
    with prof.hooks(pipe.model):
        for frames in pipe.stream(case.reference, case.wav, prompt="", seed=seed, profiler=prof):
            chunks.append(frames[0])
    wall = time.perf_counter() - t0
    prof.next_step()
    video = np.concatenate(chunks)
    T = case.num_frames
    if len(video) < T:
        raise AvatarForcingError(f"the stream gave {len(video)} frames for audio of {T} frames")
    spf, details = steady_state_seconds_per_frame(prof.emitting_steps(), pipe.block_video_frames,
                                                  drain_steps=pipe.schedule.L - 1, warmup=warmup)
    if timing is not None:
        timing.update(details, wall_seconds=wall, frames=len(video), B=pipe.schedule.B, L=pipe.schedule.L,
                      N=pipe.schedule.N, timesteps=[round(t, 2) for t in pipe.schedule.timesteps])
    return np.ascontiguousarray(video[:T]), spf


def rollout_teacher(cfg, teacher_ckpt, case: Case, steps: int | None = None, guidance: tuple | float | None = None,
                    seed: int = 0, overrides: Sequence[str] = (), shift: float | None = None,
                    timing: dict | None = None) -> tuple[np.ndarray, float]:
    """The offline bidirectional teacher over the whole clip -> (uint8 frames [T, H, W, 3], s/frame).

    One Euler ODE sample (``steps``, default ode.teacher_steps, on the shifted grid of ``shift``, default
    ode.teacher_shift or schedule.shift) with CFG ``guidance`` = (text scale, audio scale) (default the config's
    teacher.*; a single number sets both) over all latent frames covering the clip at once; latent frame 0 is
    the reference latent (clean); decoded with the configured codec."""
    from ..audio import latent_audio
    from ..pipeline import AvatarPipeline
    from ..train.teacher import euler_sample, guidance_passes, guidance_text, sigma_grid
    from ..vae import to_uint8

    cfg = resolve_config(cfg, overrides)
    pipe = AvatarPipeline.from_config(cfg, teacher_ckpt)
    _check_size(pipe, case)
    steps = int(steps if steps is not None else cfg.ode.teacher_steps)
    if guidance is None:
        gs, ags = float(cfg.teacher.guidance_scale), float(cfg.teacher.audio_guidance_scale)
    elif isinstance(guidance, (int, float)):
        gs = ags = float(guidance)
    else:
        gs, ags = (float(g) for g in guidance)
    shift = float(shift if shift is not None else (cfg.ode.teacher_shift if cfg.ode.teacher_shift is not None
                                                     else cfg.schedule.shift))
    T = case.num_frames
    num_latent = 1 + math.ceil((T - 1) / 4)
    model, dev, dtype = pipe.model, pipe.device, pipe.dtype
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = pipe.encode_reference(pipe.load_images([case.reference]))                       # [1, z, 1, h, w]
        feats = pipe.audio_encoder.encode(torch.from_numpy(case.wav), num_frames=1 + 4 * (num_latent - 1))
        audio = latent_audio(feats.float(), num_latent)[None].to(dev, dtype)                  # [1, F, 4D]
        passes = guidance_passes(gs, ags)
        text = pipe.encode_prompts([""])
        negative = pipe.encode_prompts([str(cfg.teacher.negative_prompt)])[0]
        text = guidance_text(text, negative, passes)
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn((1, ref.shape[1], num_latent, *ref.shape[-2:]), generator=g).to(dev, dtype)
        grid = sigma_grid(steps, shift, [])
        sync()
        t1 = time.perf_counter()
        x, _ = euler_sample(model, noise, ref, audio, text, grid, gs, ags,
                            num_train_timesteps=pipe.schedule.noise.num_train_timesteps)
        sync()
        t2 = time.perf_counter()
        frames = pipe.vae.decode(x.to(dtype))                                                 # [1, 3, 1+4(F-1), H, W]
        video = _as_numpy(to_uint8(frames))[0]                                                 # [T', H, W, 3]
    t3 = time.perf_counter()
    spf = (t3 - t0) / T
    if timing is not None:
        timing.update(steps=steps, grid_points=len(grid), guidance=[gs, ags], cfg_passes=passes, shift=shift,
                      latent_frames=num_latent, tokens=num_latent * model.tokens_per_frame(*ref.shape[-2:]),
                      s_per_frame_parts={"encode": (t1 - t0) / T, "sample": (t2 - t1) / T, "decode": (t3 - t2) / T,
                                         "total": spf}, wall_seconds=t3 - t0)
    return np.ascontiguousarray(video[:T]), spf


def _check_size(pipe, case: Case) -> None:
    H, W = case.reference.shape[:2]
    if (pipe.height, pipe.width) != (H, W):
        raise AvatarForcingError(f"the config generates {pipe.height}x{pipe.width} but the cases are {H}x{W}; set "
                                 f"inference.height={H} inference.width={W} or make cases of size {pipe.height}")


def _as_numpy(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ----------------------------------------------------------------------------------------------
# metrics


def load_metric_nets(path):
    """The metric networks of a run (``RUN/metric_nets.pt``)."""
    from ..metrics import MetricNets
    return MetricNets.load(path)


def real_feature_stats(cases: Sequence[Case], nets):
    """FID reference statistics: identity-net features of all real frames of the cases."""
    from ..metrics import feature_stats
    return feature_stats(np.concatenate([nets.features(c.real_frames) for c in cases]))


def evaluate_variant(frames: np.ndarray, case: Case, nets, real_feats, tail_seconds: float = 10.0,
                     latency: float | None = None) -> dict:
    """evaluate_video on one rollout (driving audio = the case's) + ``latency_s_per_frame``."""
    from ..metrics import evaluate_video

    out = evaluate_video(frames, case.wav, case.reference, nets, real_feats, fps=FPS, tail_seconds=tail_seconds)
    out["latency_s_per_frame"] = float("nan") if latency is None else float(latency)
    return out


# ----------------------------------------------------------------------------------------------
# one table of variants


@dataclass
class Variant:
    name: str
    kind: str                       # student | teacher | real
    checkpoint: str | None = None
    overrides: list[str] = field(default_factory=list)


def _as_variant(name: str, spec) -> Variant:
    if isinstance(spec, Variant):
        return spec
    spec = tuple(spec)
    kind = spec[0] if spec else None
    checkpoint = spec[1] if len(spec) > 1 else None
    overrides = spec[2] if len(spec) > 2 else []
    if kind not in ("student", "teacher", "real"):
        raise AvatarForcingError(f"variant '{name}': kind must be student, teacher or real, got '{kind}'")
    if kind != "real" and not (checkpoint and Path(checkpoint).is_file()):
        raise AvatarForcingError(f"variant '{name}': checkpoint not found: {checkpoint}")
    return Variant(name, kind, None if checkpoint is None else str(checkpoint), list(overrides or []))


def run_overrides(run_dir) -> list[str]:
    """Overrides that point the config at a run's codec (``RUN/codec.pt``) when it exists."""
    codec = RunLayout(run_dir).codec
    return ["vae.kind=world", f"vae.path={codec}"] if codec.is_file() else []


METRIC_KEYS = ("csim", "delta_e", "adj_feat", "adj_pixel", "sync_conf", "sync_offset", "sync_dist", "fid")


def mean_rows(rows: list[dict]) -> dict:
    """Per-case metric rows -> their means over the numeric keys (the first row's keys)."""
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if vals and len(vals) == len(rows):
            finite = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
            out[key] = float(statistics.fmean(finite)) if finite else float("nan")
    return out


def evaluate_run(run_dir, cfg_path, variants: Mapping[str, tuple], cases: Sequence[Case], nets,
                 out_dir=None, name: str = "table", real_feats=None, overrides: Sequence[str] = (),
                 tail_seconds: float = 10.0, teacher_steps: int | None = None, seed: int = 0,
                 videos: bool = True, variant_videos: bool = False, title: str | None = None,
                 log_fn: Callable | None = print) -> list[dict]:
    """Roll out every variant on every case and evaluate -> one row per variant (means over cases).

    run_dir: the run folder (its ``codec.pt``, if there, is used: :func:`run_overrides`) and the default output
    folder; cfg_path: a config path or a loaded config; variants: name -> (kind 'student' | 'teacher' | 'real',
    checkpoint, overrides); ``overrides`` apply to all.  Writes to ``out_dir`` (default ``run_dir``):
    ``<name>.csv`` (means), ``<name>_per_case.csv``, ``<name>.md`` (markdown table) and, with ``videos``,
    ``samples/<name>_side_by_side.mp4`` (case 0: the real clip, then the variants left to right, audio muxed; the
    order is in ``samples/<name>_side_by_side.txt``), with ``variant_videos`` also ``samples/<name>/<variant>.mp4``.
    Row keys: variant, kind, checkpoint, overrides, cases, latency_s_per_frame and every ``evaluate_video`` key
    (``csim_total``, ``csim_last``, ``delta_e_*``, ``adj_feat_*``, ``adj_pixel_*``, ``sync_conf_*``,
    ``sync_offset_*``, ``fid_*``, ...)."""
    say = log_fn or (lambda *_: None)
    specs = [_as_variant(n, s) for n, s in variants.items()]
    if not cases:
        raise AvatarForcingError("evaluate_run needs at least one case")
    base = list(run_overrides(run_dir)) + list(overrides)
    cfg = resolve_config(cfg_path, base)
    if real_feats is None:
        real_feats = real_feature_stats(cases, nets)
    rows, per_case, samples = [], [], {}
    for v in specs:
        results = []
        pipe = None
        if v.kind == "student":
            from ..pipeline import AvatarPipeline
            pipe = AvatarPipeline.from_config(resolve_config(cfg, v.overrides), v.checkpoint)
        for case in cases:
            timing: dict = {}
            t0 = time.perf_counter()
            if v.kind == "student":
                frames, spf = rollout_student(cfg, v.checkpoint, case, v.overrides, seed=seed, timing=timing,
                                              pipe=pipe)
            elif v.kind == "teacher":
                frames, spf = rollout_teacher(cfg, v.checkpoint, case, steps=teacher_steps, seed=seed,
                                              overrides=v.overrides, timing=timing)
            else:
                frames, spf = case.real_frames, None
            rollout_s = time.perf_counter() - t0
            metrics = evaluate_variant(frames, case, nets, real_feats, tail_seconds, spf)
            metrics.update(variant=v.name, case=case.index, clip_seed=case.seed, rollout_seconds=rollout_s,
                           eval_seconds=time.perf_counter() - t0 - rollout_s)
            results.append(metrics)
            per_case.append(metrics)
            if case is cases[0]:
                samples[v.name] = frames
            say(f"[{name}] {v.name} case {case.index}: CSIM {metrics['csim_total']:.3f}/{metrics['csim_last']:.3f} "
                f"dE {metrics['delta_e_total']:.2f}/{metrics['delta_e_last']:.2f} "
                f"adj {metrics['adj_feat_total']:.4f}/{metrics['adj_feat_last']:.4f} "
                f"latency {fmt(metrics['latency_s_per_frame'], 4)} s/frame (rollout {rollout_s:.1f} s)")
        row = {"variant": v.name, "kind": v.kind, "checkpoint": v.checkpoint or "", "overrides": " ".join(v.overrides),
               "cases": len(results), **mean_rows(results)}
        rows.append(row)
    if out_dir is None:
        out_dir = run_dir
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / f"{name}.csv", rows)
        write_csv(out / f"{name}_per_case.csv", per_case)
        (out / f"{name}.md").write_text(markdown_table(rows, title=title) + "\n")
        if videos:
            write_samples(out / "samples", name, cases[0], samples, per_variant=variant_videos)
    return rows


# ----------------------------------------------------------------------------------------------
# outputs


def write_csv(path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})
    return path


def fmt(x, digits: int = 3) -> str:
    """A table cell: ``x`` to ``digits`` decimals, ``-`` for None / NaN / inf."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    return f"{x:.{digits}f}"


def _tl(row: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    t, l_ = row.get(f"{key}_total"), row.get(f"{key}_last")
    if t is None and l_ is None:
        return "-"
    s = lambda v: None if v is None else v * scale  # noqa: E731
    return f"{fmt(s(t), digits)} / {fmt(s(l_), digits)}"


TABLE_COLUMNS = (
    ("Latency (s/frame) ↓", lambda r: fmt(r.get("latency_s_per_frame"), 4)),
    ("CSIM ↑", lambda r: _tl(r, "csim", 3)),
    ("ΔE2000 ↓", lambda r: _tl(r, "delta_e", 2)),
    ("Adj-feat (1e-2) ↓", lambda r: _tl(r, "adj_feat", 2, 100.0)),
    ("Adj-pixel ↓", lambda r: _tl(r, "adj_pixel", 2)),
    ("Sync-C ↑", lambda r: _tl(r, "sync_conf", 3)),
    ("Sync offset ↓", lambda r: _tl(r, "sync_offset", 1)),
    ("FID ↓", lambda r: _tl(r, "fid", 2)),
)


def markdown_table(rows: Sequence[dict], title: str | None = None) -> str:
    """Variants as rows; every metric as Total / Last (means over cases)."""
    head = ["Variant"] + [c[0] for c in TABLE_COLUMNS]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([str(r["variant"])] + [fn(r) for _, fn in TABLE_COLUMNS]) + " |")
    return "\n".join(lines)


def tile_videos(videos: Sequence[np.ndarray], columns: int | None = None, gap: int = GAP) -> np.ndarray:
    """Equal-size uint8 videos [T, H, W, 3] -> one video with the tiles in rows of ``columns`` (default: one row),
    separated by ``gap`` px of black; videos shorter than the longest hold their last frame."""
    if not videos:
        raise AvatarForcingError("tile_videos needs at least one video")
    T = max(len(v) for v in videos)
    H, W = videos[0].shape[1:3]
    cols = columns or len(videos)
    rows = math.ceil(len(videos) / cols)
    out = np.zeros((T, rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap, 3), np.uint8)
    for i, v in enumerate(videos):
        if v.shape[1:3] != (H, W):
            raise AvatarForcingError(f"tile_videos: video {i} is {v.shape[1:3]}, not {(H, W)}")
        r, c = divmod(i, cols)
        y, x = r * (H + gap), c * (W + gap)
        out[:len(v), y:y + H, x:x + W] = v
        out[len(v):, y:y + H, x:x + W] = v[-1]
    return out


def write_samples(folder, name: str, case: Case, samples: Mapping[str, np.ndarray], fps: int = FPS,
                  per_variant: bool = True) -> list[Path]:
    """One side-by-side mp4 (the real clip first) of one case and, with ``per_variant``, an mp4 per variant,
    with the case's audio muxed."""
    from ..media import VideoWriter, write_wav

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "audio.wav"
        write_wav(wav, case.wav, SAMPLE_RATE)
        for vname, frames in (samples.items() if per_variant else ()):
            path = folder / name / f"{slug(vname)}.mp4"
            with VideoWriter(path, fps, audio_path=wav) as w:
                w.write(frames)
            written.append(path)
        order = ["real"] + list(samples)
        videos = [case.real_frames] + list(samples.values())
        T = max(len(v) for v in videos)
        same = all(len(v) == T for v in videos)
        path = folder / f"{name}_side_by_side.mp4"
        with VideoWriter(path, fps, audio_path=wav) as w:
            if same:                                   # tile chunk by chunk: flat memory for long rollouts
                for i in range(0, T, 256):
                    w.write(tile_videos([v[i:i + 256] for v in videos]))
            else:
                w.write(tile_videos(videos))
        written.append(path)
    (folder / f"{name}_side_by_side.txt").write_text(
        f"held-out case {case.index} (clip seed {case.seed}), {case.num_frames} frames; tiles left to right:\n"
        + "\n".join(f"{i + 1}. {n}" for i, n in enumerate(order)) + "\n")
    return written


def slug(name: str) -> str:
    keep = "".join(ch if ch.isalnum() else "_" for ch in name.lower())
    return "_".join(p for p in keep.split("_") if p) or "variant"


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default, allow_nan=True))
    os.replace(tmp, path)
    return path


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)

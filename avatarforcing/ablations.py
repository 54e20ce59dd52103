"""The paper's ablations (Tables 3-6, Figures 4-5) on any config, models, evaluation items and metrics.

    from avatarforcing.ablations import FAST_GRID, read_eval_list, run_tables

    summary = run_tables([4, 5], {"dmd": "model.pt", "ode": "ode.pt", "teacher": "teacher.pt"},
                         read_eval_list("eval.txt", seconds=20), scorer, cfg, "results/ablations", grid=FAST_GRID)

``scripts/ablations.py`` runs it on real configs and clips with the peers' metrics
(:class:`avatarforcing.evaluation.scorer.VideoScorer`); ``scripts/world_ablations.py`` on a world run with the
world's metrics (:class:`avatarforcing.world.evaluate.WorldScorer`).  The runner never imports either scorer.

Models (``models``: name -> checkpoint or None): ``dmd`` the final (DMD) student, ``ode`` the ODE-only student,
``teacher`` the bidirectional teacher and the optional one-step causal baselines ``self_forcing`` / ``causal_ode``
(the names of avatarforcing/world/layout.py's run folders).  A variant whose model is missing is reported in the
table's notes, not run.

  Table 3  L x N grid of the final student at inference (schedule.window_blocks=L, passes=N, steps=null, warped):
           identity / stability / latency; fig4_latency.png, fig5_stability.png.  Every cell reuses the
           B_{4,1}-trained student (the paper trains each cell): it measures inference-time allocation only.
  Table 4  Teacher (offline, whole clip) / Student (ODE only) / AvatarForcing (DMD), and the DMD student without
           the style anchor / the temporal anchor.
  Table 5  w/o anchor-audio zero padding, w/o RoPE re-indexing, full.
  Table 6  one-step causal baselines at L = 1 (ONE_STEP): the trained baselines if given, else the DMD / ODE
           students run with L = 1 (said in the notes).

Every variant is rolled out on every item with the same noise seed, scored per item (Total / Last), averaged
over the items; each paper claim is judged on one metric fixed beforehand (:data:`CLAIMS`) with a paired bootstrap
over the items (:mod:`avatarforcing.stats`): holds / does not hold / inconclusive (95 % CI above / below / around 0).
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from . import AvatarForcingError
from .audio import FPS, SAMPLE_RATE
from .profiling import StepProfiler, steady_state_seconds_per_frame
from .stats import RESAMPLES, compare

FULL_GRID = ((1, 2, 4, 8), (1, 2, 4, 8))
FAST_GRID = ((1, 2, 4), (1, 2))
ONE_STEP = ["schedule.window_blocks=1", "schedule.passes=1", "schedule.steps=[1000]"]
TAIL_SECONDS = 10.0
TABLES = (3, 4, 5, 6)
MODELS = ("dmd", "ode", "teacher", "self_forcing", "causal_ode")
GAP = 2                           # px between tiles of the side-by-side videos (even: H.264 needs even sizes)
TITLES = {3: "Table 3. Window length L x passes N (inference-time allocation, final student)",
          4: "Table 4. Teacher / Student / AvatarForcing, and the dual-anchor cache",
          5: "Table 5. Anchor-audio zero padding and RoPE re-indexing",
          6: "Table 6. One-step causal baselines"}


# ----------------------------------------------------------------------------------------------
# variants


class Variant(NamedTuple):
    kind: str                         # student | teacher | real (the items' ground truth)
    checkpoint: str | None = None
    overrides: tuple = ()


def as_variant(name: str, spec) -> Variant:
    """A Variant or a (kind, checkpoint, overrides) tuple -> a checked Variant."""
    kind, checkpoint, overrides = (tuple(spec) + (None, None, ()))[:3]
    if kind not in ("student", "teacher", "real"):
        raise AvatarForcingError(f"variant '{name}': kind must be student, teacher or real, got '{kind}'")
    if kind != "real" and not (checkpoint and Path(checkpoint).is_file()):
        raise AvatarForcingError(f"variant '{name}': checkpoint not found: {checkpoint}")
    return Variant(kind, None if checkpoint is None else str(checkpoint), tuple(overrides or ()))


def parse_tables(spec: str) -> list[int]:
    """'3,4,5,6' -> [3, 4, 5, 6]; anything else is a one-line error."""
    try:
        tables = sorted({int(t) for t in spec.split(",") if t.strip()})
    except ValueError:
        tables = []
    if not tables or any(t not in TABLES for t in tables):
        raise AvatarForcingError(f"--tables must be a comma-separated subset of 3,4,5,6, got '{spec}'")
    return tables


def add_arguments(p) -> None:
    """The command-line options that scripts/ablations.py and scripts/world_ablations.py share."""
    p.add_argument("--tables", default="3,4,5,6", help="comma-separated subset of 3,4,5,6")
    p.add_argument("--fast", action="store_true", help="smaller L x N grid (L 1,2,4; N 1,2) and 4 teacher steps")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher Euler steps (default ode.teacher_steps)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every rollout")
    p.add_argument("--no-videos", action="store_true", help="skip the side-by-side sample videos")
    p.add_argument("--variant-videos", action="store_true", help="also write one mp4 per variant")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")


def cli(fn, args) -> int:
    """``fn(args)``, with an AvatarForcingError as one line on stderr and exit status 1."""
    import sys
    try:
        return fn(args)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def grid_name(L: int, N: int) -> str:
    return f"B_{{{L},{N}}}"


def _have(models: Mapping, name: str) -> bool:
    path = models.get(name)
    return path is not None and Path(path).is_file()


# Without the style anchor the reference is only the video's first frame: it starts the temporal cache and leaves
# it with the budget (cache.reference_in_temporal).  Without it, a model with no reference channels (in_dim 16)
# would never see the reference at all.  (Results before 2026-12-01 ran this arm without the seeded frame.)
NO_STYLE_ANCHOR = ["cache.style_anchor=false", "cache.reference_in_temporal=true"]


def table_variants(table: int, models: Mapping, grid=FULL_GRID) -> tuple[dict[str, Variant], dict[str, str]]:
    """-> (variant name -> Variant, variant name -> note); variants whose model is missing are left out, noted."""
    if table not in TABLES:
        raise AvatarForcingError(f"unknown table {table}; choose among 3, 4, 5, 6")
    specs: dict[str, tuple] = {}
    notes: dict[str, str] = {}
    if table == 3:
        Ls, Ns = grid
        specs = {grid_name(L, N): ("dmd", [f"schedule.window_blocks={L}", f"schedule.passes={N}",
                                           "schedule.steps=null", "schedule.warp=true"]) for N in Ns for L in Ls}
    elif table == 4:
        specs = {"Teacher": ("teacher", []), "Student": ("ode", []), "AvatarForcing": ("dmd", []),
                 "w/o style anchor": ("dmd", NO_STYLE_ANCHOR),
                 "w/o temporal anchor": ("dmd", ["cache.temporal_anchor=false"])}
    elif table == 5:
        specs = {"w/o anchor-audio zero padding": ("dmd", ["cache.zero_anchor_audio=false"]),
                 "w/o RoPE re-indexing": ("dmd", ["cache.rope_reindex=false"]), "Full": ("dmd", [])}
    else:
        for name, baseline, fallback, what in (("Self-Forcing (1-step)", "self_forcing", "dmd", "DMD"),
                                               ("Causal ODE", "causal_ode", "ode", "ODE")):
            model = baseline if _have(models, baseline) else fallback
            specs[name] = (model, ONE_STEP)
            notes[name] = (f"trained baseline {models[baseline]}" if model == baseline else
                           f"no trained {name.split(' (')[0]} baseline: the {what} student run with L = 1")
        specs["AvatarForcing"] = ("dmd", [])
    variants = {}
    for name, (model, overrides) in specs.items():
        if _have(models, model):
            variants[name] = Variant("teacher" if model == "teacher" else "student", str(models[model]),
                                     tuple(overrides))
        else:
            notes[name] = f"not evaluated: no {model} checkpoint"
    return variants, notes


# ----------------------------------------------------------------------------------------------
# evaluation items


@dataclass
class EvalItem:
    """One evaluation clip: a reference image and driving speech (+ the real video, if there is one).

    ``reference``: image path or uint8 [H, W, 3]; ``audio``: path or float32 [N] at 16 kHz; ``ground_truth``:
    video path or uint8 [T, H, W, 3]; ``seconds`` cuts the audio; ``info``: extra per-item CSV columns."""
    name: str
    reference: object
    audio: object
    ground_truth: object = None
    seconds: float | None = None
    info: dict = field(default_factory=dict)

    @cached_property
    def wav(self) -> np.ndarray:
        from .media import load_audio
        wav = self.audio if isinstance(self.audio, np.ndarray) else load_audio(self.audio, SAMPLE_RATE)
        wav = np.asarray(wav, np.float32)
        return wav[:round(self.seconds * SAMPLE_RATE)] if self.seconds else wav

    @property
    def num_frames(self) -> int:
        """Frames of a rollout: the ground truth's (an array) or those covering the audio at 25 fps."""
        if isinstance(self.ground_truth, np.ndarray):
            return len(self.ground_truth)
        return max(2, round(FPS * len(self.wav) / SAMPLE_RATE))

    @cached_property
    def ground_truth_frames(self) -> np.ndarray | None:
        if self.ground_truth is None or isinstance(self.ground_truth, np.ndarray):
            return self.ground_truth
        from .media import read_video
        return read_video(self.ground_truth)[0][:self.num_frames]


def read_eval_list(path, seconds: float | None = None) -> list[EvalItem]:
    """An eval list -> items.  One item a line: ``image audio [ground_truth_video]`` (quotes for spaces; paths
    relative to the list file; ``#`` starts a comment).  Every file is checked before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise AvatarForcingError(f"eval list {path} not found; write one item a line: image audio [ground_truth]")
    items, names = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p if Path(p).is_absolute() else path.parent / p for p in shlex.split(line)]
        if len(parts) not in (2, 3):
            raise AvatarForcingError(f"{path}:{n}: expected 'image audio [ground_truth_video]', got {len(parts)} "
                                     "fields")
        for p in parts:
            if not Path(p).is_file():
                raise AvatarForcingError(f"{path}:{n}: {p} not found; fix the path (relative to the list file)")
        name = Path(parts[0]).stem if Path(parts[0]).stem not in names else f"{Path(parts[0]).stem}_{n}"
        names.add(name)
        items.append(EvalItem(name, Path(parts[0]), Path(parts[1]), Path(parts[2]) if len(parts) == 3 else None,
                              seconds))
    if not items:
        raise AvatarForcingError(f"eval list {path} has no items; write one a line: image audio [ground_truth]")
    return items


# ----------------------------------------------------------------------------------------------
# rollouts (latency: avatarforcing.profiling's StepProfiler and steady_state_seconds_per_frame)


def resolve_config(cfg, overrides: Sequence[str] = ()):
    """A config path or a loaded config, plus ``key=value`` overrides -> a new loaded config."""
    from omegaconf import DictConfig

    from .config import apply_overrides, load_config

    if not isinstance(cfg, DictConfig):
        return load_config(cfg, list(overrides))
    return apply_overrides(cfg, list(overrides), "the variant's overrides")


def rollout_student(cfg, checkpoint, item, overrides: Sequence[str] = (), seed: int = 0, warmup: int = 1,
                    timing: dict | None = None, pipe=None) -> tuple[np.ndarray, float]:
    """Stream the student over the item's whole audio -> (uint8 frames [T, H, W, 3], steady-state s/frame).

    ``item``: anything with ``reference``, ``wav`` and ``num_frames`` (an EvalItem, a world Case); ``cfg``: a
    config path or loaded config, ``overrides`` on top; ``timing`` (a dict) receives the latency breakdown;
    ``pipe``: a prebuilt AvatarPipeline to reuse.  Latency: per emitting step, the sampler step plus the VAE
    decode of the emitted block, without start-up, the first ``warmup`` emitting steps and the L-1 drain steps."""
    from .pipeline import AvatarPipeline

    if pipe is None:
        pipe = AvatarPipeline.from_config(resolve_config(cfg, overrides), checkpoint)
    check_size(pipe, item)
    prof = StepProfiler(pipe.device)
    chunks = []
    t0 = time.perf_counter()
    with prof.hooks(pipe.model):
        for frames in pipe.stream(item.reference, item.wav, prompt="", seed=seed, profiler=prof):
            chunks.append(frames[0])
    wall = time.perf_counter() - t0
    prof.next_step()
    video = np.concatenate(chunks)
    T = item.num_frames
    if len(video) < T:
        raise AvatarForcingError(f"the stream gave {len(video)} frames for audio of {T} frames")
    spf, details = steady_state_seconds_per_frame(prof.emitting_steps(), pipe.block_video_frames,
                                                  drain_steps=pipe.schedule.L - 1, warmup=warmup)
    if timing is not None:
        timing.update(details, wall_seconds=wall, frames=len(video), B=pipe.schedule.B, L=pipe.schedule.L,
                      N=pipe.schedule.N, timesteps=[round(t, 2) for t in pipe.schedule.timesteps])
    return np.ascontiguousarray(video[:T]), spf


def rollout_teacher(cfg, teacher_ckpt, item, steps: int | None = None, guidance: tuple | float | None = None,
                    seed: int = 0, overrides: Sequence[str] = (), shift: float | None = None,
                    timing: dict | None = None) -> tuple[np.ndarray, float]:
    """The offline bidirectional teacher over the whole clip -> (uint8 frames [T, H, W, 3], s/frame).

    One Euler ODE sample (``steps``, default ode.teacher_steps, on the shifted grid of ``shift``, default
    ode.teacher_shift or schedule.shift) with CFG ``guidance`` = (text scale, audio scale) (default the config's
    teacher.*; a single number sets both) over all latent frames covering the clip at once; latent frame 0 is
    the reference latent (clean); decoded with the configured codec.  s/frame: the whole wall time over T."""
    from .audio import latent_audio
    from .pipeline import AvatarPipeline
    from .train.teacher import euler_sample, guidance_passes, guidance_text, sigma_grid
    from .vae import to_uint8

    cfg = resolve_config(cfg, overrides)
    pipe = AvatarPipeline.from_config(cfg, teacher_ckpt)
    check_size(pipe, item)
    steps = int(steps if steps is not None else cfg.ode.teacher_steps)
    if guidance is None:
        gs, ags = float(cfg.teacher.guidance_scale), float(cfg.teacher.audio_guidance_scale)
    elif isinstance(guidance, (int, float)):
        gs = ags = float(guidance)
    else:
        gs, ags = (float(g) for g in guidance)
    shift = float(shift if shift is not None else (cfg.ode.teacher_shift if cfg.ode.teacher_shift is not None
                                                     else cfg.schedule.shift))
    T = item.num_frames
    num_latent = 1 + math.ceil((T - 1) / 4)
    model, dev, dtype = pipe.model, pipe.device, pipe.dtype
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = pipe.encode_reference(pipe.load_images([item.reference]))                       # [1, z, 1, h, w]
        feats = pipe.audio_encoder.encode(torch.from_numpy(item.wav), num_frames=1 + 4 * (num_latent - 1))
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


def check_size(pipe, item) -> None:
    """A reference given as an array (prepared frames, as the world's) must have the generated size."""
    if not isinstance(item.reference, np.ndarray):
        return                                       # image files are resized by the pipeline (inference.resize)
    H, W = item.reference.shape[:2]
    if (pipe.height, pipe.width) != (H, W):
        raise AvatarForcingError(f"the config generates {pipe.height}x{pipe.width} but the cases are {H}x{W}; set "
                                 f"inference.height={H} inference.width={W} or make cases of size {pipe.height}")


def _as_numpy(x) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ----------------------------------------------------------------------------------------------
# scorers


class Scorer:
    """What the runner measures videos with; subclass it (every method but :meth:`score` is optional).

    ``columns``: the markdown table, (header, row -> cell) pairs (the latency column comes first);
    ``roles``: role -> (metric key without _total / _last, label, scale) for identity, stability, colour and sync:
    the metric each claim is judged on, the Table 3 grid and the figures; ``legend``: a paragraph for tables.md."""
    columns: Sequence[tuple[str, Callable[[dict], str]]] = ()
    roles: Mapping[str, tuple[str, str, float]] = {}
    legend: str = ""

    def prepare(self, items: Sequence[EvalItem]) -> None:
        """Called once before any variant (e.g. the ground truth's FID / FVD statistics)."""

    def score(self, frames: np.ndarray, item: EvalItem) -> dict:
        """uint8 frames [T, H, W, 3] of one rollout -> per-video metrics (``<metric>_total`` / ``_last``)."""
        raise NotImplementedError

    def variant_metrics(self) -> dict:
        """Set-level metrics over the videos scored since the last call (e.g. FID / FVD of a variant)."""
        return {}


def evaluate_variants(cfg, variants: Mapping[str, Variant], items: Sequence[EvalItem], scorer: Scorer,
                      out_dir=None, name: str = "table", title: str | None = None, teacher_steps: int | None = None,
                      seed: int = 0, videos: bool = True, variant_videos: bool = False,
                      log_fn: Callable | None = print) -> tuple[list[dict], list[dict]]:
    """Roll out every variant on every item and score -> (one row per variant (means over items), per-item rows).

    ``cfg``: a loaded config (each variant's overrides go on top).  With ``out_dir``: ``<name>.csv``,
    ``<name>_per_case.csv``, ``<name>.md`` and, with ``videos``, ``samples/<name>_side_by_side.mp4`` (item 0: the
    real clip if any, then the variants left to right, audio muxed; order in the .txt next to it), with
    ``variant_videos`` also ``samples/<name>/<variant>.mp4``."""
    from .pipeline import AvatarPipeline

    say = log_fn or (lambda *_: None)
    if not items:
        raise AvatarForcingError("the ablations need at least one evaluation item")
    specs = {n: as_variant(n, s) for n, s in variants.items()}
    rows, per_case, samples = [], [], {}
    for vname, v in specs.items():
        results = []
        pipe = (AvatarPipeline.from_config(resolve_config(cfg, v.overrides), v.checkpoint)
                if v.kind == "student" else None)
        for item in items:
            t0 = time.perf_counter()
            if v.kind == "student":
                frames, spf = rollout_student(cfg, v.checkpoint, item, v.overrides, seed=seed, pipe=pipe)
            elif v.kind == "teacher":
                frames, spf = rollout_teacher(cfg, v.checkpoint, item, steps=teacher_steps, seed=seed,
                                              overrides=v.overrides)
            else:
                frames, spf = item.ground_truth_frames, None
            rollout_s = time.perf_counter() - t0
            metrics = dict(scorer.score(frames, item), latency_s_per_frame=math.nan if spf is None else float(spf))
            results.append(metrics)
            per_case.append(dict(variant=vname, item=item.name, **item.info, **metrics, rollout_seconds=rollout_s,
                                 eval_seconds=time.perf_counter() - t0 - rollout_s))
            if item is items[0]:
                samples[vname] = frames
            shown = [(k, metrics.get(f"{k}_{p}")) for k, _, _ in scorer.roles.values() for p in ("last",)]
            say(f"[{name}] {vname} {item.name}: " + " ".join(f"{k} {fmt(x, 4)}" for k, x in shown if x is not None)
                + f" latency {fmt(metrics['latency_s_per_frame'], 4)} s/frame (rollout {rollout_s:.1f} s)")
        rows.append({"variant": vname, "kind": v.kind, "checkpoint": v.checkpoint or "",
                     "overrides": " ".join(v.overrides), "cases": len(results), **mean_rows(results),
                     **scorer.variant_metrics()})
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / f"{name}.csv", rows)
        write_csv(out / f"{name}_per_case.csv", per_case)
        (out / f"{name}.md").write_text(markdown_table(rows, scorer.columns, title=title) + "\n")
        if videos:
            write_samples(out / "samples", name, items[0], samples, per_variant=variant_videos)
    return rows, per_case


# ----------------------------------------------------------------------------------------------
# claims: each judged on one metric fixed beforehand, paired bootstrap over the items


# (table, claim, [(claimed winner, other arm), ...] (all must hold) or "matched", role, part)
CLAIMS = (
    (3, "B_{4,1} beats B_{2,2} at matched L·N = 4 (look-ahead beats passes)", [(grid_name(4, 1), grid_name(2, 2))],
     "stability", "last"),
    (3, "At matched L·N the larger window is more stable (every matched pair of the grid)", "matched",
     "stability", "last"),
    (4, "The style anchor preserves identity", [("AvatarForcing", "w/o style anchor")], "identity", "last"),
    (4, "The temporal anchor keeps frames coherent", [("AvatarForcing", "w/o temporal anchor")], "stability", "last"),
    (4, "DMD improves over the ODE-only student", [("AvatarForcing", "Student")], "stability", "last"),
    (5, "Anchor-audio zero padding helps lip sync", [("Full", "w/o anchor-audio zero padding")], "sync", "total"),
    (5, "RoPE re-indexing prevents late identity drift", [("Full", "w/o RoPE re-indexing")], "identity", "last"),
    (6, "AvatarForcing beats the one-step causal baselines",
     [("AvatarForcing", "Self-Forcing (1-step)"), ("AvatarForcing", "Causal ODE")], "stability", "last"),
)


def _matched_pairs(names) -> list[tuple[str, str]]:
    cells = {_grid_cell(n): n for n in names if _grid_cell(n)}
    return [(cells[a], cells[b]) for a in cells for b in cells if a[0] * a[1] == b[0] * b[1] and a[0] > b[0]]


def _grid_cell(name: str) -> tuple[int, int] | None:
    if not (name.startswith("B_{") and name.endswith("}")):
        return None
    L, N = name[3:-1].split(",")
    return int(L), int(N)


def _values(per_case: Sequence[dict], variant: str, metric: str) -> dict | None:
    vals = {r["item"]: r.get(metric) for r in per_case if r["variant"] == variant}
    ok = vals and all(v is not None and math.isfinite(float(v)) for v in vals.values())
    return {k: float(v) for k, v in vals.items()} if ok else None


def judge(claim: str, pairs, metric: str, per_case: Sequence[dict], resamples: int = RESAMPLES) -> dict:
    """A claim over (winner, other) pairs on ``metric``: holds if every pair holds, does not hold if one does not,
    else inconclusive; not evaluated when an arm, the metric or a second item is missing."""
    entry = {"claim": claim, "metric": metric, "pairs": []}
    for a, b in pairs:
        va, vb = _values(per_case, a, metric), _values(per_case, b, metric)
        if va is None or vb is None:
            return dict(entry, verdict="not evaluated", detail=f"{a} or {b} has no finite {metric}")
        if len(va) < 2:
            return dict(entry, verdict="not evaluated", detail="a paired bootstrap needs >= 2 items")
        c = compare(va, vb, metric, resamples)
        entry["pairs"].append(dict(c.as_dict(), winner=a, other=b))
    if not entry["pairs"]:
        return dict(entry, verdict="not evaluated", detail="no pairs to compare")
    verdicts = [p["verdict"] for p in entry["pairs"]]
    verdict = ("holds" if all(v == "holds" for v in verdicts) else
               "does not hold" if "does not hold" in verdicts else "inconclusive")
    detail = "; ".join(f"{p['winner']} vs {p['other']}: effect {p['effect']:+.4g} [{p['ci_low']:+.4g}, "
                       f"{p['ci_high']:+.4g}], {p['verdict']}" for p in entry["pairs"])
    return dict(entry, verdict=verdict, detail=f"{metric} over {entry['pairs'][0]['n_cases']} items: {detail}")


def make_claims(tables: Mapping[int, dict], roles: Mapping, resamples: int = RESAMPLES) -> list[dict]:
    """The paper's claims over the tables run so far (``tables``: table -> {"rows", "per_case"})."""
    claims = []
    for t, claim, pairs, role, part in CLAIMS:
        if t not in tables:
            continue
        per_case = tables[t]["per_case"]
        if role not in roles:
            claims.append({"claim": claim, "verdict": "not evaluated", "detail": f"the metrics have no {role} metric"})
            continue
        if pairs == "matched":
            pairs = _matched_pairs([r["variant"] for r in tables[t]["rows"]])
        claims.append(judge(claim, pairs, f"{roles[role][0]}_{part}", per_case, resamples))
    rows = {r["variant"]: r for r in tables.get(4, {}).get("rows", [])}
    if "Teacher" in rows and "AvatarForcing" in rows and rows["AvatarForcing"]["latency_s_per_frame"] > 0:
        teacher, student = rows["Teacher"]["latency_s_per_frame"], rows["AvatarForcing"]["latency_s_per_frame"]
        claims.append({"claim": "The student is orders of magnitude faster than the teacher",
                       "verdict": "holds" if teacher / student >= 100 else "does not hold", "ratio": teacher / student,
                       "detail": f"teacher {teacher:.4f} s/frame vs AvatarForcing {student:.4f} s/frame: "
                                 f"{teacher / student:.0f}x (criterion >= 100x; paper 16 / 0.034 = 470x)"})
    return claims


# ----------------------------------------------------------------------------------------------
# the tables


def run_tables(tables: Sequence[int], models: Mapping, items: Sequence[EvalItem], scorer: Scorer, cfg, out,
               grid=FULL_GRID, teacher_steps: int | None = None, seed: int = 0, videos: bool = True,
               variant_videos: bool = False, intro: str = "", settings: dict | None = None,
               previous: Mapping[int, dict] | None = None, real_row: bool = False, resamples: int = RESAMPLES,
               log: Callable | None = print) -> dict:
    """Tables ``tables`` -> the summary (also ``out/summary.json``); writes every table's CSVs and markdown,
    ``tables.md`` (``intro``, the scorer's legend, the tables, the claims) and, for Table 3, the figures.

    ``cfg``: a loaded config; ``previous``: table -> summary entry of an earlier run to keep (not rerun);
    ``real_row``: score the items' ground truth too (a "Real clips" row, for scale).  tables.md and summary.json
    are rewritten after every table, so a partial run leaves the tables done so far."""
    say = log or (lambda *_: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    scorer.prepare(items)
    summary = {"settings": dict(settings or {}), "tables": {}, "claims": [], "figures": [], "timings_s": {}}
    if real_row:
        summary["real"] = evaluate_variants(cfg, {"Real clips": Variant("real")}, items, scorer, log_fn=None)[0][0]
    done = {int(k): v for k, v in (previous or {}).items()}
    for t in sorted(tables):
        variants, notes = table_variants(t, models, grid)
        if t in done:
            say(f"table {t}: reused")
        else:
            t0 = time.perf_counter()
            say(f"table {t}: {len(variants)} variants x {len(items)} item(s)")
            rows, per_case = evaluate_variants(cfg, variants, items, scorer, out, f"table{t}", TITLES[t],
                                               teacher_steps, seed, videos, variant_videos, log)
            for r in rows:
                if _grid_cell(r["variant"]):
                    r["L"], r["N"] = _grid_cell(r["variant"])
            done[t] = {"rows": rows, "per_case": per_case, "notes": notes,
                       "markdown": markdown_table(rows, scorer.columns), "seconds": time.perf_counter() - t0}
        if 3 in done:
            summary["figures"] = plot_grid(done[3]["rows"], *grid, out, int(cfg.schedule.block_frames), scorer.roles)
        summary["tables"] = {k: done[k] for k in sorted(done)}
        summary["claims"] = make_claims(done, scorer.roles, resamples)
        summary["timings_s"] = {"total": time.perf_counter() - t_start}
        write_json(out / "summary.json", summary)
        write_tables_md(out, summary, scorer, intro, grid)
    return summary


def grid_markdown(rows, Ls, Ns, part: str, roles: Mapping) -> str:
    """The Table 3 grid: identity / stability / latency (ms/frame) per (L, N) cell."""
    cells = {(int(r["L"]), int(r["N"])): r for r in rows if "L" in r}
    (ik, _, iscale), (sk, _, sscale) = roles.get("identity", ("", "", 1.0)), roles.get("stability", ("", "", 1.0))
    lines = ["| N \\ L | " + " | ".join(str(L) for L in Ls) + " |", "|" + "|".join(["---"] * (len(Ls) + 1)) + "|"]
    for N in Ns:
        vals = []
        for L in Ls:
            r = cells.get((L, N))
            vals.append("-" if r is None else
                        f"{fmt(iscale * r.get(f'{ik}_{part}', math.nan), 2)} / "
                        f"{fmt(sscale * r.get(f'{sk}_{part}', math.nan), 2)} / "
                        f"{fmt(1e3 * r.get('latency_s_per_frame', math.nan), 2)}")
        lines.append(f"| {N} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_grid(rows, Ls, Ns, out: Path, B: int, roles: Mapping) -> list[str]:
    """fig4_latency.png (latency vs window length) and fig5_stability.png (the roles' Last metrics vs L)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cells = {(int(r["L"]), int(r["N"])): r for r in rows if "L" in r}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for N in Ns:
        pts = [(L * B, 1e3 * cells[(L, N)]["latency_s_per_frame"]) for L in Ls if (L, N) in cells]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"N = {N}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([L * B for L in Ls])
    ax.set_xticklabels([str(L * B) for L in Ls])
    ax.set_xlabel(f"window length (latent frames, L x B, B = {B})")
    ax.set_ylabel("steady-state latency (ms / frame)")
    ax.set_title("Latency vs. window length (Fig. 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig4_latency.png", dpi=120)
    plt.close(fig)
    shown = [roles[r] for r in ("identity", "colour", "stability") if r in roles]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(4.4 * max(1, len(shown)), 3.6), squeeze=False)
    for ax, (key, label, _) in zip(axes[0], shown):
        for N in Ns:
            pts = [(L, cells[(L, N)].get(f"{key}_last", math.nan)) for L in Ls if (L, N) in cells]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"N = {N}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(Ls))
        ax.set_xticklabels([str(L) for L in Ls])
        ax.set_xlabel("window length L (blocks)")
        ax.set_title(f"{label}, last {TAIL_SECONDS:g} s")
    axes[0][0].legend()
    fig.suptitle("Window length L vs. denoising passes N (Fig. 5; B_{4,1}-trained student at inference)")
    fig.tight_layout()
    fig.savefig(out / "fig5_stability.png", dpi=120)
    plt.close(fig)
    return [str(out / "fig4_latency.png"), str(out / "fig5_stability.png")]


def write_tables_md(out: Path, summary: dict, scorer: Scorer, intro: str, grid) -> Path:
    lines = ["# AvatarForcing ablations", "", intro, "", scorer.legend, ""]
    if summary.get("real"):
        lines += ["**Ground truth (the real clips, for scale)**", "",
                  markdown_table([summary["real"]], scorer.columns), ""]
    for t, entry in summary["tables"].items():
        lines += [f"## {TITLES[t]}", ""]
        if t == 3:
            Ls, Ns = grid
            roles = scorer.roles
            label = lambda r: roles[r][1] if r in roles else "-"      # noqa: E731
            lines += ["The grid reuses the B_{4,1}-trained final student (the paper trains each cell), so it measures "
                      "inference-time allocation of compute between look-ahead L and passes N only; every cell uses "
                      "L·N evenly spaced (shift-warped) levels, schedule.steps=null.", "",
                      f"Entries: {label('identity')} / {label('stability')} / latency (ms/frame) ↓, **Total**:", "",
                      grid_markdown(entry["rows"], Ls, Ns, "total", roles), "", f"Same, **Last** {TAIL_SECONDS:g} s:",
                      "", grid_markdown(entry["rows"], Ls, Ns, "last", roles), ""]
            lines += [f"![{Path(f).stem}]({Path(f).name})" for f in summary["figures"]] + ["", "All metrics:", ""]
        lines += [f"- {name}: {note}" for name, note in entry.get("notes", {}).items()]
        if t == 6:
            lines += ["- The baselines run at L = 1 (schedule.window_blocks=1, steps=[1000]): one denoising step per "
                      "block from pure noise, no look-ahead."]
        lines += ["", entry["markdown"], "", f"Side-by-side sample (first item): `samples/table{t}_side_by_side.mp4`.",
                  ""]
    lines += ["## Paper claims", "",
              "Each claim is judged on one metric chosen beforehand, by a paired bootstrap over the items (same items, "
              "same noise seed for both arms; effect > 0 = as claimed, 95 % CI): holds = CI above 0, does not hold = "
              "below 0, inconclusive = contains 0; claims with several pairs hold only if every pair holds.", ""]
    lines += [f"- **{c['claim']}**: {c['verdict']}. {c['detail']}" for c in summary["claims"]]
    path = out / "tables.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# outputs


def mean_rows(rows: list[dict]) -> dict:
    """Per-item metric rows -> their means over the numeric keys (the first row's keys; NaNs ignored)."""
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if vals and len(vals) == len(rows):
            finite = [v for v in vals if not (isinstance(v, float) and math.isnan(v))]
            out[key] = float(statistics.fmean(finite)) if finite else float("nan")
    return out


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


def total_last(row: dict, key: str, digits: int = 3, scale: float = 1.0) -> str:
    """A ``Total / Last`` cell of ``<key>_total`` and ``<key>_last``."""
    t, l_ = row.get(f"{key}_total"), row.get(f"{key}_last")
    if t is None and l_ is None:
        return "-"
    s = lambda v: None if v is None else v * scale  # noqa: E731
    return f"{fmt(s(t), digits)} / {fmt(s(l_), digits)}"


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, Callable]] = (), title: str | None = None) -> str:
    """Variants as rows; latency then ``columns`` ((header, row -> cell) pairs)."""
    columns = [("Latency (s/frame) ↓", lambda r: fmt(r.get("latency_s_per_frame"), 4))] + list(columns)
    head = ["Variant"] + [c[0] for c in columns]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join([str(r["variant"])] + [fn(r) for _, fn in columns]) + " |")
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


def write_samples(folder, name: str, item: EvalItem, samples: Mapping[str, np.ndarray], fps: int = FPS,
                  per_variant: bool = True) -> list[Path]:
    """One side-by-side mp4 of one item (its real clip first, when it has one of the same size) and, with
    ``per_variant``, an mp4 per variant, with the item's audio muxed."""
    from .media import VideoWriter, write_wav

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "audio.wav"
        write_wav(wav, item.wav, SAMPLE_RATE)
        for vname, frames in (samples.items() if per_variant else ()):
            path = folder / name / f"{slug(vname)}.mp4"
            with VideoWriter(path, fps, audio_path=wav) as w:
                w.write(frames)
            written.append(path)
        order, videos = list(samples), list(samples.values())
        real = item.ground_truth_frames
        if real is not None and real.shape[1:3] == videos[0].shape[1:3] and not any(v is real for v in videos):
            order, videos = ["real"] + order, [real] + videos
        T = max(len(v) for v in videos)
        path = folder / f"{name}_side_by_side.mp4"
        with VideoWriter(path, fps, audio_path=wav) as w:
            if all(len(v) == T for v in videos):       # tile chunk by chunk: flat memory for long rollouts
                for i in range(0, T, 256):
                    w.write(tile_videos([v[i:i + 256] for v in videos]))
            else:
                w.write(tile_videos(videos))
        written.append(path)
    (folder / f"{name}_side_by_side.txt").write_text(
        f"{item.name}, {item.num_frames} frames; tiles left to right:\n"
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


def print_summary(summary: dict, out: Path) -> None:
    """The end of a run on stdout: its time, where the tables are, one line per claim with its verdict."""
    print(f"done in {summary['timings_s']['total']:.0f} s; wrote {out / 'tables.md'} and {out / 'summary.json'}")
    for c in summary["claims"]:
        print(f"  [{c['verdict']}] {c['claim']}")

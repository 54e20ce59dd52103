"""Evaluation of trained models in the synthetic world: held-out clips and the world's metrics as a scorer of the
ablation runner (avatarforcing/ablations.py, which also holds the student / teacher rollouts).

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
    ``generate_clip(clip_seed(10_000, i), seconds, size, version)``.  World v2 cases carry the ground-truth mouth
    opening (``Case.mouth_truth``); lip sync is then measured against it instead of the speech loudness.  A v2
    clip of minutes takes minutes to render: ``cache_dir`` keeps one .npz per case, ``workers`` renders in
    parallel processes.  Training data comes from world seed 0
    (``clip_seed(0, i)``, the codec's pool, the preprocessing of ``write_world(seed=0)``), the codec's held-out
    PSNR from world seed 1_000_003 + s and the metric nets from identity seeds 10_000_000 + ..., so the
    evaluation identities / speech / motion are never seen in training (clip seeds are 32-bit hashes of
    (world seed, index); ``tests/test_world_evaluate.py`` checks disjointness against 20k training indices).

Frame / audio convention
    A case has ``T = round(25 * seconds)`` real frames; frame 0 is the reference (mouth closed).  The pipeline
    generates the whole blocks covering the audio (1 + 16 k frames >= T) and its frame 0 is the decoded
    reference latent, so frame t of a rollout corresponds to real frame t; rollouts are cut to T frames.

Latency (avatarforcing/ablations.py's rollouts)
    Student: the pipeline's profiler interface (``avatarforcing.profiling.StepProfiler``): per emitting streaming
    step, the sampler step (audio encoding, DiT window forward, KV update) plus the VAE decode of the emitted
    block, over the 4B frames it emits.  Start-up (model build, reference encode, anchor prefill), the first
    ``warmup`` emitting steps and the final L-1 drain steps (shrinking windows) are excluded: the Table 2 protocol
    on a finite clip.  Teacher: wall time of reference / audio encoding + the Euler ODE sample + decode over T.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .. import AvatarForcingError
from ..ablations import EvalItem, Scorer, evaluate_variants, resolve_config, total_last
from ..ablations import markdown_table as _markdown_table
from .dataset import check_world_version, clip_seed, generate_clip
from .layout import RunLayout
from .speech import FPS, SAMPLE_RATE


TRAIN_WORLD_SEED = 0              # world seed of every training stage (clip_seed(0, i))
HELD_OUT_WORLD_SEED = 10_000      # world seed of the evaluation clips
CODEC_HELD_OUT_WORLD_SEED = 1_000_003   # world/codec.py's held-out PSNR clips (seed 1_000_003 + s)
CURVE_SECONDS = 10.0              # evaluate_variant's csim_curve: mean CSIM per 10 s (identity over time)

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
    mouth_truth: np.ndarray | None = None   # float32 [T] ground-truth mouth opening (world v2); None: v1

    @property
    def num_frames(self) -> int:
        return len(self.real_frames)

    @property
    def ground_truth_frames(self) -> np.ndarray:
        return self.real_frames

    @property
    def seconds(self) -> float:
        return len(self.wav) / SAMPLE_RATE


def held_out_cases(num: int, seconds: float, size: int = 64, seed: int = HELD_OUT_WORLD_SEED, version: int = 1,
                   cache_dir=None, workers: int = 1) -> list[Case]:
    """``num`` evaluation clips: clip i is ``generate_clip(clip_seed(seed, i), seconds, size, version)``
    (deterministic).  ``cache_dir``: reuse / write one .npz per case (:func:`case_cache_path`); ``workers`` > 1
    renders the clips in that many processes."""
    if num < 1 or seconds <= 0:
        raise AvatarForcingError(f"held_out_cases needs num >= 1 and seconds > 0, got {num} and {seconds}")
    if seed in (TRAIN_WORLD_SEED, CODEC_HELD_OUT_WORLD_SEED):
        raise AvatarForcingError(f"world seed {seed} is used in training; pick another held-out world seed "
                                 f"(default {HELD_OUT_WORLD_SEED})")
    check_world_version(version, "held_out_cases")
    if workers < 1:
        raise AvatarForcingError(f"held_out_cases needs workers >= 1, got {workers}")
    args = [(seed, i, seconds, size, version, cache_dir) for i in range(num)]
    if workers > 1 and num > 1:
        with ProcessPoolExecutor(max_workers=min(workers, num)) as pool:
            return list(pool.map(held_out_case, *zip(*args)))
    return [held_out_case(*a) for a in args]


def case_cache_path(cache_dir, seed: int, index: int, seconds: float, size: int, version: int = 1) -> Path:
    """The .npz of one held-out case in ``cache_dir``: named by (version, world seed, index, seconds, size)."""
    return Path(cache_dir) / f"world_v{version}_seed{seed}_case{index}_{float(seconds)!r}s_{size}px.npz"


def held_out_case(seed: int, index: int, seconds: float, size: int = 64, version: int = 1, cache_dir=None) -> Case:
    """Held-out case ``index`` of world ``seed`` (see :func:`held_out_cases`), read from / written to ``cache_dir``."""
    path = case_cache_path(cache_dir, seed, index, seconds, size, version) if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        clip = generate_clip(clip_seed(seed, index), seconds, size, version)
        if len(clip.frames) < 2:
            raise AvatarForcingError(f"{seconds} s is too short for an evaluation clip; use >= 0.1 s")
        arrays = dict(frames=clip.frames, wav=clip.wav.astype(np.float32), seed=np.int64(clip.seed))
        if version >= 2:
            arrays["mouth_truth"] = clip.motion.mouth[:, 0].astype(np.float32)
        if path is not None:                                 # atomic: a cache file is complete or absent
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
    frames = arrays["frames"]
    return Case(reference=frames[0].copy(), wav=arrays["wav"], real_frames=frames, seed=int(arrays["seed"]),
                index=index, world_seed=seed, mouth_truth=arrays.get("mouth_truth"))


def world_version(cfg) -> int:
    """The world a config's cases come from: ``world.version``, or 1 for configs without a ``world:`` section."""
    return int(cfg.world.version) if "world" in cfg else 1


def training_clip_seeds(num: int, world_seed: int = TRAIN_WORLD_SEED) -> set[int]:
    """Clip seeds of the first ``num`` training clips (for disjointness checks)."""
    return {clip_seed(world_seed, i) for i in range(num)}


# ----------------------------------------------------------------------------------------------
# metrics


def load_metric_nets(path):
    """The metric networks of a run (``RUN/metric_nets.pt``)."""
    from ..metrics import MetricNets
    return MetricNets.load(path)


def real_feature_stats(cases: Sequence[Case], nets):
    """FID reference statistics: identity-net features of all real frames of the cases."""
    from ..metrics import feature_stats
    return feature_stats(np.concatenate([nets.features(c.ground_truth_frames) for c in cases]))


def evaluate_variant(frames: np.ndarray, case: Case, nets, real_feats, tail_seconds: float = 10.0,
                     latency: float | None = None, seam_period: int | None = None,
                     curve_seconds: float | None = CURVE_SECONDS) -> dict:
    """evaluate_video on one rollout (driving audio = the case's) + ``latency_s_per_frame``.  Lip sync is measured
    against the case's ``mouth_truth`` where it has one (world v2), else against the speech loudness.
    ``seam_period`` (video frames per streamed block) adds ``seam_feat``; ``curve_seconds`` adds ``csim_curve`` (CSIM
    per segment of that length: identity over time)."""
    from ..metrics import evaluate_video

    truth = getattr(case, "mouth_truth", None)
    envelope = None if truth is None else partial(_truth_envelope, truth)
    out = evaluate_video(frames, case.wav, case.reference, nets, real_feats, fps=FPS, tail_seconds=tail_seconds,
                         envelope=envelope, seam_period=seam_period, curve_seconds=curve_seconds)
    out["latency_s_per_frame"] = float("nan") if latency is None else float(latency)
    return out


def _truth_envelope(truth: np.ndarray, wav, sample_rate: int, fps: int, num_frames: int) -> np.ndarray:
    """evaluate_video's ``envelope`` hook: the ground-truth mouth opening cut / edge-padded to ``num_frames``."""
    truth = np.asarray(truth, np.float32)[:num_frames]
    return np.pad(truth, (0, num_frames - len(truth)), mode="edge") if len(truth) else np.zeros(num_frames, np.float32)


# ----------------------------------------------------------------------------------------------
# one table of variants


def run_overrides(run_dir) -> list[str]:
    """Overrides for evaluating a run's models: their EMA weights (every stage's export holds 'generator' and
    'generator_ema'; the shipped student is the EMA) and the run's codec (``RUN/codec.pt``) when it exists."""
    codec = RunLayout(run_dir).codec
    return ["inference.use_ema=true"] + (["vae.kind=world", f"vae.path={codec}"] if codec.is_file() else [])


METRIC_KEYS = ("csim", "delta_e", "adj_feat", "adj_pixel", "sync_conf", "sync_offset", "sync_dist", "fid")


@dataclass
class CaseItem(EvalItem):
    """The ablation runner's evaluation item with the case's ground-truth mouth opening (None for world v1)."""
    mouth_truth: np.ndarray | None = None


def case_item(case: Case) -> CaseItem:
    """A held-out case as the ablation runner's evaluation item (per-item CSV columns: case, clip_seed)."""
    return CaseItem(f"case{case.index}", case.reference, case.wav, case.real_frames,
                    info={"case": case.index, "clip_seed": case.seed}, mouth_truth=case.mouth_truth)


def evaluate_run(run_dir, cfg_path, variants: Mapping[str, tuple], cases: Sequence[Case], nets,
                 out_dir=None, name: str = "table", real_feats=None, overrides: Sequence[str] = (),
                 tail_seconds: float = 10.0, teacher_steps: int | None = None, seed: int = 0,
                 videos: bool = True, variant_videos: bool = False, title: str | None = None,
                 log_fn: Callable | None = print) -> list[dict]:
    """Roll out every variant on every case and evaluate -> one row per variant (means over cases).

    run_dir: the run folder (its ``codec.pt``, if there, is used: :func:`run_overrides`) and the default output
    folder; cfg_path: a config path or a loaded config; variants: name -> (kind 'student' | 'teacher' | 'real',
    checkpoint, overrides); ``overrides`` apply to all.  The ablation runner's
    :func:`avatarforcing.ablations.evaluate_variants` with the world's metrics (:class:`WorldScorer`): writes
    ``<name>.csv``, ``<name>_per_case.csv``, ``<name>.md`` and the sample videos to ``out_dir`` (default
    ``run_dir``).  Row keys: variant, kind, checkpoint, overrides, cases, latency_s_per_frame and every
    ``evaluate_video`` key (``csim_total``, ``csim_last``, ``delta_e_*``, ``adj_feat_*``, ``sync_conf_*``, ...)."""
    if not cases:
        raise AvatarForcingError("evaluate_run needs at least one case")
    cfg = resolve_config(cfg_path, list(run_overrides(run_dir)) + list(overrides))
    scorer = WorldScorer(nets, real_feats if real_feats is not None else real_feature_stats(cases, nets),
                         tail_seconds)
    rows, _ = evaluate_variants(cfg, variants, [case_item(c) for c in cases], scorer,
                                out_dir if out_dir is not None else run_dir, name, title, teacher_steps, seed,
                                videos, variant_videos, log_fn)
    return rows


# ----------------------------------------------------------------------------------------------
# the world's scorer for the ablation runner


TABLE_COLUMNS = (
    ("CSIM ↑", lambda r: total_last(r, "csim", 3)),
    ("ΔE2000 ↓", lambda r: total_last(r, "delta_e", 2)),
    ("Adj-feat (1e-2) ↓", lambda r: total_last(r, "adj_feat", 2, 100.0)),
    ("Adj-pixel ↓", lambda r: total_last(r, "adj_pixel", 2)),
    ("Sync-C ↑", lambda r: total_last(r, "sync_conf", 3)),
    ("Sync offset ↓", lambda r: total_last(r, "sync_offset", 1)),
    ("FID ↓", lambda r: total_last(r, "fid", 2)),
)
markdown_table = partial(_markdown_table, columns=TABLE_COLUMNS)

METRIC_LEGEND = (
    "Metrics (avatarforcing/metrics.py, the world's analogues of the paper's): CSIM = cosine similarity of the "
    "identity net's embeddings to the reference; ΔE2000 = colour drift of the centre face crop vs. the reference; "
    "Adj-feat = LPIPS-style feature distance of adjacent frames (flicker, shown x1e-2), Adj-pixel = mean absolute "
    "difference of adjacent frames (0-255); Sync-C = correlation of the sync expert's mouth opening with the speech "
    "envelope (world v2: with the ground-truth mouth opening) at the best offset, Sync offset = |best offset| in "
    "frames; FID = Fréchet distance of identity-net features to the real held-out frames.  Each cell is Total / "
    "Last (whole rollout / final 10 s), mean over cases.  "
    "Latency = steady-state s/frame (Table 2 protocol: sampler step incl. audio encoding, DiT window, KV update, and "
    "VAE decode, excluding start-up, the first emitting step and the drain), on this machine's CPU; the teacher's "
    "is its whole-clip wall time (encode + Euler ODE sample + decode) over the frames.")


class WorldScorer(Scorer):
    """The world's metrics (:func:`evaluate_variant`: metric nets, FID against the real frames' features)."""
    columns = TABLE_COLUMNS
    roles = {"identity": ("csim", "CSIM ↑", 1.0), "stability": ("adj_feat", "Adj-feat (1e-2) ↓", 100.0),
             "colour": ("delta_e", "ΔE2000 ↓", 1.0), "sync": ("sync_conf", "Sync-C ↑", 1.0)}
    legend = METRIC_LEGEND

    def __init__(self, nets, real_feats=None, tail_seconds: float = 10.0):
        self.nets, self.real_feats, self.tail_seconds = nets, real_feats, tail_seconds

    def prepare(self, items) -> None:
        if self.real_feats is None:
            self.real_feats = real_feature_stats(items, self.nets)

    def score(self, frames: np.ndarray, item) -> dict:
        out = evaluate_variant(frames, item, self.nets, self.real_feats, self.tail_seconds)
        out.pop("latency_s_per_frame")
        return out

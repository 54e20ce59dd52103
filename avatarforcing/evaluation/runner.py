"""Evaluate generated talking-head videos with the peers' metrics -> per-video and aggregate results, markdown.

Every metric is computed on face crops (:mod:`.faces`: S3FD track crops with a weights folder, centre crops
without), ArcFace on its own aligned 112 x 112 faces (:mod:`.arcface`), each as ``<metric>_total`` (whole video)
and ``<metric>_last`` (the last ``tail_seconds``, 10 s: the paper's Total / Last split).

=========  =====================================================  =====================  ==========================
metric     what                                                   needs                  weights
=========  =====================================================  =====================  ==========================
sync       Sync-C / Sync-D / AV offset (SyncNet, ±15 frames)      audio (track/--audio)  syncnet_v2.model
csim       ArcFace cosine similarity to the reference image        --reference            buffalo_l/*.onnx
fid        Fréchet distance of Inception pool3 features            --ground-truth         pt_inception-...pth
fvd        Fréchet distance of I3D features of 16-frame clips      --ground-truth         i3d_torchscript.pt
adj_lpips  LPIPS (alex) between adjacent frames                    -                      alexnet + lpips_alex
delta_e    CIEDE2000 colour drift from the reference crop          --reference            none
psnr/ssim  against the ground-truth video of the same name         --ground-truth         none
flicker    mean |pixel difference| of adjacent frames              -                      none
=========  =====================================================  =====================  ==========================

FID and FVD compare a video (per-video rows) or all videos (the aggregate row) with the pooled ground-truth set;
every other aggregate is the mean over videos.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import AvatarForcingError
from ..media import _to_pil, _to_rgb, load_audio, probe_video, read_video   # image readers shared with inference
from ..metrics import feature_stats, identity_similarity
from . import syncnet, video_metrics
from .arcface import IdentityEmbedder
from .faces import S3FD, FaceCropper
from .fid import frechet_distance
from .i3d import CLIP_FRAMES, I3DFeatures
from .inception import InceptionFeatures
from .lpips import AdjacentLPIPS
from .weights import METRIC_WEIGHTS, WeightsFolder

METRICS = ("sync", "csim", "fid", "fvd", "adj_lpips", "delta_e", "psnr", "ssim", "flicker")
WEIGHT_FREE = ("delta_e", "psnr", "ssim", "flicker")
NEEDS_REFERENCE = ("csim", "delta_e")
NEEDS_GROUND_TRUTH = ("fid", "fvd", "psnr", "ssim")
CROPS = ("auto", "s3fd", "centre")
# result key (before _total / _last) -> table header, in table order
COLUMNS = {"sync_c": "Sync-C ↑", "sync_d": "Sync-D ↓", "csim": "CSIM ↑", "fid": "FID ↓", "fvd": "FVD ↓",
           "adj_lpips": "Adj-LPIPS ↓", "delta_e": "ΔE2000 ↓", "psnr": "PSNR ↑", "ssim": "SSIM ↑",
           "flicker": "Flicker ↓"}
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_EXTS = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac") + VIDEO_EXTS


# ----------------------------------------------------------------------------------------------
# inputs


def list_inputs(spec: os.PathLike | str, what: str, exts: tuple[str, ...]) -> list[Path]:
    """A folder (its files with ``exts``, sorted), a .txt list (one path a line, relative to the list) or a file."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in exts)
        if not files:
            raise AvatarForcingError(f"{what} folder {p} holds no {'/'.join(exts)} files; pass a folder with some")
        return files
    if p.is_file() and p.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise AvatarForcingError(f"{what} list {p} is empty; put one path a line in it")
        return [q if q.is_absolute() else p.parent / q for q in map(Path, lines)]
    if p.is_file():
        return [p]
    raise AvatarForcingError(f"{what} {p} not found; pass a folder, a .txt list (one path a line) or a file")


def match(generated: list[Path], others: list[Path], what: str, ordered: bool) -> list[Path]:
    """For each generated video, the file of ``others`` with the same stem (or, from a .txt list of the same
    length, the one on the same line)."""
    by_stem = {p.stem: p for p in others}
    if all(g.stem in by_stem for g in generated):
        return [by_stem[g.stem] for g in generated]
    if ordered and len(others) == len(generated):
        return list(others)
    if len(others) == 1 and not ordered:
        return others * len(generated)
    missing = next(g for g in generated if g.stem not in by_stem)
    raise AvatarForcingError(f"no {what} named {missing.stem}.* for generated video {missing}; name each {what} after "
                             "its video, or pass a .txt list in the same order as the videos")


def read_image(path: Path) -> np.ndarray:
    """A reference image (or a video's first frame) -> uint8 RGB [H, W, 3]."""
    if path.suffix.lower() in VIDEO_EXTS:
        frames, _ = read_video(path)
        if not len(frames):
            raise AvatarForcingError(f"reference video {path} has no frames; pass an image or a non-empty video")
        return frames[0]
    return np.array(_to_rgb(_to_pil(path)), dtype=np.uint8)


@dataclass
class Item:
    name: str
    video: Path
    reference: Path | None = None
    audio: Path | None = None
    ground_truth: Path | None = None


def _is_list(spec) -> bool:
    return spec is not None and Path(spec).suffix.lower() == ".txt"


def collect(generated, reference=None, ground_truth=None, audio=None, metrics=METRICS) -> tuple[list[Item], list[Path]]:
    """Resolve the inputs -> (items, ground-truth videos); every file is checked (corrupt videos, missing audio
    tracks) before anything heavy runs."""
    videos = list_inputs(generated, "generated", VIDEO_EXTS)
    items = [Item(v.stem, v) for v in videos]
    names = [v.stem for v in videos]
    if len(set(names)) != len(names):
        raise AvatarForcingError(f"two generated videos are named {next(n for n in names if names.count(n) > 1)}; "
                                 "give every video its own file name")
    if reference is not None and any(m in metrics for m in NEEDS_REFERENCE):
        for item, ref in zip(items, match(videos, list_inputs(reference, "reference", IMAGE_EXTS + VIDEO_EXTS),
                                          "reference", _is_list(reference))):
            item.reference = ref
    if audio is not None and "sync" in metrics:
        for item, a in zip(items, match(videos, list_inputs(audio, "audio", AUDIO_EXTS), "audio", _is_list(audio))):
            item.audio = a
    gt_videos = []
    if ground_truth is not None and any(m in metrics for m in NEEDS_GROUND_TRUTH):
        gt_videos = list_inputs(ground_truth, "ground-truth", VIDEO_EXTS)
        if any(m in metrics for m in ("psnr", "ssim")):
            for item, gt in zip(items, match(videos, gt_videos, "ground-truth video", _is_list(ground_truth))):
                item.ground_truth = gt
    for path in list(videos) + gt_videos:
        info = probe_video(path)                     # one-line error for a missing or corrupt file
        if info["frames"] < 2:
            raise AvatarForcingError(f"video {path} has {info['frames']} frames; metrics need at least 2")
        if "sync" in metrics and path in videos and not info["has_audio"] and items[videos.index(path)].audio is None:
            raise AvatarForcingError(f"video {path} has no audio track for lip sync; pass --audio DIR_OR_LIST (the "
                                     "driving speech) or drop sync from --metrics")
    for item in items:
        for path in (item.reference, item.audio):
            if path is not None and not path.is_file():
                raise AvatarForcingError(f"{path} not found (for {item.video}); pass existing files")
    return items, gt_videos


def check_metrics(metrics, weights, reference, ground_truth) -> tuple[str, ...]:
    """Validate the metric names and their inputs; ``None`` -> every metric whose inputs are given."""
    if metrics is None:
        metrics = [m for m in METRICS if (weights is not None or m in WEIGHT_FREE)
                   and (reference is not None or m not in NEEDS_REFERENCE)
                   and (ground_truth is not None or m not in NEEDS_GROUND_TRUTH)]
    metrics = tuple(dict.fromkeys(m.strip() for m in metrics if m.strip()))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise AvatarForcingError(f"unknown metric '{unknown[0] if unknown else ''}'; choose from {','.join(METRICS)}")
    for m in metrics:
        if weights is None and m not in WEIGHT_FREE:
            raise AvatarForcingError(f"metric {m} needs model weights; pass --weights DIR (see docs/evaluation.md) "
                                     f"or keep to the weight-free metrics {','.join(WEIGHT_FREE)}")
        if reference is None and m in NEEDS_REFERENCE:
            raise AvatarForcingError(f"metric {m} needs the reference images; pass --reference DIR_OR_LIST")
        if ground_truth is None and m in NEEDS_GROUND_TRUTH:
            raise AvatarForcingError(f"metric {m} needs real videos; pass --ground-truth DIR")
    return metrics


# ----------------------------------------------------------------------------------------------
# the evaluator


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise AvatarForcingError(f"device {device} requested but no CUDA GPU is available; use --device cpu")
    return str(device)


def _split(values: np.ndarray, tail: int) -> tuple[float, float]:
    """(mean over all, mean over the last ``tail``), NaNs ignored; NaN when nothing is left."""
    values = np.asarray(values, np.float64)
    mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan     # noqa: E731
    return mean(values), mean(values[-tail:] if tail else values[:0])


def _frechet(features: np.ndarray, stats) -> float:
    return frechet_distance(features, stats) if stats is not None and len(features) >= 2 else math.nan


@dataclass
class Evaluator:
    """Loads the models of ``metrics`` (from ``weights``), then evaluates videos with :meth:`run`."""

    metrics: tuple[str, ...]
    weights: WeightsFolder | None = None
    device: str = "cpu"
    crop: str = "auto"
    tail_seconds: float = 10.0
    vshift: int = syncnet.VSHIFT
    seconds: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.crop not in CROPS:
            raise AvatarForcingError(f"crop is '{self.crop}'; use one of {', '.join(CROPS)}")
        if self.crop == "s3fd" and self.weights is None:
            raise AvatarForcingError("crop=s3fd needs the S3FD weights; pass --weights DIR or use --crop centre")
        self.crop = ("s3fd" if self.weights is not None else "centre") if self.crop == "auto" else self.crop
        if self.weights is not None:
            self.weights.check([k for m in self.metrics for k in METRIC_WEIGHTS.get(m, ())]
                               + (["s3fd"] if self.crop == "s3fd" else []))
        self.device = resolve_device(self.device)
        loaders = {"sync": syncnet.SyncScorer.load, "csim": IdentityEmbedder.load, "fid": InceptionFeatures.load,
                   "fvd": I3DFeatures.load, "adj_lpips": AdjacentLPIPS.load}
        self.models = {m: loaders[m](self.weights, self.device) for m in self.metrics if m in loaders}
        self.cropper = FaceCropper(S3FD.load(self.weights, self.device) if self.crop == "s3fd" else None)

    @contextlib.contextmanager
    def _timed(self, stage: str):
        t = time.perf_counter()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t

    def _crops(self, path: Path):
        with self._timed("read"):
            frames, fps = read_video(path)
        with self._timed("crops"):
            crops = self.cropper(frames)
        return frames, fps, crops

    def _set_features(self, crops: np.ndarray) -> dict:
        out = {}
        with self._timed("fid"):
            if "fid" in self.models:
                out["fid"] = self.models["fid"](crops)
        with self._timed("fvd"):
            if "fvd" in self.models:
                out["fvd"] = self.models["fvd"](crops)
        return out

    def ground_truth_stats(self, videos: list[Path], bar=None, keep=()) -> tuple[dict, dict]:
        """Pooled FID / FVD statistics of the real videos -> (stats, crops of the videos in ``keep``)."""
        pooled, kept = {"fid": [], "fvd": []}, {}
        for path in videos:
            if bar is not None:
                bar.set_description(f"ground truth {path.stem}")
            _, _, faces = self._crops(path)
            for k, v in self._set_features(faces.crops).items():
                pooled[k].append(v)
            if path in keep:
                kept[path] = faces.crops
            if bar is not None:
                bar.update()
        stats = {k: feature_stats(np.concatenate(v)) for k, v in pooled.items()
                 if v and sum(map(len, v)) >= 2}
        return stats, kept

    def video(self, item: Item, gt_stats: dict, gt_crops: dict, bar=None) -> tuple[dict, dict]:
        """One video -> (row of results, its set features {metric: (total feats, last feats)})."""
        stage = (lambda s: bar.set_postfix_str(s)) if bar is not None else (lambda s: None)   # noqa: E731
        frames, fps, faces = self._crops(item.video)
        crops, T = faces.crops, len(frames)
        tail = min(T, max(2, round(self.tail_seconds * fps)))
        row = dict(frames=T, fps=fps, tail_frames=tail, crop=self.crop, face_detected=faces.face_detected)

        def both(name, values, pairs=False):
            row[f"{name}_total"], row[f"{name}_last"] = _split(values, tail - 1 if pairs else tail)

        if "sync" in self.models:
            stage("sync")
            with self._timed("sync"):
                row.update(self._sync(item, crops, fps))
        if "csim" in self.models:
            stage("csim")
            with self._timed("csim"):
                embed = self.models["csim"]
                ref = embed(read_image(item.reference)[None])[0]
                sims = identity_similarity(ref, embed(frames)) if np.isfinite(ref).all() else np.full(T, math.nan)
                both("csim", sims)
                row["csim_face_frames"] = float(np.isfinite(sims).mean())
        if "adj_lpips" in self.models:
            stage("adj_lpips")
            with self._timed("adj_lpips"):
                both("adj_lpips", self.models["adj_lpips"](crops), pairs=True)
        stage("fid/fvd")
        feats = self._set_features(crops)
        sets = {}
        if "fid" in feats:
            sets["fid"] = (feats["fid"], feats["fid"][-tail:])
        if "fvd" in feats:
            first = math.ceil((T - tail) / CLIP_FRAMES)                     # the clips inside the tail
            sets["fvd"] = (feats["fvd"], feats["fvd"][first:])
        for name, (total, last) in sets.items():
            row[f"{name}_total"], row[f"{name}_last"] = _frechet(total, gt_stats.get(name)), _frechet(last, gt_stats.get(name))
        stage("weight-free")
        with self._timed("weight_free"):
            if "delta_e" in self.metrics:
                ref_crop = self.cropper(read_image(item.reference)[None]).crops[0]
                both("delta_e", video_metrics.colour_drift(crops, ref_crop))
            if "flicker" in self.metrics:
                both("flicker", video_metrics.flicker(crops), pairs=True)
            if item.ground_truth is not None:
                gt = gt_crops[item.ground_truth]
                n = min(len(gt), T)
                row["gt_frames"] = n
                for name in ("psnr", "ssim"):
                    if name in self.metrics:
                        row[f"{name}_total"], row[f"{name}_last"] = _split(
                            getattr(video_metrics, name)(crops[:n], gt[:n]), min(tail, n))
        return row, sets

    def _sync(self, item: Item, crops: np.ndarray, fps: float) -> dict:
        """SyncNet at 25 fps (other rates: nearest frames) on the whole video and on its last tail_seconds."""
        if abs(fps - syncnet.FPS) > 1e-3:
            crops = crops[np.floor(np.arange(int(len(crops) * syncnet.FPS / fps)) * fps / syncnet.FPS).astype(int)]
        wav = load_audio(item.audio or item.video, syncnet.SAMPLE_RATE)
        lip, aud = self.models["sync"].embeddings(crops, wav)
        tail = max(1, min(len(lip), round(self.tail_seconds * syncnet.FPS) - syncnet.WINDOW))
        out = {}
        for part, sl in (("total", slice(None)), ("last", slice(len(lip) - tail, None))):
            s = syncnet.offset_search(lip[sl], aud[sl], self.vshift)
            out.update({f"sync_c_{part}": s["conf"], f"sync_d_{part}": s["dist"], f"sync_offset_{part}": s["offset"]})
        return out

    def run(self, items: list[Item], gt_videos: list[Path], progress: bool = True) -> dict:
        """-> dict(videos={name: row}, aggregate={key: value}, seconds={stage: s}, config=...)."""
        self.seconds.clear()
        t0 = time.perf_counter()
        needs_gt_sets = any(m in self.models for m in ("fid", "fvd"))
        keep = {i.ground_truth for i in items if i.ground_truth is not None}
        bar = tqdm(total=len(items) + (len(gt_videos) if needs_gt_sets else len(keep)), unit="video",
                   disable=not progress, dynamic_ncols=True)
        with bar:
            gt_stats, gt_crops = self.ground_truth_stats(gt_videos if needs_gt_sets else sorted(keep), bar, keep)
            rows, sets = {}, {"fid": ([], []), "fvd": ([], [])}
            for item in items:
                bar.set_description(item.name)
                rows[item.name], video_sets = self.video(item, gt_stats, gt_crops, bar)
                for name, (total, last) in video_sets.items():
                    sets[name][0].append(total)
                    sets[name][1].append(last)
                bar.update()
        aggregate = {}
        for key in sorted({k for r in rows.values() for k, v in r.items() if isinstance(v, (int, float))
                           and not isinstance(v, bool) and k not in ("fid_total", "fid_last", "fvd_total", "fvd_last")}):
            values = np.array([r[key] for r in rows.values() if r.get(key) is not None], np.float64)
            aggregate[key] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
        for name, (total, last) in sets.items():
            if total:
                aggregate[f"{name}_total"] = _frechet(np.concatenate(total), gt_stats.get(name))
                aggregate[f"{name}_last"] = _frechet(np.concatenate(last), gt_stats.get(name))
        self.seconds["total"] = time.perf_counter() - t0
        config = dict(metrics=list(self.metrics), crop=self.crop, device=self.device, tail_seconds=self.tail_seconds,
                      vshift=self.vshift, weights=str(self.weights.folder) if self.weights else None,
                      ground_truth_videos=len(gt_videos))
        return dict(config=config, videos=rows, aggregate=aggregate, seconds=dict(self.seconds))


def evaluate_videos(generated, reference=None, ground_truth=None, audio=None, metrics=None, weights=None,
                    device: str = "auto", crop: str = "auto", tail_seconds: float = 10.0,
                    progress: bool = True) -> dict:
    """Check every input, load the models, evaluate -> results (see :meth:`Evaluator.run`)."""
    metrics = check_metrics(metrics, weights, reference, ground_truth)
    items, gt_videos = collect(generated, reference, ground_truth, audio, metrics)
    folder = WeightsFolder(weights) if weights is not None else None
    evaluator = Evaluator(metrics, folder, device, crop, tail_seconds)
    return evaluator.run(items, gt_videos, progress)


# ----------------------------------------------------------------------------------------------
# output


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def markdown_table(results: dict) -> str:
    """Rows: videos and the aggregate; columns: the metrics present, each ``total / last``."""
    rows = dict(results["videos"])
    columns = [k for k in COLUMNS if any(f"{k}_total" in r for r in rows.values())
               or f"{k}_total" in results["aggregate"]]
    lines = ["| video | frames | " + " | ".join(COLUMNS[k] for k in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    table = list(rows.items()) + [(f"**all ({len(rows)})**", dict(results["aggregate"],
                                                                 frames=sum(r["frames"] for r in rows.values())))]
    for name, r in table:
        cells = [f"{_fmt(r.get(f'{k}_total'))} / {_fmt(r.get(f'{k}_last'))}" for k in columns]
        lines.append(f"| {name} | {int(r['frames'])} | " + " | ".join(cells) + " |")
    tail = results["config"]["tail_seconds"]
    return "\n".join(lines) + f"\n\nEach cell: Total / Last (last {tail:g} s). Crops: {results['config']['crop']}.\n"


def jsonable(value):
    """Results -> JSON-safe (NaN / inf -> None, numpy scalars -> Python)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value

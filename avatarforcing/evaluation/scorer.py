"""The peers' metrics (:class:`.runner.Evaluator`) as a scorer of the ablation runner (avatarforcing/ablations.py).

Each rollout is written to a temporary H.264 mp4 with its item's audio muxed (what a generated video is when it is
evaluated) and scored like ``scripts/evaluate.py`` scores a video: sync, csim, adj_lpips, delta_e, flicker per
video, psnr / ssim against the item's ground-truth video, FID / FVD of each variant's pooled videos against the
pooled ground-truth videos of the eval list.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ..ablations import EvalItem, Scorer, total_last
from ..media import VideoWriter, write_wav
from .runner import COLUMNS, NEEDS_GROUND_TRUTH, Evaluator, Item, _frechet, check_metrics
from .weights import WeightsFolder

ROLE_CHOICES = {"identity": (("csim", "CSIM ↑"),), "stability": (("adj_lpips", "Adj-LPIPS ↓"), ("flicker", "Flicker ↓")),
                "colour": (("delta_e", "ΔE2000 ↓"),), "sync": (("sync_c", "Sync-C ↑"),)}


class VideoScorer(Scorer):
    """``metrics`` (default: every one whose inputs are there) with the models of the ``weights`` folder
    (None: the weight-free metrics on centre crops); ``ground_truth``: whether the items have real videos."""

    def __init__(self, metrics=None, weights=None, device: str = "auto", crop: str = "auto",
                 tail_seconds: float = 10.0, ground_truth: bool = False):
        metrics = check_metrics(metrics, weights, "the eval list's images", "the eval list" if ground_truth else None)
        self.evaluator = Evaluator(metrics, WeightsFolder(weights) if weights is not None else None, device, crop,
                                   tail_seconds)
        keys = [k for m in metrics for k in (("sync_c", "sync_d") if m == "sync" else (m,))]
        self.columns = [(COLUMNS[k], lambda r, k=k: total_last(r, k, 3)) for k in COLUMNS if k in keys]
        self.roles = {}
        for role, choices in ROLE_CHOICES.items():           # the first metric of each role that is computed
            found = [(k, label, 1.0) for k, label in choices if k in keys]
            if found:
                self.roles[role] = found[0]
        self.legend = (f"Metrics (avatarforcing/evaluation/, docs/evaluation.md): {', '.join(metrics)} on "
                       f"{self.evaluator.crop} face crops, each Total / Last (last {tail_seconds:g} s), mean over the "
                       "items; FID / FVD pool each variant's videos against the eval list's ground-truth videos.  "
                       "Latency = steady-state s/frame of the stream (the teacher's: whole-clip wall time / frames).")
        self.gt_stats, self.gt_crops, self._sets = {}, {}, {}

    def prepare(self, items) -> None:
        videos = [Path(i.ground_truth) for i in items if isinstance(i.ground_truth, (str, Path))]
        if not any(m in self.evaluator.metrics for m in NEEDS_GROUND_TRUTH):
            videos = []
        self.gt_stats, self.gt_crops = self.evaluator.ground_truth_stats(videos, keep=set(videos))

    def score(self, frames: np.ndarray, item: EvalItem) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_wav(tmp / "audio.wav", item.wav)
            with VideoWriter(tmp / f"{item.name}.mp4", 25, audio_path=tmp / "audio.wav") as w:
                w.write(frames)
            reference = item.reference
            if isinstance(reference, np.ndarray):
                from PIL import Image
                Image.fromarray(reference).save(tmp / "reference.png")
                reference = tmp / "reference.png"
            gt = Path(item.ground_truth) if isinstance(item.ground_truth, (str, Path)) else None
            row, sets = self.evaluator.video(Item(item.name, tmp / f"{item.name}.mp4", Path(reference),
                                                  tmp / "audio.wav", gt if gt in self.gt_crops else None),
                                             self.gt_stats, self.gt_crops)
        for name, feats in sets.items():
            self._sets.setdefault(name, []).append(feats)
        return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def variant_metrics(self) -> dict:
        out = {}
        for name, feats in self._sets.items():
            for i, part in enumerate(("total", "last")):
                out[f"{name}_{part}"] = _frechet(np.concatenate([f[i] for f in feats]), self.gt_stats.get(name))
        self._sets = {}
        return out

"""How long evaluation takes: every metric on a synthetic clip, random weights in the real architectures.

:func:`bench_evaluation` is what ``scripts/bench_evaluate.py`` runs on CPU; ``scripts/gpu_check.py`` can call it
with ``device="cuda"`` (the ONNX models then run on ONNX Runtime's CUDA provider when onnxruntime-gpu is installed,
on the CPU otherwise).  The clip is ``seconds`` long and the time is scaled linearly to one minute: every stage
is per frame (or per 16-frame clip), except the Fréchet distances, which are measured as they are.  With random
weights S3FD finds no face, so the crops are centre crops (the S3FD forward is timed all the same; cutting a
track's crops costs about a millisecond a frame).
"""
from __future__ import annotations

import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..media import VideoWriter, write_wav
from .random_weights import SCRFDStandIn, write_random_weights
from .runner import METRICS, Evaluator, Item
from .weights import WeightsFolder


def synthetic_clip(path: Path, frames: int, height: int, width: int, audio: Path | None = None,
                   seed: int = 0) -> np.ndarray:
    """A moving ellipse 'face' on a textured background -> H.264 mp4 (audio muxed in); returns the first frame."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    background = rng.integers(40, 90, (height, width, 3), dtype=np.uint8)
    first = None
    with VideoWriter(path, 25, audio) as writer:
        for t in range(frames):
            f = background.copy()
            inside = ((yy - height * (0.45 + 0.01 * math.sin(t / 7))) / (0.22 * height)) ** 2 + \
                     ((xx - width / 2) / (0.2 * width)) ** 2 < 1
            f[inside] = (205, 160, 130)
            first = f if first is None else first
            writer.write(f)
    return first


def scrfd_standin_gflops(size: int = 640) -> float:
    """FLOPs (2 x multiply-adds) of the full SCRFD stand-in at size x size, in G."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        SCRFDStandIn(28)(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def bench_evaluation(seconds: float = 2.0, height: int = 480, width: int = 832, device: str = "cpu",
                     metrics=METRICS, workdir: str | None = None, log=print) -> dict:
    """Evaluate one synthetic ``seconds``-long clip at ``height x width`` (with a ground-truth clip and a reference
    image) with every metric -> timings, stage by stage, measured and scaled to one minute of video."""
    log = log or (lambda *_: None)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        weights = WeightsFolder(write_random_weights(tmp / "weights", small=False))
        frames = round(seconds * 25)
        speech = tmp / "speech.wav"
        write_wav(speech, (0.1 * np.random.default_rng(0).standard_normal(frames * 640)).astype(np.float32))
        first = synthetic_clip(tmp / "gen.mp4", frames, height, width, speech)
        synthetic_clip(tmp / "gt.mp4", frames, height, width, seed=1)
        Image.fromarray(first).save(tmp / "ref.png")
        evaluator = Evaluator(tuple(metrics), weights, device, crop="s3fd")
        setup = time.perf_counter() - t0
        log(f"bench: random weights, clips and models ready in {setup:.1f}s; ground-truth pass...")
        gt_stats, gt_crops = evaluator.ground_truth_stats([tmp / "gt.mp4"], keep={tmp / "gt.mp4"})
        gt_seconds = dict(evaluator.seconds)
        evaluator.seconds.clear()
        log(f"bench: evaluating a {seconds:g}s {height}x{width} clip on {evaluator.device}...")
        t = time.perf_counter()
        row, _ = evaluator.video(Item("gen", tmp / "gen.mp4", tmp / "ref.png", None, tmp / "gt.mp4"), gt_stats, gt_crops)
        total = time.perf_counter() - t
    scale = 60.0 / seconds
    stages = {k: round(v, 3) for k, v in evaluator.seconds.items()}
    return dict(
        clip_seconds=seconds, frames=frames, height=height, width=width, device=evaluator.device,
        torch_threads=torch.get_num_threads(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
        metrics=list(metrics), setup_seconds=round(setup, 1),
        seconds_total=round(total, 2), seconds_per_stage=stages,
        seconds_per_minute=round(total * scale, 1), seconds_per_minute_per_stage={k: round(v * scale, 1) for k, v in
                                                                                 stages.items()},
        ground_truth_pass_seconds={k: round(v, 3) for k, v in gt_seconds.items()},
        scrfd_standin_gflops=round(scrfd_standin_gflops(), 1), finite_metrics=sorted(
            k for k, v in row.items() if isinstance(v, float) and math.isfinite(v)),
        note=("random weights in the real architectures (SyncNet, S3FD, Inception, AlexNet+LPIPS, iResNet-50 ONNX, "
              "Inception-I3D TorchScript); SCRFD is a stand-in CNN of about the same FLOPs; time scaled linearly "
              f"from a {seconds:g}s clip to 60s"))

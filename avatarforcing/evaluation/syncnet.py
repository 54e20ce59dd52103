"""SyncNet lip-sync scores (Sync-C, Sync-D), as joonson/syncnet_python computes them.

* Network: ``SyncNetModel.S`` (weights ``syncnet_v2.model``): a 3-D conv tower over 5 consecutive 224 x 224
  face crops (BGR, raw 0..255 values) and a 2-D conv tower over the 13 x 20 MFCC window of the same 0.2 s,
  each followed by a 512 -> 512 -> 1024 MLP.
* Audio: 16 kHz samples at int16 scale, MFCC of python_speech_features' defaults (25 ms frames every 10 ms,
  pre-emphasis 0.97, rectangular window, 512-point FFT, 26 mel filters, 13 cepstra, lifter 22, c0 replaced by the
  log frame energy): 4 MFCC frames per video frame at 25 fps.
* Offset search (``SyncNetInstance.evaluate``, ``calc_pdist`` with ``vshift`` = 15): for every video frame the
  distance of its lip embedding to the audio embeddings at shifts -15..15 (zero-padded at the ends), averaged
  over frames; Sync-D is the minimum of that curve, Sync-C (confidence) its median minus its minimum, and the
  AV offset ``vshift - argmin`` (> 0: the audio leads the video).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import dct
from torch import nn

from .. import AvatarForcingError
from .images import BatchedNet, batches, to_nchw
from .weights import WeightsFolder

FPS = 25
SAMPLE_RATE = 16000
WINDOW = 5                       # video frames per lip window
MFCC_PER_FRAME = 4               # 100 Hz MFCC / 25 fps
MFCC_WINDOW = 20
VSHIFT = 15


def _conv_bn(conv, bn, relu=True, pool=None):
    layers = [conv, bn] + ([nn.ReLU(inplace=True)] if relu else [])
    return layers + ([pool] if pool is not None else [])


class SyncNet(nn.Module):
    """syncnet_python's ``S`` (module names and indices kept, so ``syncnet_v2.model`` loads as is)."""

    def __init__(self, embed_dim: int = 1024):
        super().__init__()
        c2, c3 = nn.Conv2d, nn.Conv3d
        self.netcnnaud = nn.Sequential(
            *_conv_bn(c2(1, 64, 3, 1, 1), nn.BatchNorm2d(64), pool=nn.MaxPool2d(1, 1)),
            *_conv_bn(c2(64, 192, 3, 1, 1), nn.BatchNorm2d(192), pool=nn.MaxPool2d(3, (1, 2))),
            *_conv_bn(c2(192, 384, 3, padding=1), nn.BatchNorm2d(384)),
            *_conv_bn(c2(384, 256, 3, padding=1), nn.BatchNorm2d(256)),
            *_conv_bn(c2(256, 256, 3, padding=1), nn.BatchNorm2d(256), pool=nn.MaxPool2d(3, 2)),
            *_conv_bn(c2(256, 512, (5, 4)), nn.BatchNorm2d(512)))
        self.netcnnlip = nn.Sequential(
            *_conv_bn(c3(3, 96, (5, 7, 7), (1, 2, 2)), nn.BatchNorm3d(96), pool=nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *_conv_bn(c3(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.BatchNorm3d(256),
                      pool=nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256)),
            *_conv_bn(c3(256, 256, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(256),
                      pool=nn.MaxPool3d((1, 3, 3), (1, 2, 2))),
            *_conv_bn(c3(256, 512, (1, 6, 6)), nn.BatchNorm3d(512)))
        self.netfcaud, self.netfclip = (nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                                      nn.Linear(512, embed_dim)) for _ in range(2))

    def forward_aud(self, x):           # [N, 1, 13, 20] -> [N, D]
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x):           # [N, 3, 5, 224, 224] (BGR, 0..255) -> [N, D]
        return self.netfclip(self.netcnnlip(x).flatten(1))


# ----------------------------------------------------------------------------------------------
# audio front end


def _mel_filterbank(nfilt: int, nfft: int, sample_rate: int) -> np.ndarray:
    hz2mel = lambda hz: 2595 * np.log10(1 + hz / 700.0)          # noqa: E731
    mel2hz = lambda mel: 700 * (10 ** (mel / 2595.0) - 1)         # noqa: E731
    bins = np.floor((nfft + 1) * mel2hz(np.linspace(hz2mel(0), hz2mel(sample_rate / 2), nfilt + 2)) / sample_rate)
    fbank = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = int(bins[j]), int(bins[j + 1]), int(bins[j + 2])
        fbank[j, lo:mid] = (np.arange(lo, mid) - bins[j]) / (bins[j + 1] - bins[j])
        fbank[j, mid:hi] = (bins[j + 2] - np.arange(mid, hi)) / (bins[j + 2] - bins[j + 1])
    return fbank


def mfcc(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, numcep: int = 13, nfilt: int = 26, nfft: int = 512,
         preemph: float = 0.97, ceplifter: int = 22) -> np.ndarray:
    """python_speech_features.mfcc with its defaults -> [frames, numcep] (float64)."""
    x = np.asarray(samples, np.float64)
    x = np.append(x[:1], x[1:] - preemph * x[:-1])
    frame_len, step = int(round(0.025 * sample_rate)), int(round(0.01 * sample_rate))
    n = 1 if len(x) <= frame_len else 1 + int(np.ceil((len(x) - frame_len) / step))
    x = np.concatenate([x, np.zeros((n - 1) * step + frame_len - len(x))])
    frames = x[np.arange(frame_len)[None] + step * np.arange(n)[:, None]]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    eps = np.finfo(float).eps
    energy = power.sum(1)
    feat = power @ _mel_filterbank(nfilt, nfft, sample_rate).T
    feat = dct(np.log(np.where(feat == 0, eps, feat)), type=2, axis=1, norm="ortho")[:, :numcep]
    feat *= 1 + (ceplifter / 2.0) * np.sin(np.pi * np.arange(numcep) / ceplifter)
    feat[:, 0] = np.log(np.where(energy == 0, eps, energy))
    return feat


def int16_scale(wav: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] -> the values of a pcm_s16le wav (what syncnet_python reads with scipy)."""
    return np.clip(np.round(np.asarray(wav, np.float64) * 32768.0), -32768, 32767)


# ----------------------------------------------------------------------------------------------
# offset search


def offset_search(video: torch.Tensor, audio: torch.Tensor, vshift: int = VSHIFT) -> dict:
    """syncnet_python's calc_pdist + evaluate on embeddings [N, D] -> dict(offset, conf, dist, curve [2v+1]).

    ``dist`` is Sync-D (the curve's minimum), ``conf`` Sync-C (median minus minimum)."""
    if len(video) != len(audio) or len(video) == 0:
        raise AvatarForcingError(f"lip-sync needs as many video as audio embeddings (> 0), got {len(video)} and "
                                 f"{len(audio)}; pass a video with at least {WINDOW + 1} frames and its audio")
    win = 2 * vshift + 1
    padded = F.pad(audio, (0, 0, vshift, vshift))
    dists = torch.stack([F.pairwise_distance(video[i:i + 1].expand(win, -1), padded[i:i + win])
                         for i in range(len(video))], 1)                           # [win, N]
    curve = dists.mean(1)
    min_dist, idx = torch.min(curve, 0)
    return dict(offset=int(vshift - idx), conf=float(torch.median(curve) - min_dist), dist=float(min_dist),
                curve=curve.numpy())


class SyncScorer(BatchedNet):
    """Face crops at 25 fps + the driving audio -> SyncNet embeddings -> Sync-C / Sync-D / offset.

    ``net`` is anything with ``forward_lip`` / ``forward_aud`` (the real :class:`SyncNet`, or a test oracle)."""

    batch_size = 20                  # syncnet_python's default

    @classmethod
    def load(cls, weights: WeightsFolder, device="cpu") -> "SyncScorer":
        return cls(weights.load_module("syncnet", SyncNet()), device)

    @torch.no_grad()
    def embeddings(self, crops: np.ndarray, wav: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """crops uint8 [T, 224, 224, 3] (RGB, 25 fps), wav float [N] at 16 kHz, frame 0 at sample 0
        -> (lip, audio) embeddings [n, D], n = min(T, N // 640) - 5, as syncnet_python."""
        cc = torch.from_numpy(mfcc(int16_scale(wav))).float().T[None, None]          # [1, 1, 13, M]
        n = min(len(crops), len(wav) // (SAMPLE_RATE // FPS)) - WINDOW
        if n < 1:
            raise AvatarForcingError(f"lip-sync needs more than {WINDOW} frames of video and audio, got {len(crops)} "
                                     f"frames and {len(wav) / SAMPLE_RATE:.2f}s; evaluate a longer video")
        lips, auds = [], []
        for sl in batches(n, self.batch_size):
            frames = to_nchw(crops[sl.start:sl.stop + WINDOW - 1], self.device).flip(1)            # BGR
            lip = torch.stack([frames[i:i + WINDOW] for i in range(sl.stop - sl.start)]).transpose(1, 2)
            aud = torch.stack([cc[0, :, :, MFCC_PER_FRAME * v:MFCC_PER_FRAME * v + MFCC_WINDOW]
                               for v in range(sl.start, sl.stop)]).to(self.device)
            lips.append(self.net.forward_lip(lip).float().cpu())
            auds.append(self.net.forward_aud(aud).float().cpu())
        return torch.cat(lips), torch.cat(auds)

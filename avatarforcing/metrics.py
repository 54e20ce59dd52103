"""Evaluation metrics of the synthetic world, in the form the paper reports them (Sec. 4, Tabs. 1-6).

Paper metric -> analogue here (direction):
  Sync-C      sync_conf      Pearson r between the sync expert's per-frame mouth opening and the
                             audio's loudness envelope, at the best offset in [-K, K] frames (higher)
  Sync-D      sync_offset    |best offset| in frames (lower); sync_dist = 1 - r at offset 0 (lower)
  CSIM        csim           mean cosine similarity of identity embeddings, reference vs. frames (higher)
  Delta-E2000 delta_e        mean CIEDE2000 between each frame's and the reference's centre crop (lower)
  Adj-LPIPS   adj_feat       mean LPIPS-style feature distance between adjacent frames (lower);
              adj_pixel      mean absolute pixel difference between adjacent frames, in [0, 255] (lower)
              seam_feat      adj_feat across the seams between streamed blocks minus adj_feat across the other
                             latent-frame seams (lower; ~0 for real video): the jump a block makes where it
                             continues the previous one, beyond what the decoder does at every latent frame
  FID         fid            Frechet distance of identity-net features, frames vs. real frames (lower)
Every metric comes as ``<name>_total`` (whole video) and ``<name>_last`` (last ``tail_seconds``).

The networks (a mouth-opening "sync expert" and an identity embedder) are tiny CNNs trained on a metric
backend's labelled frames by :meth:`MetricNets.train` in a few minutes on CPU.  The backend (registered in
:mod:`avatarforcing.backends`; the synthetic world's renderer ground truth, ``world``, is the default) also
gives the audio envelope the lip-sync metric correlates the mouth with; this module names no backend module.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from . import AvatarForcingError
from .audio import FPS, SAMPLE_RATE
from .backends import metric_backend
from .units import LATENT_STRIDE

DEFAULT_BACKEND = "world"        # metric backend of nets trained / saved without one (the synthetic world)
CHECKPOINT_VERSION = 1

# ----------------------------------------------------------------------------------------------
# networks


class _Trunk(nn.Module):
    """Four stride-2 conv stages: [B, 3, S, S] -> maps at S/2 .. S/16 and a flat vector."""

    def __init__(self, widths=(16, 32, 64, 64)):
        super().__init__()
        chans = (3,) + tuple(widths)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.GroupNorm(4, chans[i + 1]),
                          nn.SiLU(), nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), nn.SiLU())
            for i in range(len(widths)))

    def forward(self, x):
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


class SyncExpert(nn.Module):
    """Frame -> mouth opening (regression of the renderer's mouth_open)."""

    def __init__(self, size: int = 64):
        super().__init__()
        self.trunk = _Trunk()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * (size // 16) ** 2, 128), nn.SiLU(), nn.Linear(128, 1))

    def forward(self, x):                       # [B, 3, S, S] -> [B]
        return self.head(self.trunk(x)[-1])[:, 0]


class IdentityNet(nn.Module):
    """Frame -> identity embedding, trained as a cosine-softmax classifier over training identities."""

    def __init__(self, num_ids: int, size: int = 64, dim: int = 64, scale: float = 16.0):
        super().__init__()
        self.trunk = _Trunk()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * (size // 16) ** 2, 128), nn.SiLU(), nn.Linear(128, dim))
        self.classes = nn.Parameter(torch.randn(num_ids, dim) / dim ** 0.5)
        self.scale = scale

    def forward(self, x):                       # [B, 3, S, S] -> (features [B, D], maps)
        maps = self.trunk(x)
        return self.embed(maps[-1]), maps

    def logits(self, feats):                    # [B, D] -> [B, num_ids]
        return self.scale * F.normalize(feats, dim=1) @ F.normalize(self.classes, dim=1).T


# ----------------------------------------------------------------------------------------------
# training helpers (the labelled frames come from the metric backend: MetricBackend.training_frames)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Generator-like degradations: blur, noise, a small global tint. x: [B, 3, S, S] in [-1, 1]."""
    B = x.shape[0]
    r = lambda *shape: torch.rand(*shape, generator=gen)                       # noqa: E731
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    alpha = r(B, 1, 1, 1) * (r(B, 1, 1, 1) < 0.5)
    x = x + alpha * (blurred - x)
    x = x + 0.06 * r(B, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    x = x + 0.04 * (r(B, 3, 1, 1) - 0.5)
    return x.clamp(-1, 1)


def _to_input(frames, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy or torch) -> float [N, 3, size, size] in [-1, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise AvatarForcingError(f"metric nets need frames [T, H, W, 3], got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


# ----------------------------------------------------------------------------------------------
# the bundle of metric networks


class MetricNets:
    """The sync expert and the identity net, with helpers that take uint8 frames."""

    def __init__(self, sync: SyncExpert, identity: IdentityNet, size: int = 64, info: dict | None = None):
        self.sync = sync.eval()
        self.identity = identity.eval()
        self.size = size
        self.info = info or {}

    @property
    def backend(self) -> str:
        """The metric backend the nets were trained on (``info['backend']``, default :data:`DEFAULT_BACKEND`)."""
        return str(self.info.get("backend", DEFAULT_BACKEND))

    @classmethod
    def random(cls, seed: int = 0, size: int = 64, num_ids: int = 8) -> "MetricNets":
        """Untrained nets: enough for metrics whose property does not depend on training."""
        torch.manual_seed(seed)
        return cls(SyncExpert(size), IdentityNet(num_ids, size), size, {"trained": False})

    @classmethod
    def train(cls, out_path: os.PathLike | str | None = None, num_ids: int = 128, frames_per_id: int = 24,
              sync_steps: int = 600, id_steps: int = 600, batch_size: int = 64, lr: float = 2e-3,
              size: int = 64, seed: int = 0, threads: int | None = 1, log=print,
              backend: str = DEFAULT_BACKEND) -> "MetricNets":
        """Train both nets on freshly rendered frames of metric backend ``backend`` (defaults: a few minutes on
        2 CPU cores; the backend's name is kept in ``info`` and picks the lip-sync envelope of evaluate_video).

        ``threads`` sets torch's intra-op threads while training (None keeps torch's setting; one thread
        is the fastest on a busy shared machine, where more threads oversubscribe the cores)."""
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return cls._train(out_path, num_ids, frames_per_id, sync_steps, id_steps, batch_size, lr, size, seed, log,
                              backend)
        finally:
            torch.set_num_threads(previous)

    @classmethod
    def _train(cls, out_path, num_ids, frames_per_id, sync_steps, id_steps, batch_size, lr, size, seed, log,
               backend=DEFAULT_BACKEND):
        if size % 16:
            raise AvatarForcingError(f"metric net size must be a multiple of 16, got {size}")
        if num_ids < 2 or frames_per_id < 2:
            raise AvatarForcingError(f"need num_ids >= 2 and frames_per_id >= 2, got {num_ids} and {frames_per_id}")
        log = log or (lambda *_: None)
        training_frames = metric_backend(backend).training_frames
        t0 = time.perf_counter()
        frames, mouth, labels = training_frames(num_ids, frames_per_id, size, seed)
        t_data = time.perf_counter() - t0
        log(f"metric nets: rendered {len(frames)} frames of {num_ids} identities in {t_data:.1f}s")
        x_all = _to_input(frames, size)
        y_mouth = torch.from_numpy(mouth)
        y_id = torch.from_numpy(labels).long()
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        sync, ident = SyncExpert(size), IdentityNet(num_ids, size)

        def fit(model, steps, loss_fn, name):
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
            model.train()
            t = time.perf_counter()
            for step in range(steps):
                idx = torch.randint(len(x_all), (batch_size,), generator=gen)
                loss = loss_fn(model, _augment(x_all[idx], gen), idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if log and (step + 1) % max(1, steps // 5) == 0:
                    log(f"metric nets: {name} step {step + 1}/{steps} loss {loss.item():.4f}")
            model.eval()
            return time.perf_counter() - t

        t_sync = fit(sync, sync_steps, lambda m, x, i: F.mse_loss(m(x), y_mouth[i]), "sync")
        t_id = fit(ident, id_steps, lambda m, x, i: F.cross_entropy(m.logits(m(x)[0]), y_id[i]), "identity")
        info = dict(trained=True, num_ids=num_ids, frames_per_id=frames_per_id, sync_steps=sync_steps,
                    id_steps=id_steps, seed=seed, seconds_data=t_data, seconds_sync=t_sync, seconds_id=t_id,
                    backend=backend)
        nets = cls(sync, ident, size, info)
        # Held-out check on unseen identities (reported, stored in the checkpoint).
        v_frames, v_mouth, _ = training_frames(8, 8, size, seed + 1)
        pred = nets.mouth_open(v_frames)
        info["val_mouth_corr"] = float(np.corrcoef(pred, v_mouth)[0, 1])
        log(f"metric nets: trained in {time.perf_counter() - t0:.1f}s (data {t_data:.1f}s, sync {t_sync:.1f}s, "
            f"identity {t_id:.1f}s); unseen-identity mouth correlation {info['val_mouth_corr']:.3f}")
        if out_path is not None:
            nets.save(out_path)
        return nets

    def save(self, path: os.PathLike | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(dict(version=CHECKPOINT_VERSION, size=self.size, num_ids=self.identity.classes.shape[0],
                        sync=self.sync.state_dict(), identity=self.identity.state_dict(), info=self.info), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: os.PathLike | str) -> "MetricNets":
        path = Path(path)
        if not path.is_file():
            raise AvatarForcingError(f"metric nets not found at {path}; train them with MetricNets.train('{path}')")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            sync, ident = SyncExpert(ckpt["size"]), IdentityNet(ckpt["num_ids"], ckpt["size"])
            sync.load_state_dict(ckpt["sync"])
            ident.load_state_dict(ckpt["identity"])
        except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
            raise AvatarForcingError(f"{path} is not a metric-nets checkpoint ({type(exc).__name__}); "
                                     "retrain it with MetricNets.train") from None
        return cls(sync, ident, ckpt["size"], ckpt.get("info"))

    @torch.no_grad()
    def _run(self, frames, fn, chunk: int = 256):
        outs = []
        for i in range(0, len(frames), chunk):
            outs.append(fn(_to_input(frames[i:i + chunk], self.size)))
        return outs

    def mouth_open(self, frames) -> np.ndarray:
        """Predicted mouth opening per frame -> float [T]."""
        return torch.cat(self._run(frames, self.sync)).numpy().astype(np.float64)

    def features(self, frames) -> np.ndarray:
        """Identity-net penultimate features (for FID and CSIM) -> float [T, D]."""
        return torch.cat(self._run(frames, lambda x: self.identity(x)[0])).numpy().astype(np.float64)

    def embed(self, frames) -> np.ndarray:
        """Unit-norm identity embeddings -> float [T, D]."""
        f = self.features(frames)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-8)

    def adjacent_feature_distance(self, frames) -> np.ndarray:
        """LPIPS-style distance between frames t and t+1 -> float [T-1]."""
        return self.features_and_flicker(frames)[1]

    @torch.no_grad()
    def features_and_flicker(self, frames, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """One identity-net pass -> (features [T, D], adjacent feature distance [T-1]).

        The distance is LPIPS-like without learned channel weights: per trunk stage, unit-normalise
        the channel vector at each position and take the mean squared difference over positions;
        then average over stages."""
        feats, dists = [], []
        prev = None                                  # normalised maps of the previous chunk's last frame
        for i in range(0, len(frames), chunk):
            f, maps = self.identity(_to_input(frames[i:i + chunk], self.size))
            maps = [F.normalize(m, dim=1) for m in maps]
            feats.append(f)
            if prev is not None:
                maps = [torch.cat([p, m]) for p, m in zip(prev, maps)]
            dists.append(sum(((m[1:] - m[:-1]) ** 2).sum(1).mean((1, 2)) for m in maps) / len(maps))
            prev = [m[-1:] for m in maps]
        if not feats:
            return np.zeros((0, self.identity.classes.shape[1])), np.zeros(0)
        return torch.cat(feats).numpy().astype(np.float64), torch.cat(dists).numpy().astype(np.float64)


# ----------------------------------------------------------------------------------------------
# metric functions (each takes plain arrays; evaluate_video combines them)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


def sync_scores(mouth: np.ndarray, envelope: np.ndarray, max_offset: int = 15) -> dict:
    """Lip sync of a mouth-opening series against an audio envelope (both [T]).

    r(k) = Pearson(mouth[t], envelope[t + k]) over t in [K, T-K) for every k in [-K, K];
    k > 0 means the video runs ahead of the audio. -> dict(conf = max r, lag = argmax k,
    offset = |lag|, dist = 1 - r(0))."""
    mouth = np.asarray(mouth, np.float64)
    envelope = np.asarray(envelope, np.float64)
    T, K = len(mouth), int(max_offset)
    if envelope.shape != mouth.shape:
        raise AvatarForcingError(f"mouth [{T}] and envelope {envelope.shape} differ in length; "
                                 "pass one value per frame")
    if T < 2 * K + 4:
        raise AvatarForcingError(f"lip sync over {T} frames needs more than 2*max_offset+4 = {2 * K + 4}; "
                                 "use a longer video or a smaller max_offset")
    r = np.array([_pearson(mouth[K:T - K], envelope[K + k:T - K + k]) for k in range(-K, K + 1)])
    best = int(np.argmax(r))
    return dict(conf=float(r[best]), lag=best - K, offset=abs(best - K), dist=1.0 - float(r[K]), curve=r)


def identity_similarity(reference_embedding: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of each frame's embedding [T, D] to the reference's [D] -> [T]."""
    ref = reference_embedding / max(np.linalg.norm(reference_embedding), 1e-8)
    emb = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-8)
    return emb @ ref


def _centre_crop(x: np.ndarray, crop: float) -> np.ndarray:
    H, W = x.shape[-3:-1]
    h, w = max(1, round(crop * H)), max(1, round(crop * W))
    top, left = (H - h) // 2, (W - w) // 2
    return x[..., top:top + h, left:left + w, :]


def delta_e(frames: np.ndarray, reference: np.ndarray, crop: float = 0.6, chunk: int = 128) -> np.ndarray:
    """Mean CIEDE2000 colour difference between each frame and the reference over the centred
    ``crop`` x ``crop`` (fraction of the side) face region -> [T]."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    if not 0 < crop <= 1:
        raise AvatarForcingError(f"delta_e crop is a fraction of the frame side in (0, 1], got {crop}")
    ref_lab = rgb2lab(_centre_crop(reference, crop).astype(np.float64) / 255.0)
    out = []
    for i in range(0, len(frames), chunk):
        lab = rgb2lab(_centre_crop(frames[i:i + chunk], crop).astype(np.float64) / 255.0)
        out.append(deltaE_ciede2000(ref_lab[None], lab).mean(axis=(1, 2)))
    return np.concatenate(out) if out else np.zeros(0)


def block_seam_excess(adjacent: np.ndarray, period: int, pairs: slice = slice(None),
                      stride: int = LATENT_STRIDE) -> float:
    """Mean of an adjacent-frame distance [T-1] over block seams minus its mean over the other latent-frame seams.

    Frame 0 is the reference, latent frame k >= 1 decodes to video frames 4k-3 .. 4k (``stride`` = 4) and block b
    holds video frames b*period+1 .. (b+1)*period, so the pair (i, i+1) crosses a latent-frame seam when i is a
    positive multiple of ``stride`` and a block seam when i is one of ``period``.  Comparing block seams with the
    latent seams inside blocks cancels whatever the decoder does at every latent frame: what is left is the jump
    between two blocks (joined only by the temporal cache) beyond that between two latent frames of one block
    (denoised together).  Only pairs in ``pairs`` count; NaN when the span holds no pair of either kind."""
    adjacent = np.asarray(adjacent, np.float64)
    idx = np.arange(len(adjacent))[pairs]
    idx = idx[(idx > 0) & (idx % int(stride) == 0)]
    seam = idx % int(period) == 0
    if not seam.any() or seam.all():
        return float("nan")
    return float(adjacent[idx[seam]].mean() - adjacent[idx[~seam]].mean())


def adjacent_pixel_difference(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference between frames t and t+1, in [0, 255] -> [T-1]."""
    out = []
    for i in range(0, len(frames) - 1, 256):
        x = frames[i:i + 257].astype(np.float32)                     # 256 pairs per chunk
        out.append(np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3)))
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] of features [N, D]."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise AvatarForcingError(f"feature statistics need [N >= 2, D] features, got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(a, b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets.

    ``a``, ``b``: features [N, D] or precomputed (mean, covariance) from :func:`feature_stats`."""
    mu1, s1 = a if isinstance(a, tuple) else feature_stats(a)
    mu2, s2 = b if isinstance(b, tuple) else feature_stats(b)
    if mu1.shape != mu2.shape:
        raise AvatarForcingError(f"feature dimensions differ ({mu1.shape[0]} vs {mu2.shape[0]}); "
                                 "extract both sets with the same metric nets")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():                # singular product: regularise the diagonal
        eps = 1e-6 * np.eye(len(mu1))
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# one video


def _check_video(frames, reference) -> tuple[np.ndarray, np.ndarray]:
    frames = np.asarray(frames)
    reference = np.asarray(reference)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise AvatarForcingError(f"evaluate_video needs uint8 frames [T, H, W, 3], got {frames.dtype} "
                                 f"{frames.shape}; convert with avatarforcing.vae.to_uint8")
    if reference.shape != frames.shape[1:] or reference.dtype != np.uint8:
        raise AvatarForcingError(f"reference is {reference.dtype} {reference.shape} but frames are "
                                 f"{frames.shape[1:]}; pass a uint8 reference of the video's size")
    if len(frames) < 2:
        raise AvatarForcingError("evaluate_video needs at least 2 frames; generate a longer video")
    return frames, reference


def evaluate_video(frames, wav, reference, nets: MetricNets, real_feats=None, fps: int = FPS,
                   tail_seconds: float = 10.0, sample_rate: int = SAMPLE_RATE, max_offset: int = 15,
                   crop: float = 0.6, envelope=None, seam_period: int | None = None,
                   curve_seconds: float | None = None) -> dict:
    """All metrics of one video -> {name_total, name_last, ...} (see the module docstring).

    frames uint8 [T, H, W, 3]; wav float [N] at ``sample_rate`` (the driving audio, frame 0 at
    sample 0; None skips lip sync); reference uint8 [H, W, 3]; real_feats: features [M, D] of real
    frames (``nets.features``) or their ``feature_stats`` (None skips FID). "last" covers the final
    ``tail_seconds`` (the whole video if it is shorter).  ``envelope(wav, sample_rate, fps, T)`` -> [T]: the
    audio loudness the mouth is correlated with (default: that of the nets' metric backend, ``nets.backend``).
    ``seam_period``: video frames per streamed block (4 * block_frames); adds ``seam_feat`` (see the module).
    ``curve_seconds``: adds ``csim_curve``, the mean CSIM of each consecutive ``curve_seconds`` of the video (the
    last segment may be shorter): identity over time, for drift plots."""
    frames, reference = _check_video(frames, reference)
    T = len(frames)
    tail = min(T, max(2, int(round(tail_seconds * fps))))
    out: dict = dict(num_frames=T, tail_frames=tail)

    def both(name, series, pairs=False):          # per-frame (or per-pair) series -> total / last
        n = tail - 1 if pairs else tail
        out[f"{name}_total"] = float(np.mean(series))
        out[f"{name}_last"] = float(np.mean(series[-n:]))

    if wav is not None:
        envelope = envelope or metric_backend(nets.backend).envelope
        env = np.asarray(envelope(np.asarray(wav, np.float32).reshape(-1), sample_rate, fps, T))
        mouth = nets.mouth_open(frames)
        for part, sl in (("total", slice(0, T)), ("last", slice(T - tail, T))):
            s = sync_scores(mouth[sl], env[sl], max(0, min(max_offset, (sl.stop - sl.start - 4) // 2)))
            out[f"sync_conf_{part}"] = s["conf"]
            out[f"sync_offset_{part}"] = s["offset"]
            out[f"sync_lag_{part}"] = s["lag"]
            out[f"sync_dist_{part}"] = s["dist"]
    feats, adj_feat = nets.features_and_flicker(frames)
    ref_feat = nets.features(reference[None])[0]
    csim = identity_similarity(ref_feat, feats)
    both("csim", csim)
    if curve_seconds:
        step = max(1, int(round(curve_seconds * fps)))
        out["csim_curve"] = [float(np.mean(csim[i:i + step])) for i in range(0, T, step)]
    both("delta_e", delta_e(frames, reference, crop))
    both("adj_feat", adj_feat, pairs=True)
    both("adj_pixel", adjacent_pixel_difference(frames), pairs=True)
    if seam_period:
        for part, sl in (("total", slice(0, T - 1)), ("last", slice(T - tail, T - 1))):
            out[f"seam_feat_{part}"] = block_seam_excess(adj_feat, seam_period, sl)
    if real_feats is not None:
        out["fid_total"] = frechet_distance(feats, real_feats)
        out["fid_last"] = frechet_distance(feats[-tail:], real_feats)
    return out

"""Talking-head videos with audio (+ captions) -> clip samples (format: :mod:`.data`).

Sources (``data.source``):

* a folder: every video file (.mp4 .mov .mkv .avi .webm); its audio is a same-stem .wav/.mp3/.flac/.m4a
  next to it or else the video's own audio track; its caption a same-stem .txt (else ``data.caption``);
* a CSV with a ``video`` column and optional ``audio`` and ``caption`` columns (paths relative to the CSV).

Each video is resampled to ``data.fps``, resized / centre-cropped to ``data.height`` x ``data.width`` and cut
into consecutive clips of 1 + 4 * clip_blocks * B video frames (``data.clips_per_video``, null = all that
fit).  Per clip: VAE latents, the reference latent (the clip's first frame, or a random frame of the video
encoded alone), per-latent-frame audio (the whole video's audio encoded at once, rows of the clip grouped
by ``audio.latent_audio``) and the caption's text embeddings.

Resumable: samples that exist are not rewritten and a finished video leaves ``.done/<video id>`` so it is
not decoded again.  Parallel: process r of w takes every w-th video (``--rank/--world`` or the launcher's
RANK / WORLD_SIZE).  Bad sources are skipped (counted, logged, listed in ``errors_rank<r>.txt``) or fail,
per ``data.on_error``.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import torch

from .. import AvatarForcingError
from ..units import LATENT_STRIDE, video_frames
from . import data as D

log = logging.getLogger(__name__)

VIDEO_EXT = (".mp4", ".mov", ".mkv", ".avi", ".webm")
AUDIO_EXT = (".wav", ".mp3", ".flac", ".m4a", ".ogg")


def list_sources(source) -> list[dict]:
    """[{video, audio, caption}] of a folder or a CSV, sorted (the order every process agrees on)."""
    source = Path(str(source))
    if source.is_dir():
        out = []
        for v in sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_EXT and not p.name.startswith(".")):
            audio = next((v.with_suffix(e) for e in AUDIO_EXT if v.with_suffix(e).is_file()), v)
            txt = v.with_suffix(".txt")
            out.append({"video": v, "audio": audio, "caption": txt.read_text().strip() if txt.is_file() else None})
        if not out:
            raise AvatarForcingError(f"no videos ({', '.join(VIDEO_EXT)}) under {source}")
        return out
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "video" not in cols:
                raise AvatarForcingError(f"{source} has columns {cols}; it needs a 'video' column (optional: audio, caption)")
            out = []
            for row in reader:
                row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
                v = Path(row["video"])
                v = v if v.is_absolute() else source.parent / v
                a = Path(row["audio"]) if row.get("audio") else v
                a = a if a.is_absolute() else source.parent / a
                out.append({"video": v, "audio": a, "caption": row.get("caption") or None})
        return out
    raise AvatarForcingError(f"data.source {source} is neither a folder of videos nor a .csv file")


def video_id(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem)[:48]
    return f"{stem}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


def resample_indices(num_frames: int, fps: float, target: float) -> np.ndarray:
    """Frame indices that resample a video from ``fps`` to ``target`` (nearest earlier frame)."""
    if abs(fps - target) < 1e-3:
        return np.arange(num_frames)
    n = int(np.floor(num_frames * target / fps + 1e-6))
    return np.minimum((np.arange(n) * fps / target + 1e-6).astype(int), num_frames - 1)


class Preprocessor:
    def __init__(self, cfg, device=None):
        from ..audio import build_audio_encoder
        from ..text import build_text_encoder
        from ..vae import build_vae
        self.cfg = cfg
        dev = str(cfg.data.device)
        if device is None and dev == "auto":
            import os
            dev = (f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
                   if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device or dev)
        self.B = int(cfg.schedule.block_frames)
        self.clip_video_frames = video_frames(1 + int(cfg.data.clip_blocks) * self.B)
        with torch.random.fork_rng():       # random inits (no vae.path, tiny wav2vec2) follow cfg.seed
            torch.manual_seed(int(cfg.seed))
            self.vae = build_vae(cfg.vae).to(self.device).eval()
            torch.manual_seed(int(cfg.seed))
            self.audio = build_audio_encoder(cfg.audio).to(self.device).eval()
        if LATENT_STRIDE * self.audio.feature_dim != int(cfg.model.audio_dim):
            raise AvatarForcingError(f"the audio encoder gives {self.audio.feature_dim} features per video frame -> "
                                     f"{LATENT_STRIDE * self.audio.feature_dim} per latent frame, but model.audio_dim is "
                                     f"{cfg.model.audio_dim}; set model.audio_dim={LATENT_STRIDE * self.audio.feature_dim}")
        self.text = build_text_encoder(cfg.text, int(cfg.model.text_dim), int(cfg.model.text_len)).to(self.device)
        self.dtype = D.storage_dtype(cfg.data.dtype)

    def write_null_text(self, out_dir: Path) -> None:
        empty, neg = self.text.encode(["", str(self.cfg.teacher.negative_prompt)]).float().cpu()
        D.write_null_text(out_dir, empty, neg)

    @torch.no_grad()
    def process(self, src: dict, out_dir: Path) -> int:
        """Write the clips of one source; returns the number written (0 when all existed)."""
        from ..audio import latent_audio
        from ..media import load_audio, load_image, read_video
        cfg = self.cfg
        vid = video_id(src["video"])
        frames, fps = read_video(src["video"])
        if len(frames) == 0:
            raise AvatarForcingError(f"{src['video']}: no video frames")
        idx = resample_indices(len(frames), fps, float(cfg.data.fps))
        T, L = len(idx), self.clip_video_frames
        n_fit = T // L
        if n_fit == 0:
            raise AvatarForcingError(f"{src['video']}: {T} frames at {cfg.data.fps} fps, fewer than one clip of {L} "
                                     f"frames (data.clip_blocks={cfg.data.clip_blocks}, B={self.B})")
        n_clips = n_fit if cfg.data.clips_per_video is None else min(n_fit, int(cfg.data.clips_per_video))
        todo = [c for c in range(n_clips) if not D.sample_path(out_dir, f"{vid}-c{c:03d}").is_file()]
        if not todo:
            return 0
        wav = load_audio(src["audio"], int(cfg.audio.sample_rate))
        feats = self.audio.encode(wav, num_frames=T).float().cpu()             # [T, D]; row j drives frame j
        caption = src["caption"] if src["caption"] is not None else str(cfg.data.caption)
        text = D.trim_text(self.text.encode([caption])[0].float().cpu())
        H, W = int(cfg.data.height), int(cfg.data.width)
        rng = np.random.default_rng(int(hashlib.sha1(vid.encode()).hexdigest()[:8], 16) + int(cfg.seed))
        written = 0
        for c in todo:
            sel = idx[c * L:(c + 1) * L]
            video = torch.stack([load_image(frames[i], H, W) for i in sel], dim=1)[None]   # [1, 3, L, H, W]
            lat = self.vae.encode_video(video.to(self.device)).float().cpu()[0]         # [16, F, h, w]
            if str(cfg.data.reference) == "first":
                ref = lat[:, :1]
            elif str(cfg.data.reference) == "random":
                j = int(idx[rng.integers(len(idx))])
                ref = self.vae.encode_video(load_image(frames[j], H, W)[None, :, None].to(self.device)).float().cpu()[0]
            else:
                raise AvatarForcingError(f"data.reference must be 'first' or 'random', got {cfg.data.reference!r}")
            audio = latent_audio(feats[c * L:(c + 1) * L], lat.shape[1])
            D.write_sample(D.sample_path(out_dir, f"{vid}-c{c:03d}"),
                           {"latents": lat, "ref": ref, "audio": audio, "text": text},
                           metadata={"caption": caption, "source": str(src["video"]), "audio_source": str(src["audio"]),
                                     "clip": c, "clip_start_frame": int(c * L), "fps": float(cfg.data.fps)},
                           kind="clip", dtype=self.dtype)
            written += 1
        return written


def preprocess(cfg, rank: int = 0, world: int = 1, progress: bool = True, device=None) -> dict:
    if not cfg.data.source or not cfg.data.shards:
        raise AvatarForcingError("preprocess needs data.source=<folder or CSV> and data.shards=<output directory>")
    out_dir = Path(cfg.data.shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    done_dir = out_dir / ".done"
    done_dir.mkdir(exist_ok=True)
    sources = D.shard_work(list_sources(cfg.data.source), rank, world)
    pre = Preprocessor(cfg, device)
    if rank == 0 and not (out_dir / D.NULL_TEXT).is_file():
        pre.write_null_text(out_dir)
    stats = {"videos": len(sources), "written": 0, "skipped_done": 0, "bad": 0, "bad_files": []}
    from tqdm.auto import tqdm
    for src in tqdm(sources, desc=f"preprocess[{rank}/{world}]", disable=not progress, dynamic_ncols=True):
        marker = done_dir / video_id(src["video"])
        if marker.is_file():
            stats["skipped_done"] += 1
            continue
        try:
            stats["written"] += pre.process(src, out_dir)
        except (AvatarForcingError, OSError, RuntimeError, ValueError) as exc:
            if str(cfg.data.on_error) == "fail":
                raise AvatarForcingError(f"{src['video']}: {exc} (data.on_error=fail; data.on_error=skip skips it)") from None
            log.warning("skipping %s: %s", src["video"], exc)
            stats["bad"] += 1
            stats["bad_files"].append(str(src["video"]))
            with open(out_dir / f"errors_rank{rank}.txt", "a") as f:
                f.write(f"{src['video']}\t{exc}\n")
            continue
        marker.write_text("done\n")
    return stats

"""Audio features per video frame (25 fps) and their grouping into latent frames.

Row convention (SPEC section 3): row j of a feature matrix drives video frame j and holds the audio
feature of video frame j-1, so row 0 is all zeros. Audio frame i covers samples [640 i, 640 (i+1))
at 16 kHz. A clip of N samples has ceil(N / 640) audio frames and 1 + ceil(N / 640) rows.

Latent frame 0 (the reference frame) gets zero audio; latent frame k >= 1 covers video frames
4k-3..4k and takes their 4 rows concatenated (:func:`latent_audio`).

Two extractors share one interface:
- :class:`Wav2Vec2Features`: the reference release's wav2vec2-base-960h features (14 x 768 per frame).
- :class:`MelFeatures`: weight-free log-mel features for the synthetic world and tests.

Both encode a whole clip at once (:meth:`AudioFeatureExtractor.encode`, what the reference release
does) or incrementally (:meth:`AudioFeatureExtractor.stream`): fixed chunks, each re-encoded together
with some seconds of past audio, and a running mean/variance instead of whole-clip statistics.
"""
from __future__ import annotations

import math
import os
import queue
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import AvatarForcingError
from .profiling import NullProfiler

SAMPLE_RATE = 16000
FPS = 25
LATENT_STRIDE = 4          # video frames per latent frame (Wan VAE temporal compression)


def _as_wav(wav) -> torch.Tensor:
    """np.ndarray | Tensor [N] -> float32 Tensor [N] (CPU)."""
    wav = torch.as_tensor(np.asarray(wav) if not isinstance(wav, torch.Tensor) else wav)
    wav = wav.detach().to("cpu", torch.float32)
    if wav.ndim != 1:
        raise AvatarForcingError(f"audio must be mono samples [N], got shape {tuple(wav.shape)}; "
                                 "load it with avatarforcing.media.load_audio")
    return wav


def _fit_rows(rows: torch.Tensor, num_rows: int | None) -> torch.Tensor:
    """Truncate or zero-pad [T, D] to num_rows rows."""
    if num_rows is None:
        return rows
    return F.pad(rows[:num_rows], (0, 0, 0, max(0, num_rows - rows.shape[0])))


class _RunningStats:
    """Cumulative mean / variance of all samples seen so far (float64)."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        self.n += x.numel()
        self.sum += x.sum().item()
        self.sumsq += (x * x).sum().item()

    def mean_var(self) -> tuple[float, float]:
        mean = self.sum / max(self.n, 1)
        return mean, max(self.sumsq / max(self.n, 1) - mean * mean, 0.0)


class AudioFeatureExtractor(nn.Module):
    """Base class: per-video-frame audio features at 25 fps from 16 kHz mono audio."""

    feature_dim: int  # features per video frame
    sample_rate = SAMPLE_RATE
    fps = FPS

    def __init__(self, chunk_seconds: float = 0.64, left_context_seconds: float = 2.0):
        super().__init__()
        self.chunk_seconds = chunk_seconds
        self.left_context_seconds = left_context_seconds

    @property
    def samples_per_frame(self) -> int:
        return self.sample_rate // self.fps  # 640

    def num_audio_frames(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.samples_per_frame)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def window_features(self, wav: torch.Tensor, num_frames: int,
                        stats: tuple[float, float] | None = None) -> torch.Tensor:
        """Features of the audio frames of a raw window: wav [N] -> [num_frames, feature_dim] (no zero row).

        stats: (mean, var) to normalize with; None = the window's own statistics."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, wav, num_frames: int | None = None) -> torch.Tensor:
        """Whole clip, offline: wav [N] at 16 kHz -> [num_frames, feature_dim]; row 0 is zeros.

        num_frames None = 1 + the number of 25 fps frames in the audio; longer requests are zero-padded,
        shorter ones truncated."""
        wav = _as_wav(wav)
        n = self.num_audio_frames(len(wav))
        zero = torch.zeros(1, self.feature_dim, device=self.device)
        feats = self.window_features(wav, n).float() if n > 0 else zero[:0]
        return _fit_rows(torch.cat([zero, feats]), num_frames)

    def stream(self, chunk_seconds: float | None = None,
               left_context_seconds: float | None = None) -> "AudioFeatureStream":
        """Incremental encoder; defaults come from the config this extractor was built with."""
        return AudioFeatureStream(
            self, self.chunk_seconds if chunk_seconds is None else chunk_seconds,
            self.left_context_seconds if left_context_seconds is None else left_context_seconds)


class AudioFeatureStream:
    """Streaming encoder: `push` audio as it arrives, get the rows of video frames that became complete.

    Audio is processed in chunks of `chunk_seconds` (rounded to whole 25 fps frames); each chunk is
    encoded together with `left_context_seconds` of past audio and only the chunk's rows are kept.
    Normalization uses the running mean / variance of all audio up to the end of the chunk, so the
    output does not depend on how the audio is split into pushes. The first returned row is the zero
    row; push + flush outputs together have as many rows as `encode` of the same audio."""

    def __init__(self, extractor: AudioFeatureExtractor, chunk_seconds: float, left_context_seconds: float):
        self.extractor = extractor
        self.spf = extractor.samples_per_frame
        self.chunk_frames = max(1, round(chunk_seconds * extractor.fps))
        self.context_frames = max(0, round(left_context_seconds * extractor.fps))
        self._buf = torch.zeros(0)  # raw samples from audio frame self._buf_start on
        self._buf_start = 0
        self._total = 0             # samples pushed so far
        self._done = 0              # audio frames already encoded
        self._stats = _RunningStats()
        self._started = False
        self._closed = False

    def _zero_row_once(self) -> list[torch.Tensor]:
        if self._started:
            return []
        self._started = True
        return [torch.zeros(1, self.extractor.feature_dim, device=self.extractor.device)]

    def _encode_next(self, n: int) -> torch.Tensor:
        """Encode the next n audio frames with left context -> [n, D]."""
        start = max(0, self._done - self.context_frames)
        begin, end = self._done * self.spf, min((self._done + n) * self.spf, self._total)
        offset = self._buf_start * self.spf
        self._stats.update(self._buf[begin - offset:end - offset])
        window = self._buf[start * self.spf - offset:end - offset]
        feats = self.extractor.window_features(window, self.extractor.num_audio_frames(len(window)),
                                               self._stats.mean_var())
        self._done += n
        keep = max(0, self._done - self.context_frames)  # drop audio no future window needs
        self._buf = self._buf[(keep - self._buf_start) * self.spf:]
        self._buf_start = keep
        return feats[-n:].float()

    def _output(self, rows: list[torch.Tensor]) -> torch.Tensor:
        if not rows:
            return torch.zeros(0, self.extractor.feature_dim, device=self.extractor.device)
        return torch.cat(rows)

    @torch.no_grad()
    def push(self, samples) -> torch.Tensor:
        """Append 16 kHz samples [n] -> rows [k, D] for the video frames that became complete."""
        if self._closed:
            raise AvatarForcingError("audio stream was flushed; start a new one with extractor.stream()")
        samples = _as_wav(samples)
        self._buf = torch.cat([self._buf, samples])
        self._total += len(samples)
        rows = self._zero_row_once()
        while self._total // self.spf - self._done >= self.chunk_frames:
            rows.append(self._encode_next(self.chunk_frames))
        return self._output(rows)

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """End of audio -> the remaining rows (a last partial frame is zero-padded like in `encode`)."""
        if self._closed:
            return self._output([])
        rows = self._zero_row_once()
        remaining = self.extractor.num_audio_frames(self._total) - self._done
        if remaining > 0:
            rows.append(self._encode_next(remaining))
        self._closed = True
        return self._output(rows)


# ----------------------------------------------------------------------------------------------
# wav2vec2


def tiny_wav2vec2_config():
    """Random tiny wav2vec2 for tests (same 320x CNN downsampling as the real one)."""
    from transformers import Wav2Vec2Config
    return Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


class Wav2Vec2Features(AudioFeatureExtractor):
    """wav2vec2 features as in the reference release (SPEC section 3).

    Whole-window zero-mean / unit-variance normalization (like `Wav2Vec2FeatureExtractor`), CNN features
    (50 Hz) linearly interpolated to one vector per video frame BEFORE the transformer, then per frame
    cat(last_hidden_state, all hidden states): (num_layers + 2) x hidden = 14 x 768 = 10752 for base-960h."""

    min_samples = 400  # receptive field of the CNN

    def __init__(self, model, chunk_seconds: float = 0.64, left_context_seconds: float = 2.0):
        super().__init__(chunk_seconds, left_context_seconds)
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.feature_dim = (cfg.num_hidden_layers + 2) * cfg.hidden_size

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "Wav2Vec2Features":
        from transformers import Wav2Vec2Model
        path = Path(path)
        if not (path / "config.json").is_file():
            raise AvatarForcingError(
                f"wav2vec2 folder not found or incomplete: {path}; set audio.path to a local copy of "
                "facebook/wav2vec2-base-960h (config.json + weights), or audio.encoder=world")
        try:
            model = Wav2Vec2Model.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise AvatarForcingError(f"cannot load wav2vec2 from {path} ({str(exc).splitlines()[0]}); "
                                     "point audio.path at a facebook/wav2vec2-base-960h folder") from None
        return cls(model, **kwargs)

    @classmethod
    def from_config(cls, config=None, **kwargs) -> "Wav2Vec2Features":
        """Random weights; config None = the tiny test config."""
        from transformers import Wav2Vec2Model
        return cls(Wav2Vec2Model(config or tiny_wav2vec2_config()), **kwargs)

    def window_features(self, wav, num_frames, stats=None):
        wav = wav.double()
        mean, var = stats if stats is not None else (wav.mean().item(), wav.var(unbiased=False).item())
        x = ((wav - mean) / math.sqrt(var + 1e-7)).float()
        x = F.pad(x, (0, max(0, self.min_samples - len(x))))  # [N]

        def to_video_rate(module, args, out):  # [B, C, T50] -> [B, C, num_frames]
            return F.interpolate(out, size=num_frames, mode="linear", align_corners=True)

        hook = self.model.feature_extractor.register_forward_hook(to_video_rate)
        try:
            x = x[None].to(self.model.device, self.model.dtype)
            out = self.model(x, output_hidden_states=True)
        finally:
            hook.remove()
        return torch.cat([out.last_hidden_state, *out.hidden_states], dim=-1)[0]  # [num_frames, D]


# ----------------------------------------------------------------------------------------------
# weight-free features (synthetic world)


class MelFeatures(AudioFeatureExtractor):
    """Deterministic log-mel features, one vector per video frame, no weights to download.

    Frame i uses a causal 64 ms Hann window ending at the frame's last sample (samples
    [640 (i+1) - 1024, 640 (i+1))), so a frame depends only on its own and the previous 384 samples.
    Features: n_mels log-mel energies + log energy (static, fixed affine normalization) and their
    backward differences (static[i] - static[i-1]): feature_dim = 2 (n_mels + 1).
    Streaming with at least one frame of left context therefore equals offline encoding."""

    n_fft = 1024
    log_offset, log_scale = 6.0, 4.0  # fixed normalization: (log(power + 1e-6) + 6) / 4 is O(1)

    def __init__(self, n_mels: int = 31, chunk_seconds: float = 0.64, left_context_seconds: float = 2.0):
        super().__init__(chunk_seconds, left_context_seconds)
        from transformers.audio_utils import mel_filter_bank
        self.n_mels = n_mels
        self.feature_dim = 2 * (n_mels + 1)
        fb = mel_filter_bank(num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=50.0,
                             max_frequency=self.sample_rate / 2, sampling_rate=self.sample_rate,
                             norm="slaney", mel_scale="slaney")
        self.register_buffer("mel_fb", torch.from_numpy(fb).float(), persistent=False)  # [513, n_mels]
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def window_features(self, wav, num_frames, stats=None):
        spf = self.samples_per_frame
        wav = wav.to(self.mel_fb.device, torch.float32)[:num_frames * spf]
        wav = F.pad(wav, (self.n_fft - spf, num_frames * spf - len(wav)))  # causal left pad, pad last frame
        spec = torch.stft(wav, self.n_fft, hop_length=spf, window=self.window, center=False,
                          return_complex=True)                        # [513, num_frames]
        power = spec.abs().pow(2).T / self.n_fft                      # [num_frames, 513]
        static = torch.cat([power @ self.mel_fb, power.sum(-1, keepdim=True)], -1)
        static = (torch.log(static + 1e-6) + self.log_offset) / self.log_scale  # [num_frames, n_mels+1]
        silence = (math.log(1e-6) + self.log_offset) / self.log_scale
        prev = torch.cat([torch.full_like(static[:1], silence), static[:-1]])
        return torch.cat([static, static - prev], -1)                 # [num_frames, 2 (n_mels+1)]


# ----------------------------------------------------------------------------------------------


def build_audio_encoder(cfg_audio) -> AudioFeatureExtractor:
    """Audio extractor from the `audio:` config section."""
    kind = cfg_audio.get("encoder", "wav2vec2")
    if int(cfg_audio.get("sample_rate", SAMPLE_RATE)) != SAMPLE_RATE:
        raise AvatarForcingError(f"audio.sample_rate is {cfg_audio.get('sample_rate')}; it must be 16000 "
                                 "(input audio is resampled to it)")
    stream_kw = dict(chunk_seconds=float(cfg_audio.get("chunk_seconds", 0.64)),
                     left_context_seconds=float(cfg_audio.get("left_context_seconds", 2.0)))
    if kind == "world":
        return MelFeatures(n_mels=int(cfg_audio.get("n_mels", 31)), **stream_kw)
    if kind == "wav2vec2":
        if cfg_audio.get("tiny", False):
            return Wav2Vec2Features.from_config(**stream_kw)
        if not cfg_audio.get("path"):
            raise AvatarForcingError("audio.path is not set; pass audio.path=<local facebook/wav2vec2-base-960h "
                                     "folder> or audio.encoder=world")
        return Wav2Vec2Features.from_pretrained(cfg_audio["path"], **stream_kw)
    raise AvatarForcingError(f"audio.encoder '{kind}' is not known; use wav2vec2 or world")


# ----------------------------------------------------------------------------------------------
# the audio feed of a stream: source chunks -> streaming encoder -> per-latent-frame features


def is_waveform(source) -> bool:
    """A whole mono waveform (as opposed to a file path or a live source of chunks)."""
    return isinstance(source, (np.ndarray, torch.Tensor)) and source.ndim == 1


def _chunks(source, chunk_samples: int) -> Iterator:
    """Any audio source -> an iterator of 16 kHz mono sample chunks.

    None: no audio; a path: the file (decoded, resampled, downmixed); a waveform [N]: split into chunks;
    a ``queue.Queue``: chunks until a ``None`` item; any other iterable: its chunks as they come."""
    from .media import load_audio

    if source is None:
        return iter(())
    if isinstance(source, (str, os.PathLike)):
        source = load_audio(source)
    if is_waveform(source):
        return (source[i:i + chunk_samples] for i in range(0, len(source), chunk_samples))
    if isinstance(source, queue.Queue):
        return _drain(source)
    try:
        return iter(source)
    except TypeError:
        raise AvatarForcingError(f"audio source of type {type(source).__name__} is not supported; pass a path, "
                                 "a waveform [N] at 16 kHz, or an iterable / queue of sample chunks") from None


def _drain(q: queue.Queue) -> Iterator:
    """Items of a queue until a ``None`` item (blocks while the queue is empty)."""
    while (item := q.get()) is not None:
        yield item


class AudioFeed:
    """The audio state of one stream (one batch item).

    ``rows[j - offset]`` drives video frame j (row 0 is the zero row, see avatarforcing/audio.py);
    ``received`` rows exist so far.  Rows no future window needs are dropped."""

    def __init__(self, encoder, source, chunk_samples: int, profiler=None):
        self.encoder_stream = encoder.stream()
        self.chunks = _chunks(source, chunk_samples)
        self.dim = int(encoder.feature_dim)
        self.profiler = profiler or NullProfiler()
        self.rows = torch.zeros(0, self.dim)        # [n, D] on the encoder's device
        self.offset = 0                             # video frame of rows[0]
        self.received = 0                           # video frames with audio rows so far
        self.ended = False

    def _pull(self) -> None:
        chunk = next(self.chunks, None)
        with self.profiler.part("audio"):
            if chunk is None:
                new = self.encoder_stream.flush()
                self.ended = True
            else:
                new = self.encoder_stream.push(chunk)
        if len(new):
            self.rows = torch.cat([self.rows.to(new.device), new.float()])
            self.received += len(new)

    def reaches(self, frame: int) -> bool:
        """Whether the audio has a row for video frame ``frame`` (pulls chunks until known)."""
        while self.received <= frame and not self.ended:
            self._pull()
        return self.received > frame

    def latent(self, start: int, stop: int) -> torch.Tensor:
        """Features of latent frames start..stop-1 -> [stop-start, 4D]; zeros past the end of the audio."""
        lo = LATENT_STRIDE * max(start, 1) - 3          # first video frame needed
        hi = LATENT_STRIDE * (stop - 1) + 1             # one past the last
        if lo < self.offset:
            raise RuntimeError(f"audio of latent frame {start} was already dropped (windows must move forward)")
        self.reaches(hi - 1)
        out = torch.zeros(stop - start, LATENT_STRIDE * self.dim, device=self.rows.device)
        if stop > max(start, 1):
            got = self.rows[max(lo - self.offset, 0):max(hi - self.offset, 0)]   # [<= hi-lo, D]
            flat = got.reshape(-1)
            out[max(start, 1) - start:].view(-1)[:flat.numel()] = flat
        # Windows only move forward: drop rows before this window's first frame.
        if lo > self.offset:
            self.rows = self.rows[lo - self.offset:].clone()
            self.offset = lo
        return out


class BatchAudio:
    """The sampler's audio callable for a batch: ``(start, stop) -> [B, stop-start, 4D]``."""

    def __init__(self, feeds: Sequence[AudioFeed]):
        self.feeds = list(feeds)

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return torch.stack([f.latent(start, stop) for f in self.feeds])

    def reaches(self, frame: int) -> bool:
        reached = [f.reaches(frame) for f in self.feeds]   # pull every item: the longest decides
        return any(reached)

    @property
    def received(self) -> int:
        return max(f.received for f in self.feeds)


def latent_audio(frame_feats: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
    """Group per-video-frame rows into latent frames: [T, D] -> [F, 4D] (or [B, T, D] -> [B, F, 4D]).

    Latent frame 0 gets zeros; latent frame k >= 1 gets rows 4k-3..4k concatenated; rows past the end
    of frame_feats are zeros."""
    if num_latent_frames < 1:
        raise AvatarForcingError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    x = frame_feats[None] if frame_feats.ndim == 2 else frame_feats  # [B, T, D]
    b, t, d = x.shape
    need = 1 + 4 * (num_latent_frames - 1)
    x = F.pad(x[:, :need], (0, 0, 0, max(0, need - t)))                # [B, need, D]
    x = x[:, 1:].reshape(b, num_latent_frames - 1, 4 * d)              # [B, F-1, 4D]
    x = torch.cat([x.new_zeros(b, 1, 4 * d), x], dim=1)                # [B, F, 4D]
    return x[0] if frame_feats.ndim == 2 else x


def video_frames_for_latent(k: int) -> range:
    """Video frames decoded from latent frame k: range(0, 1) for k = 0, else range(4k-3, 4k+1)."""
    return range(0, 1) if k == 0 else range(4 * k - 3, 4 * k + 1)

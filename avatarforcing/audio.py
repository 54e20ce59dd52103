"""Audio features per video frame (25 fps) and their grouping into latent frames.

Row convention (docs/spec.md section 3): row j of a feature matrix drives video frame j and holds the audio
feature of video frame j-1, so row 0 is all zeros. Audio frame i covers samples [640 i, 640 (i+1))
at 16 kHz. A clip of N samples has ceil(N / 640) audio frames and 1 + ceil(N / 640) rows.

Latent frame 0 (the reference frame) gets zero audio; latent frame k >= 1 covers video frames
4k-3..4k and takes their 4 rows concatenated (:func:`latent_audio`).

Two extractors share one interface:
- :class:`Wav2Vec2Features`: the reference release's wav2vec2-base-960h features (14 x 768 per frame).
- :class:`MelFeatures`: weight-free log-mel features for the synthetic world and tests.

Both encode a whole clip at once (:meth:`AudioFeatureExtractor.encode`, what the reference release
does and what its weights were trained on) or incrementally (:meth:`AudioFeatureExtractor.stream`): fixed
chunks, each re-encoded together with some seconds of past audio only, and a running mean/variance
instead of whole-clip statistics.

The feed of a generated stream (:class:`AudioFeed`, used by the pipeline) serves per-latent-frame
features for each window of the sampler: files and whole waveforms offline (``audio.file_features``,
default ``offline``), live sources with :class:`LookaheadRows`, which re-encodes the window's audio every
step with left context and all audio up to the window end (+ ``audio.lookahead_seconds``), so a block's
features gain right context as it moves through the window and are final when it is emitted.
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
from .units import LATENT_STRIDE, video_frames

SAMPLE_RATE = 16000
FPS = 25


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


FILE_FEATURES = ("offline", "streaming")   # audio.file_features: how a file / whole waveform is encoded


def _seconds(key: str, value, meaning: str, positive: bool = False) -> float:
    """Validate a duration config value audio.<key> -> float seconds (one-line error naming the fix)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise AvatarForcingError(f"audio.{key} is {value!r}; it must be a number of seconds {bound} ({meaning}), "
                                 f"e.g. audio.{key}={0.64 if positive else 0.0}")
    return seconds


class AudioFeatureExtractor(nn.Module):
    """Base class: per-video-frame audio features at 25 fps from 16 kHz mono audio."""

    feature_dim: int  # features per video frame
    streams_exactly = False  # True: streaming with >= 2 frames of left context equals the whole-clip encoding
    sample_rate = SAMPLE_RATE
    fps = FPS

    def __init__(self, chunk_seconds: float = 0.64, left_context_seconds: float = 2.0,
                 lookahead_seconds: float = 0.0, file_features: str = "offline"):
        super().__init__()
        self.chunk_seconds = _seconds("chunk_seconds", chunk_seconds, "chunks of audio encoded at once", positive=True)
        self.left_context_seconds = _seconds("left_context_seconds", left_context_seconds,
                                             "past audio re-encoded with each window")
        self.lookahead_seconds = _seconds("lookahead_seconds", lookahead_seconds,
                                          "future audio a streaming window waits for; 0 = no added latency")
        if file_features not in FILE_FEATURES:
            raise AvatarForcingError(f"audio.file_features is {file_features!r}; use offline (whole clip in one forward, "
                                     "as the released weights were trained) or streaming")
        self.file_features = file_features

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
    """Left-context-only streaming encoder: `push` audio as it arrives, get the rows of video frames that
    became complete (final at once, no right context; the pipeline's feed uses :class:`LookaheadRows`).

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
    """wav2vec2 features as in the reference release (docs/spec.md section 3).

    Whole-window zero-mean / unit-variance normalization (like `Wav2Vec2FeatureExtractor`), CNN features
    (50 Hz) linearly interpolated to one vector per video frame BEFORE the transformer, then per frame
    cat(last_hidden_state, all hidden states): (num_layers + 2) x hidden = 14 x 768 = 10752 for base-960h."""

    min_samples = 400  # receptive field of the CNN

    def __init__(self, model, **options):
        super().__init__(**options)  # streaming / file options (AudioFeatureExtractor)
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
    Streaming with at least two frames of left context (the delta needs the previous frame's window)
    therefore equals offline encoding, bit for bit (computed in float64)."""

    n_fft = 1024
    log_offset, log_scale = 6.0, 4.0  # fixed normalization: (log(power + 1e-6) + 6) / 4 is O(1)

    def __init__(self, n_mels: int = 31, **options):
        super().__init__(**options)  # streaming / file options (AudioFeatureExtractor)
        from transformers.audio_utils import mel_filter_bank
        self.n_mels = n_mels
        self.feature_dim = 2 * (n_mels + 1)
        fb = mel_filter_bank(num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=50.0,
                             max_frequency=self.sample_rate / 2, sampling_rate=self.sample_rate,
                             norm="slaney", mel_scale="slaney")
        self.register_buffer("mel_fb", torch.from_numpy(fb).float(), persistent=False)  # [513, n_mels]
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    @property
    def streams_exactly(self) -> bool:
        """Causal features: streaming equals the whole-clip encoding given 2 frames (0.08 s) of left context."""
        return self.left_context_seconds * self.fps >= 2

    def window_features(self, wav, num_frames, stats=None):
        # float64 inside: a frame's float32 result then does not depend on how many frames are computed
        # together (BLAS picks other kernels for few rows), so streaming windows equal `encode` bit for bit.
        spf = self.samples_per_frame
        wav = wav.to(self.mel_fb.device, torch.float64)[:num_frames * spf]
        wav = F.pad(wav, (self.n_fft - spf, num_frames * spf - len(wav)))  # causal left pad, pad last frame
        spec = torch.stft(wav, self.n_fft, hop_length=spf, window=self.window.double(), center=False,
                          return_complex=True)                        # [513, num_frames]
        power = spec.abs().pow(2).T / self.n_fft                      # [num_frames, 513]
        static = torch.cat([power @ self.mel_fb.double(), power.sum(-1, keepdim=True)], -1)
        static = (torch.log(static + 1e-6) + self.log_offset) / self.log_scale  # [num_frames, n_mels+1]
        silence = (math.log(1e-6) + self.log_offset) / self.log_scale
        prev = torch.cat([torch.full_like(static[:1], silence), static[:-1]])
        return torch.cat([static, static - prev], -1).float()         # [num_frames, 2 (n_mels+1)]


# ----------------------------------------------------------------------------------------------


def build_audio_encoder(cfg_audio) -> AudioFeatureExtractor:
    """Audio extractor from the `audio:` config section."""
    kind = cfg_audio.get("encoder", "wav2vec2")
    if int(cfg_audio.get("sample_rate", SAMPLE_RATE)) != SAMPLE_RATE:
        raise AvatarForcingError(f"audio.sample_rate is {cfg_audio.get('sample_rate')}; it must be 16000 "
                                 "(input audio is resampled to it)")
    stream_kw = dict(chunk_seconds=cfg_audio.get("chunk_seconds", 0.64),
                     left_context_seconds=cfg_audio.get("left_context_seconds", 2.0),
                     lookahead_seconds=cfg_audio.get("lookahead_seconds", 0.0),
                     file_features=cfg_audio.get("file_features", "offline"))
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
# the audio feed of a stream: source -> per-video-frame rows -> per-latent-frame features


def is_waveform(source) -> bool:
    """A whole mono waveform (as opposed to a file path or a live source of chunks)."""
    return isinstance(source, (np.ndarray, torch.Tensor)) and source.ndim == 1


def _whole_waveform(source):
    """The samples of a file path (decoded, resampled, downmixed) or a waveform [N]; None for live sources."""
    from .media import load_audio

    if isinstance(source, (str, os.PathLike)):
        return load_audio(source)
    return source if is_waveform(source) else None


def _chunks(source, chunk_samples: int) -> Iterator:
    """Any audio source -> an iterator of 16 kHz mono sample chunks.

    None: no audio; a path: the file, read block by block (decoded, resampled, downmixed); a waveform [N]:
    split into chunks; a ``queue.Queue``: chunks until a ``None`` item; any other iterable: its chunks."""
    from .media import audio_chunks

    if source is None:
        return iter(())
    if isinstance(source, (str, os.PathLike)):
        return audio_chunks(source, SAMPLE_RATE)
    whole = source if is_waveform(source) else None
    if whole is not None:
        return (whole[i:i + chunk_samples] for i in range(0, len(whole), chunk_samples))
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


class OfflineRows:
    """Rows of a whole waveform, encoded in one forward (``encoder.encode``, exactly what the release does).

    ``rows(lo, hi)`` may only move forward; rows before ``lo`` are dropped as the windows pass."""

    def __init__(self, encoder: AudioFeatureExtractor, wav, profiler):
        self.encoder, self.wav, self.profiler = encoder, _as_wav(wav), profiler
        self.received = 1 + encoder.num_audio_frames(len(self.wav))   # rows: the zero row + one per audio frame
        self.ended = True
        self._rows: torch.Tensor | None = None                        # [n, D] from video frame self._first on
        self._first = 0

    def reaches(self, frame: int) -> bool:
        return self.received > frame

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 -> [hi-lo, D]; zeros past the end of the audio."""
        if self._rows is None:
            with self.profiler.part("audio"):
                self._rows = self.encoder.encode(self.wav).float()   # [received, D]
            self.wav = None
        if 2 * (lo - self._first) > len(self._rows):                  # drop passed rows (amortised copy)
            self._rows, self._first = self._rows[lo - self._first:].clone(), lo
        return _fit_rows(self._rows[lo - self._first:hi - self._first], hi - lo)


class LookaheadRows:
    """Rows of a live source, re-encoded for every window with left context and all audio up to the right.

    ``rows(lo, hi)`` encodes one window of audio frames: ``left_context_seconds`` before the first needed
    frame (lo-1) up to ``lookahead_seconds`` past the last one (hi-2), or the end of the audio. The sampler
    asks for its whole window each step, so the newest block sees only ``lookahead_seconds`` of right context
    and each later step revises it with one more block of it; the oldest (emitted) block's features saw
    (L-1) B 4 frames (1.92 s for L = B = 4) plus the look-ahead. MelFeatures is causal, so there this equals
    ``encode`` exactly (given >= 2 frames = 0.08 s of left context).

    Normalization: the running mean / variance of all audio from the start of the stream up to the window's
    right edge (wav2vec2's zero-mean / unit-variance, with statistics that converge to the clip's). The right
    edge and the statistics depend only on the window, never on how the audio arrives in chunks.
    Memory is flat: audio before the left edge of the current window is dropped (windows only move forward),
    and the source is read only as far as the window's right edge (live sources block there)."""

    def __init__(self, encoder: AudioFeatureExtractor, chunks: Iterator, profiler):
        self.encoder, self.chunks, self.profiler = encoder, chunks, profiler
        self.spf = encoder.samples_per_frame
        self.context = round(encoder.left_context_seconds * encoder.fps)    # audio frames
        self.lookahead = round(encoder.lookahead_seconds * encoder.fps)     # audio frames
        self.buf = torch.zeros(0)          # samples [buf_start, buf_start + len(buf)), then the pending chunks
        self.pending: list[torch.Tensor] = []
        self.buf_start = 0                 # sample index of buf[0] (a whole audio frame)
        self.total = 0                     # samples received
        self.ended = False
        self.stats, self.stats_end = _RunningStats(), 0   # statistics of samples [0, stats_end)

    @property
    def received(self) -> int:
        """Rows with audio so far: the zero row + the complete audio frames (+ a last partial one at the end)."""
        frames = self.encoder.num_audio_frames(self.total) if self.ended else self.total // self.spf
        return 1 + frames

    def _pull(self) -> None:
        chunk = next(self.chunks, None)
        if chunk is None:
            self.ended = True
            return
        chunk = _as_wav(chunk)
        self.pending.append(chunk)
        self.total += len(chunk)

    def reaches(self, frame: int) -> bool:
        while self.received <= frame and not self.ended:
            self._pull()
        return self.received > frame

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi-1 (lo >= 1; row j = audio frame j-1) -> [hi-lo, D]; zeros past the end of the audio."""
        spf, enc = self.spf, self.encoder
        want = (hi - 1 + self.lookahead) * spf                     # right edge wanted (samples)
        while self.total < want and not self.ended:
            self._pull()
        left, right = max(0, lo - 1 - self.context) * spf, min(want, self.total)
        if self.pending:
            self.buf, self.pending = torch.cat([self.buf, *self.pending]), []
        if right > self.stats_end:
            self.stats.update(self.buf[self.stats_end - self.buf_start:right - self.buf_start])
            self.stats_end = right
        window = self.buf[left - self.buf_start:max(right, left) - self.buf_start]   # [N] from audio frame left/spf
        n = enc.num_audio_frames(len(window))
        out = torch.zeros(hi - lo, enc.feature_dim, device=enc.device)
        if n > lo - 1 - left // spf:
            with self.profiler.part("audio"):
                feats = enc.window_features(window, n, self.stats.mean_var()).float()   # [n, D]
            got = feats[lo - 1 - left // spf:hi - 1 - left // spf]
            out[:len(got)] = got
        self.buf, self.buf_start = self.buf[left - self.buf_start:], left   # no later window starts earlier
        return out


class AudioFeed:
    """The audio of one stream (one batch item), served per latent frame to the sampler.

    A file or whole waveform is encoded offline (:class:`OfflineRows`) unless the encoder was built with
    ``audio.file_features=streaming``; live sources (iterables, ``queue.Queue``) always stream
    (:class:`LookaheadRows`), and so does a file in streaming mode, fed in chunks of ``chunk_samples``.
    ``received`` rows (video frames, the zero row included) have audio so far."""

    def __init__(self, encoder: AudioFeatureExtractor, source, chunk_samples: int, profiler=None):
        profiler = profiler or NullProfiler()
        self.dim, self.device = int(encoder.feature_dim), encoder.device
        # A file whose features stream exactly (the causal mel features) is read block by block: the same
        # rows as offline, with memory that does not grow with the file.  Otherwise offline = the whole clip.
        streamed_file = isinstance(source, (str, os.PathLike)) and encoder.streams_exactly
        whole = _whole_waveform(source) if encoder.file_features == "offline" and not streamed_file else None
        if whole is not None:
            self.source = OfflineRows(encoder, whole, profiler)
        else:
            self.source = LookaheadRows(encoder, _chunks(source, chunk_samples), profiler)
        self.first = 1                      # first video frame still available (windows move forward)

    @property
    def received(self) -> int:
        return self.source.received

    @property
    def ended(self) -> bool:
        return self.source.ended

    def reaches(self, frame: int) -> bool:
        """Whether the audio has a row for video frame ``frame`` (pulls live chunks until known)."""
        return self.source.reaches(frame)

    def latent(self, start: int, stop: int) -> torch.Tensor:
        """Features of latent frames start..stop-1 -> [stop-start, 4D]; zeros past the end of the audio."""
        lo = LATENT_STRIDE * max(start, 1) - 3          # first video frame needed
        hi = LATENT_STRIDE * (stop - 1) + 1             # one past the last
        if lo < self.first:
            raise RuntimeError(f"audio of latent frame {start} was already dropped (windows must move forward)")
        self.first = lo
        if stop <= max(start, 1):                       # only the reference frame: zero audio
            return torch.zeros(stop - start, LATENT_STRIDE * self.dim, device=self.device)
        rows = self.source.rows(lo, hi)                 # [hi-lo, D]
        zero = rows.new_zeros(max(start, 1) - start, LATENT_STRIDE * self.dim)
        return torch.cat([zero, rows.reshape(-1, LATENT_STRIDE * self.dim)])


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
    need = video_frames(num_latent_frames)
    x = F.pad(x[:, :need], (0, 0, 0, max(0, need - t)))                # [B, need, D]
    x = x[:, 1:].reshape(b, num_latent_frames - 1, LATENT_STRIDE * d)  # [B, F-1, 4D]
    x = torch.cat([x.new_zeros(b, 1, LATENT_STRIDE * d), x], dim=1)    # [B, F, 4D]
    return x[0] if frame_feats.ndim == 2 else x

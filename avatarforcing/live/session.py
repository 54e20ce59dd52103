"""One live stream: audio pushed as it arrives (any sample rate), video frames and their audio out.

    session = LiveSession(pipe, "face.png", sample_rate=48000)
    session.push_audio(samples)          # float32 mono at 48 kHz, any number of samples, any thread
    while session.ready():               # the next block's audio has arrived: step() will not wait
        for frame in session.step():     # LiveFrame(index, pts, image uint8 [H, W, 3], pcm int16 [640])
            show(frame)
    session.end_audio()                  # no more audio: step() drains the remaining blocks
    ...                                  # until session.finished
    session.close()

A session wraps :meth:`AvatarPipeline.stream` over a live audio source (its own buffer), so its frames
are exactly the pipeline's for the same audio, image, prompt and seed.  :meth:`ready` says whether the
audio that the next emitted block needs is there: the reference frame needs none; emitted block k - 1
(the k-th step) needs the audio of the whole window of the streaming step that emits it, i.e. video
frames up to ``4B (k + L - 1)`` plus ``audio.lookahead_seconds`` (README, "a block is generated as soon as
the window's audio has arrived").  A step called when not ready waits for audio (counted in
``starved``); the engine never does that.

The seam for a scheduler (avatarforcing/live/engine.py): sessions hold everything per stream that is
not the model forward (audio intake and resampling, readiness, frame/audio assembly, counters) and are
stepped from ONE worker thread per model.  Batching several sessions into one forward means replacing
the body of :meth:`step` (today ``next()`` on the pipeline's per-stream generator) with a per-session
sampler state that the scheduler advances together; ``ready`` / ``step`` / ``close`` stay the contract.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .. import AvatarForcingError


class SessionClosed(Exception):
    """Raised inside a step whose session was closed while it waited for audio."""


@dataclass(frozen=True)
class LiveFrame:
    index: int            # 0 = the reference frame, then 4B frames per block
    pts: float            # presentation time, index / fps seconds
    image: np.ndarray     # uint8 [H, W, 3]
    pcm: np.ndarray       # int16 [samples_per_frame]: the 16 kHz audio of [pts, pts + 1/fps)


class LiveSession:
    """A live stream over one :class:`~avatarforcing.pipeline.AvatarPipeline` (see the module docstring)."""

    def __init__(self, pipe, image, prompt: str = "", seed: int = 0, sample_rate: int = 16000):
        import soxr

        self.pipe = pipe
        reference = pipe.load_images([image])[0]             # [3, H, W]; a bad image fails here
        self.height, self.width = (int(s) for s in reference.shape[1:])
        enc = pipe.audio_encoder
        self.fps, self.rate, self.spf = int(pipe.fps), int(enc.sample_rate), int(enc.samples_per_frame)
        self.lookahead = round(enc.lookahead_seconds * enc.fps)              # audio frames
        self.input_rate = int(sample_rate)
        self._resampler = (soxr.ResampleStream(self.input_rate, self.rate, 1, dtype="float32")
                           if self.input_rate != self.rate else None)
        self._cond = threading.Condition()
        self._audio = np.zeros(0, np.float32)  # 16 kHz samples from _audio_start on (frames not yet emitted)
        self._audio_start = 0
        self._received = 0                     # 16 kHz samples received
        self._fed = 0                          # samples handed to the pipeline
        self._ended = self._closed = False
        self._frames = pipe.stream(reference, self._chunks(), prompt, seed)
        self.steps = 0                         # generator yields so far: the reference frame, then blocks
        self.next_index = 0                    # index of the next frame
        self.finished = False
        self.starved = 0                       # times a step had to wait for audio (0 when driven by ready())

    # ---- audio in (any thread) -------------------------------------------------------------------
    def push_audio(self, samples: np.ndarray) -> None:
        """Append float32 mono samples at the session's ``sample_rate``."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples)
        self._append(samples, end=False)

    def end_audio(self) -> None:
        """No more audio: the stream drains (the last block is padded with silence)."""
        tail = np.zeros(0, np.float32)
        if self._resampler is not None and not self._ended:
            tail = self._resampler.resample_chunk(tail, last=True)
        self._append(tail, end=True)

    def _append(self, samples: np.ndarray, end: bool) -> None:
        with self._cond:
            if self._ended:
                raise AvatarForcingError("audio pushed after end_audio(); start a new session")
            if len(samples):
                self._audio = np.concatenate([self._audio, np.clip(samples, -1.0, 1.0)])
                self._received += len(samples)
            self._ended = end
            self._cond.notify_all()

    def _chunks(self):
        """The pipeline's audio source: everything received and not yet handed over, as one chunk."""
        while True:
            with self._cond:
                while self._fed >= self._received and not (self._ended or self._closed):
                    self.starved += 1
                    self._cond.wait()
                if self._closed:
                    raise SessionClosed
                if self._fed >= self._received:
                    return                                            # ended
                chunk = self._audio[self._fed - self._audio_start:self._received - self._audio_start].copy()
                self._fed = self._received
            yield chunk

    # ---- readiness ---------------------------------------------------------------------------------
    @property
    def block_frames(self) -> int:
        return self.pipe.block_video_frames

    @property
    def algorithmic_latency(self) -> float:
        """Seconds of audio past a block's start that it waits for: the window (L blocks) + the look-ahead."""
        return (self.block_frames * self.pipe.schedule.L + self.lookahead) / self.fps

    def samples_needed(self, step: int) -> int:
        """16 kHz samples the ``step``-th yield needs (0: the reference frame; k: emitted block k - 1)."""
        if step == 0:
            return 0
        return (self.block_frames * (step + self.pipe.schedule.L - 1) + self.lookahead) * self.spf

    def ready(self) -> bool:
        """Whether :meth:`step` can run without waiting for audio."""
        with self._cond:
            return not self.finished and (self._ended or self._received >= self.samples_needed(self.steps))

    def backlog_blocks(self) -> int:
        """Steps whose audio is all here and that have not run yet (more than 1: generation is behind)."""
        with self._cond:
            if self.finished:
                return 0
            if self._ended:
                blocks = self.pipe.blocks_for_frames(self.pipe.audio_video_frames(self._received))
                return max(0, 1 + blocks - self.steps)
            frames = self._received // self.spf - self.lookahead
            last = max(0, frames // self.block_frames - self.pipe.schedule.L + 1)   # last step with its audio
            return max(0, last - self.steps + 1)

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def received_seconds(self) -> float:
        return self._received / self.rate

    @property
    def buffered_seconds(self) -> float:
        """Audio received but not yet handed to the pipeline (grows when the client sends ahead)."""
        return (self._received - self._fed) / self.rate

    # ---- frames out (the stepping thread) -------------------------------------------------------------
    def step(self) -> list[LiveFrame]:
        """Generate the next yield: the reference frame, then one block; [] once the stream is over."""
        if self.finished or self._closed:
            return []
        try:
            blocks = next(self._frames)                                       # uint8 [1, n, H, W, 3]
        except StopIteration:
            self.finished = True
            return []
        out = []
        for image in blocks[0]:
            j = self.next_index
            out.append(LiveFrame(j, j / self.fps, image, self._frame_pcm(j)))
            self.next_index += 1
        self.steps += 1
        with self._cond:                       # drop audio no frame and no pipeline pull needs any more
            keep = min(self.next_index * self.spf, self._fed)
            if keep > self._audio_start:
                self._audio = self._audio[keep - self._audio_start:]
                self._audio_start = keep
        return out

    def _frame_pcm(self, index: int) -> np.ndarray:
        """int16 samples [index * spf, (index + 1) * spf) of the received audio, zeros past its end."""
        with self._cond:
            lo = index * self.spf - self._audio_start
            part = self._audio[max(lo, 0):max(lo + self.spf, 0)]
        pcm = np.zeros(self.spf, np.int16)
        pcm[:len(part)] = np.clip(np.round(part * 32768.0), -32768, 32767).astype(np.int16)
        return pcm

    def close(self) -> None:
        """Free the stream's state.  Call it from the thread that steps (the engine does)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._frames is not None:
            try:
                self._frames.close()
            except ValueError:            # running in another thread: it stops at its next audio pull
                return
            self._frames = None
        self._audio = np.zeros(0, np.float32)

"""Media I/O: audio in, reference image in, video out (and back in for tests and metrics).

Everything goes through soundfile / soxr / Pillow and the ffmpeg binary bundled with imageio-ffmpeg,
so no system ffmpeg and no torchvision are needed.
"""
from __future__ import annotations

import math
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import imageio_ffmpeg
import numpy as np
import soundfile as sf
import soxr
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import AvatarForcingError

AUDIO_HINT = "pass an existing .wav/.mp3/.flac"

# ----------------------------------------------------------------------------------------------
# audio


def _check_audio_file(path: Path) -> None:
    if not path.is_file():
        raise AvatarForcingError(f"audio file not found: {path}; {AUDIO_HINT}")


def _ffmpeg_chunks(path: Path, sample_rate: int, block: int) -> Iterator[np.ndarray]:
    """Decode anything ffmpeg understands to float32 mono at ``sample_rate``, ``block`` samples at a time."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path),
           "-vn", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while data := proc.stdout.read(4 * block):
            yield np.frombuffer(data[:len(data) // 4 * 4], dtype=np.float32)
        err = proc.stderr.read()
        if proc.wait() != 0:
            reason = err.decode(errors="replace").strip().splitlines()
            reason = reason[-1] if reason else f"ffmpeg exit code {proc.returncode}"
            raise AvatarForcingError(f"cannot decode audio file {path} ({reason}); {AUDIO_HINT}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()


def audio_chunks(path: os.PathLike | str, sample_rate: int = 16000, block_seconds: float = 10.0) -> Iterator[np.ndarray]:
    """An audio file as float32 mono chunks in [-1, 1] at ``sample_rate``, read block by block.

    soundfile reads wav/flac/mp3/ogg in blocks, stereo is averaged to mono and soxr's streaming resampler
    converts the rate, so memory does not grow with the file's length; anything else (m4a, aac, a video's
    audio track) is decoded by the bundled ffmpeg, also streamed."""
    path = Path(path)
    _check_audio_file(path)
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, ValueError):
        for chunk in _ffmpeg_chunks(path, sample_rate, max(1, int(block_seconds * sample_rate))):
            yield np.clip(chunk, -1.0, 1.0)
        return
    block = max(1, int(block_seconds * info.samplerate))
    resampler = soxr.ResampleStream(info.samplerate, sample_rate, 1, dtype="float32", quality="HQ") \
        if info.samplerate != sample_rate else None
    for data in sf.blocks(str(path), blocksize=block, dtype="float32", always_2d=True):   # [n, C]
        mono = data.mean(axis=1, dtype=np.float32)
        out = resampler.resample_chunk(mono) if resampler is not None else mono
        if len(out):
            yield np.clip(out, -1.0, 1.0)
    if resampler is not None:
        tail = resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        if len(tail):
            yield np.clip(tail, -1.0, 1.0)


def audio_num_samples(path: os.PathLike | str, sample_rate: int = 16000) -> int:
    """Samples of the file at ``sample_rate`` (from the header; formats without one are decoded in chunks)."""
    path = Path(path)
    _check_audio_file(path)
    try:
        info = sf.info(str(path))
        return round(info.frames * sample_rate / info.samplerate)
    except (sf.SoundFileError, RuntimeError, ValueError):
        return sum(len(c) for c in audio_chunks(path, sample_rate))


def check_audio(path: os.PathLike | str) -> None:
    """Fail now (one line) if the file cannot be read or holds no samples, without decoding all of it."""
    path = Path(path)
    try:
        first = next(iter(audio_chunks(path, block_seconds=0.5)), None)
    except (sf.SoundFileError, RuntimeError, ValueError):
        raise AvatarForcingError(f"cannot decode audio file {path}; {AUDIO_HINT}") from None
    if first is None or not len(first):
        raise AvatarForcingError(f"audio file {path} holds no samples; {AUDIO_HINT} with speech in it")


def load_audio(path: os.PathLike | str, sample_rate: int = 16000) -> np.ndarray:
    """Read an audio file as float32 mono in [-1, 1] at ``sample_rate`` -> [N] (one copy: :func:`audio_chunks`
    fills an array sized from the header)."""
    path = Path(path)
    try:
        chunks = audio_chunks(path, sample_rate)
        expected = audio_num_samples(path, sample_rate)
        wav = np.empty(expected + 16, np.float32)                 # the resampler may give a few more
        n = 0
        for c in chunks:
            if n + len(c) > len(wav):
                wav = np.concatenate([wav[:n], np.empty(max(len(c), len(wav) // 2), np.float32)])
            wav[n:n + len(c)] = c
            n += len(c)
    except (sf.SoundFileError, RuntimeError, ValueError):
        raise AvatarForcingError(f"cannot decode audio file {path}; {AUDIO_HINT}") from None
    if n == 0:
        raise AvatarForcingError(f"audio file {path} holds no samples; {AUDIO_HINT} with speech in it")
    return wav[:n]


def write_wav(path: os.PathLike | str, samples, sample_rate: int = 16000) -> None:
    """Write mono (or [N, C]) float samples as 16-bit PCM wav."""
    samples = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(samples.astype(np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16")


# ----------------------------------------------------------------------------------------------
# image


def _to_pil(path_or_array) -> Image.Image:
    if isinstance(path_or_array, Image.Image):
        return path_or_array
    if isinstance(path_or_array, torch.Tensor):
        path_or_array = path_or_array.detach().cpu().numpy()
    if isinstance(path_or_array, np.ndarray):
        arr = path_or_array
        if arr.dtype != np.uint8:  # floats are taken to be in [0, 1]
            arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise AvatarForcingError(
                f"image array has shape {tuple(path_or_array.shape)}; pass [H, W], [H, W, 3] or [H, W, 4]")
        return Image.fromarray(arr)
    path = Path(path_or_array)
    if not path.is_file():
        raise AvatarForcingError(f"image file not found: {path}; pass an existing .png/.jpg")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise AvatarForcingError(f"cannot read image {path} ({exc}); pass a valid .png/.jpg") from None
    return ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels are composited over white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


RESIZE_MODES = ("keep_aspect", "cover")


def keep_aspect_size(image_width: int, image_height: int, height: int, width: int) -> tuple[int, int]:
    """The reference release's size rule -> (H, W): the image's aspect ratio within an area of
    ``height * width`` (480*832 by default), both sides floored to multiples of 16 (at least 16)."""
    scale = math.sqrt(height * width / (image_width * image_height))
    return (max(16, int(image_height * scale + 1e-6) // 16 * 16), max(16, int(image_width * scale + 1e-6) // 16 * 16))


def load_image(path_or_array, height: int, width: int, resize: str = "cover") -> torch.Tensor:
    """Load a reference image -> [3, H, W] in [-1, 1].

    resize="cover": resize to cover ``height x width`` and center-crop to exactly that size;
    resize="keep_aspect" (the reference release): keep the image's aspect ratio within the area
    ``height * width`` (:func:`keep_aspect_size`), so the output size follows the image."""
    if height % 16 or width % 16 or height <= 0 or width <= 0:
        raise AvatarForcingError(
            f"image size {height}x{width} is not a multiple of 16; use e.g. "
            f"{max(16, round(height / 16) * 16)}x{max(16, round(width / 16) * 16)}")
    if resize not in RESIZE_MODES:
        raise AvatarForcingError(f"inference.resize is '{resize}'; use keep_aspect (the release) or cover")
    img = _to_rgb(_to_pil(path_or_array))
    w, h = img.size
    if resize == "keep_aspect":
        height, width = keep_aspect_size(w, h, height, width)
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    else:
        scale = max(height / h, width / w)
        new_w, new_h = max(width, math.ceil(w * scale - 1e-6)), max(height, math.ceil(h * scale - 1e-6))
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
        left, top = (new_w - width) // 2, (new_h - height) // 2
        img = img.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]
    return x.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# video


class VideoWriter:
    """Stream frames into an H.264 mp4, mux the audio, and publish the file atomically.

        with VideoWriter("out.mp4", fps=25, audio_path="speech.wav") as writer:
            for block in blocks:
                writer.write(block)            # uint8 [T, H, W, 3]

    Frames go to ffmpeg as they come (nothing is held in memory). The file is written to a temporary
    name in the same folder and renamed to `path` only when the block exits without an exception and
    at least one frame was written. On close the audio is muxed in (aac), cut to the video's length
    and padded with silence if it is shorter."""

    def __init__(self, path: os.PathLike | str, fps: float, audio_path: os.PathLike | str | None = None,
                 quality: float = 7):
        self.path = Path(path)
        self.fps = fps
        self.quality = quality
        self.audio_path = None if audio_path is None else Path(audio_path)
        if self.audio_path is not None and not self.audio_path.is_file():
            raise AvatarForcingError(f"audio file not found: {self.audio_path}; {AUDIO_HINT} or no audio")
        if fps <= 0:
            raise AvatarForcingError(f"video fps must be positive, got {fps}")
        try:  # fail now, not after minutes of generation
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=self.path.suffix or ".mp4",
                                       dir=self.path.parent)
            os.close(fd)
        except OSError as exc:
            raise AvatarForcingError(
                f"cannot write to output folder {self.path.parent} ({exc.strerror}); choose a writable output path")
        self._tmp = Path(tmp)
        self._gen = None
        self._size = None  # (H, W)
        self.frames_written = 0

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(success=exc_type is None)

    def __del__(self):  # never closed: discard the temp file
        if getattr(self, "_tmp", None) is not None:
            try:
                self.close(success=False)
            except Exception:
                pass

    def _start(self, height: int, width: int) -> None:
        if height % 2 or width % 2:
            raise AvatarForcingError(f"video frames are {height}x{width}; H.264 (yuv420p) needs even sizes")
        self._gen = imageio_ffmpeg.write_frames(
            str(self._tmp), (width, height), fps=self.fps, codec="libx264", pix_fmt_out="yuv420p",
            quality=self.quality, macro_block_size=1, ffmpeg_log_level="error")
        self._gen.send(None)
        self._size = (height, width)

    def _mux_audio(self, video: Path) -> Path:
        """video.mp4 + audio -> new temp file; audio padded with silence and cut to the video length."""
        out = video.with_name(video.stem + ".mux" + video.suffix)
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-i", str(video),
               "-i", str(self.audio_path), "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac",
               "-af", "apad", "-t", f"{self.frames_written / self.fps:.6f}", "-movflags", "+faststart", str(out)]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            out.unlink(missing_ok=True)
            reason = (proc.stderr.decode(errors="replace").strip().splitlines() or ["unknown error"])[-1]
            raise AvatarForcingError(f"cannot mux audio {self.audio_path} into {self.path} ({reason}); {AUDIO_HINT}")
        return out

    def write(self, frames) -> None:
        """Append uint8 frames [T, H, W, 3] (or one frame [H, W, 3]); numpy or torch."""
        if self._tmp is None:
            raise AvatarForcingError(f"VideoWriter for {self.path} is closed; open a new one")
        if isinstance(frames, torch.Tensor):
            frames = frames.detach().cpu().numpy()
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise AvatarForcingError(
                f"VideoWriter.write got {frames.dtype} {tuple(frames.shape)}; pass uint8 [T, H, W, 3] "
                "(convert decoded video with avatarforcing.vae.to_uint8)")
        if self._gen is None:
            self._start(frames.shape[1], frames.shape[2])
        elif frames.shape[1:3] != self._size:
            raise AvatarForcingError(
                f"frame size changed from {self._size} to {frames.shape[1:3]} inside one video; keep it fixed")
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame))
        self.frames_written += len(frames)

    def close(self, success: bool = True) -> None:
        """Finish the file; with success=False (or no frames) nothing is left at `path`."""
        if self._tmp is None:
            return
        tmp, self._tmp = self._tmp, None
        muxed = None
        try:
            if self._gen is not None:
                self._gen.close()  # waits for ffmpeg to finish the video stream
            if success and self.frames_written > 0:
                if self.audio_path is not None:
                    muxed = self._mux_audio(tmp)
                os.replace(muxed or tmp, self.path)
            elif success:
                warnings.warn(f"no frames were written, {self.path} was not created")
        finally:
            tmp.unlink(missing_ok=True)
            if muxed is not None:
                muxed.unlink(missing_ok=True)


def _header(path: Path) -> dict:
    if not path.is_file():
        raise AvatarForcingError(f"video file not found: {path}; pass an existing .mp4")
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        return next(gen)  # ffmpeg's parsed header; frames are not decoded
    except (OSError, RuntimeError, IndexError, StopIteration) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise AvatarForcingError(f"cannot read video {path} ({reason}); pass a valid .mp4") from None
    finally:
        gen.close()


def probe_video(path: os.PathLike | str) -> dict:
    """-> dict(frames, fps, width, height, has_audio)."""
    path = Path(path)
    meta = _header(path)
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    width, height = meta["size"]
    return dict(frames=int(frames), fps=float(meta["fps"]), width=int(width), height=int(height),
                has_audio="audio_codec" in meta)


def read_video(path: os.PathLike | str) -> tuple[np.ndarray, float]:
    """-> (frames uint8 [T, H, W, 3], fps)."""
    path = Path(path)
    _header(path)  # clear error for missing / broken files
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in gen]
    video = np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
    return video, float(meta["fps"])

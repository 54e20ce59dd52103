"""The live WebSocket protocol (docs/protocol.md): message schema, validation, the binary frame layout.

Client -> server: one JSON start message, then binary PCM chunks (whole samples), then ``{"type":"end"}``.
Server -> client: ``{"type":"ready"}``, one binary message per video frame (:func:`pack_frame`: a fixed
24-byte header, the frame's audio as 16 kHz pcm_s16le, the JPEG), ``{"type":"stats"}`` now and then,
and ``{"type":"done"}`` (or ``{"type":"error"}``) before the server closes the socket.

Everything here is pure (no I/O), shared by the server, ``scripts/live_client.py`` and the tests.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import struct
from dataclasses import dataclass

import numpy as np

# WebSocket close codes (RFC 6455) the server uses.
NORMAL = 1000            # the stream is done
UNSUPPORTED_DATA = 1003  # not an image, not PCM, text where binary PCM was expected
POLICY_VIOLATION = 1008  # malformed or out-of-order message, idle timeout
TOO_BIG = 1009           # a message over --max-message-bytes
INTERNAL_ERROR = 1011    # generation failed
TRY_AGAIN_LATER = 1013   # --max-sessions reached

PCM_FORMATS = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
MAX_PROMPT_CHARS = 2000
OUTPUT_SAMPLE_RATE = 16000   # the audio sent back with each frame: 16 kHz mono pcm_s16le

FRAME_MAGIC = b"AVF1"
FRAME_HEADER = struct.Struct("<4sIdII")   # magic, index, pts (s), pcm bytes, jpeg bytes -> 24 bytes


class ProtocolError(Exception):
    """A client mistake: sent to the client as ``{"type":"error","message":...}``, then closed with ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StartMessage:
    image: bytes | None        # an encoded image file; None = the server's example image
    prompt: str = ""
    seed: int = 0
    sample_rate: int = 16000
    format: str = "pcm_s16le"
    channels: int = 1


def _bad(message: str) -> ProtocolError:
    return ProtocolError(POLICY_VIOLATION, f"bad start message: {message}")


def _field(msg: dict, key: str, kind, default):
    value = msg.get(key, default)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise _bad(f"'{key}' must be {'an integer' if kind is int else 'a string'}, got {json.dumps(value)}")
    return value


def parse_start(text: str) -> StartMessage:
    """The first client message -> :class:`StartMessage`; anything malformed is a :class:`ProtocolError`."""
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        raise _bad('it is not JSON; send {"type":"start","image":"example","sample_rate":16000,'
                   '"format":"pcm_s16le","channels":1}') from None
    if not isinstance(msg, dict) or msg.get("type") != "start":
        raise _bad('the first message must be a JSON object with "type":"start"')
    known = {"type", "image", "prompt", "seed", "sample_rate", "format", "channels"}
    if unknown := sorted(set(msg) - known):
        raise _bad(f"unknown field(s) {unknown}; the fields are {sorted(known)}")
    image = _field(msg, "image", str, "example")
    prompt = _field(msg, "prompt", str, "")
    seed = _field(msg, "seed", int, 0)
    rate = _field(msg, "sample_rate", int, 16000)
    fmt = _field(msg, "format", str, "pcm_s16le")
    channels = _field(msg, "channels", int, 1)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise _bad(f"'prompt' has {len(prompt)} characters; send at most {MAX_PROMPT_CHARS}")
    if not 0 <= seed < 2 ** 63:
        raise _bad(f"'seed' is {seed}; use an integer in [0, 2^63)")
    if fmt not in PCM_FORMATS:
        raise ProtocolError(UNSUPPORTED_DATA, f"audio format '{fmt}' is not supported; use one of {sorted(PCM_FORMATS)}")
    if channels != 1:
        raise ProtocolError(UNSUPPORTED_DATA, f"{channels} audio channels are not supported; downmix to mono (channels=1)")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ProtocolError(UNSUPPORTED_DATA, f"sample_rate {rate} is not supported; use {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz")
    return StartMessage(_image_bytes(image), prompt, seed, rate, fmt, channels)


def _image_bytes(image: str) -> bytes | None:
    """'example' -> None; base64 (or a ``data:image/...;base64,`` URL) -> the encoded file's bytes."""
    if image == "example":
        return None
    if image.startswith("data:"):
        image = image.partition(",")[2]
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("'image' is neither \"example\" nor valid base64; send the image file base64-encoded") from None
    if not data:
        raise _bad("'image' is empty; send the image file base64-encoded, or \"example\"")
    return data


def decode_image(data: bytes):
    """Encoded image bytes -> an RGB-ready PIL image (EXIF rotation applied), or a :class:`ProtocolError`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ProtocolError(UNSUPPORTED_DATA, f"'image' is not a readable image ({reason}); "
                                              "send a base64-encoded PNG or JPEG file") from None
    return ImageOps.exif_transpose(img)


def decode_pcm(data: bytes, fmt: str) -> np.ndarray:
    """A binary audio message -> float32 samples in [-1, 1]; a partial sample is a :class:`ProtocolError`."""
    dtype = PCM_FORMATS[fmt]
    if len(data) % dtype.itemsize:
        raise ProtocolError(UNSUPPORTED_DATA, f"audio message of {len(data)} bytes is not whole {fmt} samples "
                                              f"({dtype.itemsize} bytes each); send raw mono {fmt}, whole samples per message")
    samples = np.frombuffer(data, dtype=dtype)
    if fmt == "pcm_s16le":
        return samples.astype(np.float32) / 32768.0
    samples = samples.astype(np.float32)
    if not np.isfinite(samples).all():
        raise ProtocolError(UNSUPPORTED_DATA, "audio message holds NaN or infinite samples; send pcm_f32le in [-1, 1]")
    return np.clip(samples, -1.0, 1.0)


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes (deterministic for a given frame and quality)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pack_frame(index: int, pts: float, pcm: np.ndarray, jpeg: bytes) -> bytes:
    """One binary frame message: header | pcm (int16, little-endian) | jpeg."""
    pcm_bytes = np.asarray(pcm, dtype="<i2").tobytes()
    return FRAME_HEADER.pack(FRAME_MAGIC, index, pts, len(pcm_bytes), len(jpeg)) + pcm_bytes + jpeg


@dataclass(frozen=True)
class FrameMessage:
    index: int
    pts: float
    pcm: np.ndarray      # int16 [n] at OUTPUT_SAMPLE_RATE
    jpeg: bytes


def unpack_frame(data: bytes) -> FrameMessage:
    """Inverse of :func:`pack_frame`."""
    if len(data) < FRAME_HEADER.size:
        raise ValueError(f"frame message of {len(data)} bytes is shorter than its {FRAME_HEADER.size}-byte header")
    magic, index, pts, n_pcm, n_jpeg = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC or len(data) != FRAME_HEADER.size + n_pcm + n_jpeg:
        raise ValueError("not a frame message (bad magic or length)")
    start = FRAME_HEADER.size
    pcm = np.frombuffer(data, dtype="<i2", count=n_pcm // 2, offset=start)
    return FrameMessage(index, pts, pcm, bytes(data[start + n_pcm:]))

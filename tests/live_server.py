"""Helpers for the live-server tests: short speech clips (the server itself: avatarforcing/live/launch.py)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def example_wav(path: Path, seconds: float) -> Path:
    """The first ``seconds`` of assets/example.wav (16 kHz mono) written to ``path``."""
    from avatarforcing.media import load_audio, write_wav

    write_wav(path, load_audio(ROOT / "assets" / "example.wav")[:int(seconds * 16000)])
    return path

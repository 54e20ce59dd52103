"""The live server's limits (``python serve.py --help`` sets them)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import AvatarForcingError


@dataclass
class Settings:
    max_sessions: int = 4
    idle_timeout: float = 30.0          # seconds without a client message
    max_message_bytes: int = 16 << 20   # per client message (a base64 image, a PCM chunk)
    send_queue_frames: int = 0          # frames waiting to be sent per client; 0 = two blocks
    max_buffer_seconds: float = 30.0    # received audio not yet generated before reading pauses
    stats_interval: float = 1.0         # seconds between stats messages
    jpeg_quality: int = 90
    batch_sessions: bool = True         # stack the ready sessions' DiT forwards (avatarforcing/multistream.py)
    batch_wait_ms: float = 5.0          # how long a batch waits for the other ready sessions' forwards

    def check(self) -> "Settings":
        """One-line errors for values that cannot work (named as serve.py's flags)."""
        rules = {"max_sessions": 1, "max_message_bytes": 1, "send_queue_frames": 0}
        for name, low in rules.items():
            if getattr(self, name) < low:
                raise AvatarForcingError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise AvatarForcingError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")
        for name in ("idle_timeout", "max_buffer_seconds", "stats_interval"):
            if not getattr(self, name) > 0:
                raise AvatarForcingError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise AvatarForcingError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        return self

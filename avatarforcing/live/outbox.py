"""Backpressure on the way out: the bounded queue of messages waiting for one client."""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from .session import LiveFrame


@dataclass(frozen=True)
class Close:
    code: int
    message: dict | None      # sent before closing; None: the client is gone, just stop


class Outbox:
    """Messages waiting for one client, in order.  At most ``max_frames`` frames wait: a new frame pushes
    out the oldest waiting one (counted in ``dropped``).  Stats and the closing message are never dropped;
    after the closing message nothing more is queued."""

    def __init__(self, max_frames: int):
        self.max_frames = max_frames
        self.items: deque = deque()
        self.frames = self.dropped = 0
        self.closed = False
        self._event = asyncio.Event()

    def put_frame(self, frame: LiveFrame) -> None:
        if self.closed:
            return
        if self.frames >= self.max_frames:
            oldest = next(i for i, item in enumerate(self.items) if isinstance(item, LiveFrame))
            del self.items[oldest]
            self.frames -= 1
            self.dropped += 1
        self.items.append(frame)
        self.frames += 1
        self._event.set()

    def close(self, code: int, message: dict | None, flush: bool) -> None:
        """Queue the last message; ``flush=False`` discards what waits (an error ends the stream now)."""
        if self.closed:
            return
        if not flush:
            self.items.clear()
            self.frames = 0
        self.items.append(Close(code, message))
        self.closed = True
        self._event.set()

    async def get(self, timeout: float):
        """The next item, or None after ``timeout`` seconds without one."""
        if not self.items:
            self._event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
            if not self.items:
                return None
        item = self.items.popleft()
        if isinstance(item, LiveFrame):
            self.frames -= 1
        return item

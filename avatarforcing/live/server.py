"""The live server: a FastAPI app with the WebSocket endpoint ``/ws`` (docs/protocol.md) and the page ``/``.

    app = create_app(pipe, Settings(max_sessions=4))     # uvicorn.run(app) -- serve.py does that

One model process, one :class:`~avatarforcing.live.engine.Engine` thread that generates for every
session; the asyncio side only moves bytes.  Per connection:

* receive: the start message, then PCM chunks pushed into the session as they arrive; a block is
  generated as soon as its window's audio is there.  A client that sends faster than the stream is
  generated is slowed by TCP: reading pauses while more than ``max_buffer_seconds`` wait.
* send: a bounded :class:`Outbox`.  A slow reader loses the oldest waiting frames (``dropped`` in the
  stats) instead of growing a buffer; control messages are never dropped.
* limits: ``max_sessions`` connections (more are refused with 1013), ``idle_timeout`` seconds without a
  client message (1008), ``max_message_bytes`` per message (1009).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

import numpy as np
from fastapi import FastAPI, WebSocket
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.websockets import WebSocketDisconnect

from .. import AvatarForcingError
from ..config import resource_path
from ..multistream import StreamBatcher
from . import protocol as P
from .engine import Engine
from .outbox import Close, Outbox
from .session import LiveFrame, LiveSession
from .settings import Settings

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
EXAMPLE_IMAGE = resource_path("assets/example.png", required=False)


SERVER_ID = f"{socket.gethostname()}:{os.getpid()}"     # which process serves a session (one per Ray replica)


def _error(message: str) -> dict:
    return {"type": "error", "message": message}


# ---- one connection --------------------------------------------------------------------------------


class Connection:
    """One client's WebSocket and its :class:`LiveSession`."""

    def __init__(self, server: "LiveServer", ws: WebSocket):
        self.server, self.ws, self.settings = server, ws, server.settings
        self.loop = asyncio.get_running_loop()
        self.session: LiveSession | None = None
        self.outbox = Outbox(self.settings.send_queue_frames or 2 * server.pipe.block_video_frames)
        self.sent = 0
        self.started = time.monotonic()
        self.generated: deque = deque()     # (time, frames generated so far), for the recent fps

    async def run(self) -> None:
        try:
            start = P.parse_start(await self._first_message())
            self.format = start.format
            self.session = s = await asyncio.to_thread(self._open, start)
            await self.ws.send_json({"type": "ready", "width": s.width, "height": s.height, "fps": s.fps,
                                     "block_frames": s.block_frames, "audio_sample_rate": P.OUTPUT_SAMPLE_RATE,
                                     "audio_format": "pcm_s16le",
                                     "algorithmic_latency_s": round(s.algorithmic_latency, 3),
                                     "server": SERVER_ID})
        except P.ProtocolError as exc:
            await self._send_and_close(exc.code, _error(str(exc)))
            return
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        self.generated.append((time.monotonic(), 0))
        self.server.engine.add(s, self._deliver)
        receiver = asyncio.create_task(self._receive_loop())
        try:
            await self._send_loop()
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver

    def release(self) -> None:
        if self.session is not None:
            self.server.engine.remove(self.session)
            self.session = None

    # ---- receiving ---------------------------------------------------------------------------------
    async def _receive(self, timeout: float | None) -> dict:
        msg = await asyncio.wait_for(self.ws.receive(), timeout)
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        data = msg.get("bytes") if msg.get("bytes") is not None else msg.get("text")
        size = len(data.encode() if isinstance(data, str) else data or b"")
        if size > self.settings.max_message_bytes:
            raise P.ProtocolError(P.TOO_BIG, f"message of {size} bytes is over the server's limit of "
                                             f"{self.settings.max_message_bytes}; send smaller audio chunks or a smaller image")
        return msg

    async def _first_message(self) -> str:
        try:
            msg = await self._receive(self.settings.idle_timeout)
        except asyncio.TimeoutError:
            raise P.ProtocolError(P.POLICY_VIOLATION, f"no start message for {self.settings.idle_timeout:g} s; "
                                                      'send {"type":"start",...} right after connecting') from None
        if msg.get("text") is None:
            raise P.ProtocolError(P.POLICY_VIOLATION, 'the first message must be the JSON start message '
                                                      '{"type":"start",...}, not binary audio')
        return msg["text"]

    def _open(self, start: P.StartMessage) -> LiveSession:
        image = EXAMPLE_IMAGE if start.image is None else P.decode_image(start.image)
        try:
            return LiveSession(self.server.session_pipe, image, start.prompt, start.seed, start.sample_rate)
        except AvatarForcingError as exc:
            raise P.ProtocolError(P.UNSUPPORTED_DATA, f"cannot use the image: {exc}") from None

    async def _receive_loop(self) -> None:
        """Client messages until it disconnects; a protocol mistake or idleness closes with an error."""
        ended = False
        try:
            while True:
                while not ended and self.session.buffered_seconds > self.settings.max_buffer_seconds:
                    await asyncio.sleep(0.02)          # backpressure: stop reading until generation catches up
                try:
                    msg = await self._receive(None if ended else self.settings.idle_timeout)
                except asyncio.TimeoutError:
                    raise P.ProtocolError(P.POLICY_VIOLATION, f"no message for {self.settings.idle_timeout:g} s; "
                                                              'keep sending audio, or send {"type":"end"}') from None
                if ended:
                    raise P.ProtocolError(P.POLICY_VIOLATION, 'message after {"type":"end"}; open a new connection '
                                                              "for a new stream")
                if msg.get("bytes") is not None:
                    self.session.push_audio(P.decode_pcm(msg["bytes"], self.format))
                elif _is_end(msg["text"]):
                    self.session.end_audio()
                    ended = True
                else:
                    raise P.ProtocolError(P.UNSUPPORTED_DATA, f"expected binary {self.format} audio or "
                                                              f'{{"type":"end"}}, got text {msg["text"][:60]!r}')
                self.server.engine.wake()
        except P.ProtocolError as exc:
            self.outbox.close(exc.code, _error(str(exc)), flush=False)
        except WebSocketDisconnect:
            self.outbox.close(P.NORMAL, None, flush=False)

    # ---- generation results (engine thread -> event loop) -----------------------------------------
    def _deliver(self, event) -> None:
        """Runs in the engine thread."""
        with contextlib.suppress(RuntimeError):           # the event loop is gone: nobody to send to
            self.loop.call_soon_threadsafe(self._on_generated, event)

    def _on_generated(self, event) -> None:
        if isinstance(event, Exception):
            reason = str(event).splitlines()[0] if str(event) else type(event).__name__
            self.outbox.close(P.INTERNAL_ERROR, _error(f"generation failed: {reason}"), flush=False)
        elif event is None:
            self.outbox.close(P.NORMAL, {"type": "done"}, flush=True)      # stats added when it is sent
        else:
            for frame in event:
                self.outbox.put_frame(frame)
            if self.session is not None:
                self.generated.append((time.monotonic(), self.session.next_index))

    def stats(self) -> dict:
        s, now = self.session, time.monotonic()
        while len(self.generated) > 1 and now - self.generated[0][0] > 3.0:   # fps over the last ~3 s
            self.generated.popleft()
        frames = s.next_index if s is not None else 0
        span = now - self.generated[0][0] if self.generated else 0.0
        fps = (frames - self.generated[0][1]) / span if span > 0 else 0.0
        backlog = s.backlog_blocks() if s is not None else 0
        return {"frames_generated": frames, "frames_sent": self.sent, "dropped": self.outbox.dropped,
                "fps": round(fps, 2), "audio_s": round(s.received_seconds, 3) if s else 0.0,
                "video_s": round(frames / s.fps, 3) if s else 0.0,
                "backlog_s": round(backlog * s.block_frames / s.fps, 3) if s else 0.0,
                # audio for 2+ blocks waits and, over at least 1 s, frames come slower than real time
                # (not judged after the end: the drain of the last blocks)
                "behind_realtime": bool(s is not None and not s.ended and backlog >= 2 and span >= 1.0
                                        and fps < s.fps),
                "starved": s.starved if s else 0, "elapsed_s": round(now - self.started, 3)}

    # ---- sending ------------------------------------------------------------------------------------
    async def _send_loop(self) -> None:
        interval, last = self.settings.stats_interval, time.monotonic()
        try:
            while True:
                item = await self.outbox.get(max(0.0, interval - (time.monotonic() - last)))
                if isinstance(item, Close):
                    if item.message is not None:
                        done = item.message["type"] == "done"
                        await self._send_and_close(item.code, {**item.message, **self.stats()} if done else item.message)
                    return
                if isinstance(item, LiveFrame):
                    jpeg = await asyncio.to_thread(P.encode_jpeg, item.image, self.settings.jpeg_quality)
                    await self.ws.send_bytes(P.pack_frame(item.index, item.pts, item.pcm, jpeg))
                    self.sent += 1
                if time.monotonic() - last >= interval:
                    await self.ws.send_json({"type": "stats", **self.stats()})
                    last = time.monotonic()
        except (WebSocketDisconnect, RuntimeError, OSError):
            return                                          # the client is gone

    async def _send_and_close(self, code: int, message: dict) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.ws.send_json(message)
            await self.ws.close(code)


def _is_end(text: str) -> bool:
    with contextlib.suppress(json.JSONDecodeError, TypeError, AttributeError):
        return json.loads(text).get("type") == "end"
    return False


# ---- the server -------------------------------------------------------------------------------------


class LiveServer:
    """Shared state of one server process: the pipeline, the engine, the connection count.

    With ``settings.batch_sessions`` the sessions' pipelines share a :class:`StreamBatcher`: ready sessions step
    together and their DiT forwards run as one batched forward (avatarforcing/multistream.py)."""

    def __init__(self, pipe, settings: Settings):
        self.pipe, self.settings = pipe, settings.check()
        self.batcher = StreamBatcher(pipe.model, settings.batch_wait_ms / 1000) if settings.batch_sessions else None
        self.session_pipe = pipe.replace(model=self.batcher.proxy()) if self.batcher else pipe
        self.engine = Engine(self.batcher)
        self.connections = 0

    def warm_up(self) -> None:
        """Run one block (a grey image, silence) so the first client does not pay the first-call costs."""
        pipe = self.pipe
        grey = np.full((pipe.height, pipe.width, 3), 128, np.uint8)
        for _ in pipe.stream(grey, np.zeros(pipe.audio_encoder.samples_per_frame, np.float32), num_blocks=1):
            pass

    def info(self) -> dict:
        pipe = self.pipe
        return {"fps": pipe.fps, "block_frames": pipe.block_video_frames, "connections": self.connections,
                "engine_sessions": len(self.engine), "settings": asdict(self.settings),
                "batching": dict(self.batcher.stats) if self.batcher else None,
                "audio_formats": sorted(P.PCM_FORMATS)}

    async def handle(self, ws: WebSocket) -> None:
        await ws.accept()
        if self.connections >= self.settings.max_sessions:
            message = (f"server busy: all {self.settings.max_sessions} live sessions are in use; try again later "
                       "(the server's --max-sessions)")
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await ws.send_json(_error(message))
                await ws.close(P.TRY_AGAIN_LATER)
            return
        self.connections += 1
        conn = Connection(self, ws)
        try:
            await conn.run()
        finally:
            conn.release()
            self.connections -= 1


def create_app(pipe, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving ``/`` (the browser page), ``/static``, ``/api/info`` and ``/ws``."""
    live = LiveServer(pipe, settings or Settings())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        live.engine.start()
        try:
            yield
        finally:
            live.engine.stop()

    app = FastAPI(title="AvatarForcing live", lifespan=lifespan)
    app.state.live = live
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/example.png", include_in_schema=False)
    async def example():
        return FileResponse(EXAMPLE_IMAGE)

    @app.get("/api/info")
    async def info():
        return live.info()

    @app.websocket("/ws")
    async def ws_endpoint(ws: WebSocket):
        await live.handle(ws)

    return app

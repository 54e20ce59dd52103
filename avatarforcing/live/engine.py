"""The worker loop of one model process: every live session is stepped from this one thread.

    engine = Engine(); engine.start()
    engine.add(session, deliver)       # deliver(event) runs in the engine thread: a list of LiveFrame,
                                       # None when the stream is done, or the exception that ended it
    session.push_audio(...); engine.wake()
    engine.remove(session)             # closed (its state freed) in the engine thread
    engine.stop()

Each turn of the loop takes the sessions whose next block's audio has arrived (``session.ready()``) and
runs :meth:`Engine.step_ready` on them: one block per ready session.  With a
:class:`~avatarforcing.multistream.StreamBatcher` (the server's default) the ready sessions step at once, each
on a worker thread, and their DiT forwards (window passes, clean re-run) are stacked into batched forwards;
audio encoding and VAE decoding stay per session.  Without one they step in turn (round robin, so one long
stream cannot starve the others).  Scale-out (avatarforcing/live/ray_deployment.py) runs one engine per replica.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .. import AvatarForcingError
from .session import LiveSession

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, batcher=None, max_workers: int = 16):
        """``batcher``: an :class:`~avatarforcing.multistream.StreamBatcher` whose proxy the sessions' pipelines
        use (their forwards are then stacked), or None (sessions step one after another)."""
        self.batcher, self.max_workers = batcher, max_workers
        self._pool: ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self._sessions: dict[LiveSession, Callable] = {}
        self._removed: list[LiveSession] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    def __len__(self) -> int:
        """Sessions attached (removed ones count until the engine thread has closed them)."""
        with self._cond:
            return len(self._sessions) + len(self._removed)

    def start(self) -> "Engine":
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="avatarforcing-live-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every session and end the thread."""
        with self._cond:
            self._stopping = True
            self._removed.extend(self._sessions)
            self._sessions.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._close_removed()          # if the thread had not started or did not finish in time
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def add(self, session: LiveSession, deliver: Callable) -> None:
        with self._cond:
            self._sessions[session] = deliver
            self._cond.notify_all()

    def remove(self, session: LiveSession) -> None:
        with self._cond:
            if self._sessions.pop(session, None) is not None:
                self._removed.append(session)
            self._cond.notify_all()

    def wake(self) -> None:
        """New audio (or its end) arrived: look at the ready set again."""
        with self._cond:
            self._cond.notify_all()

    # ---- the engine thread ---------------------------------------------------------------------------
    def _close_removed(self) -> None:
        with self._cond:
            removed, self._removed = self._removed, []
        for session in removed:
            session.close()

    def _run(self) -> None:
        while True:
            self._close_removed()
            with self._cond:
                if self._stopping:
                    return
                ready = [(s, d) for s, d in self._sessions.items() if s.ready()]
                if not ready:
                    self._cond.wait(timeout=1.0)     # add / remove / wake notify
                    continue
            self.step_ready(ready)

    def step_ready(self, ready: list[tuple[LiveSession, Callable]]) -> None:
        """One block for each ready session, then deliver it: together (batched forwards) or in turn."""
        with self._cond:
            ready = [(s, d) for s, d in ready if s in self._sessions]      # not removed meanwhile
        if self.batcher is None or len(ready) == 1:
            for session, deliver in ready:
                self._deliver(session, deliver, self._step(session))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="avatarforcing-live-step")
        self.batcher.join(len(ready))                 # counted before any starts: their first forwards meet
        futures = [self._pool.submit(self._step_then_leave, session) for session, _ in ready]
        for (session, deliver), future in zip(ready, futures):
            self._deliver(session, deliver, future.result())

    def _step_then_leave(self, session: LiveSession):
        try:
            return self._step(session)
        finally:
            self.batcher.leave()                      # batches stop waiting for this session

    @staticmethod
    def _step(session: LiveSession):
        try:
            return session.step()
        except Exception as exc:                     # reported to that client; the engine goes on
            if not isinstance(exc, AvatarForcingError):
                log.exception("live session failed")
            return exc

    def _deliver(self, session: LiveSession, deliver: Callable, result) -> None:
        if isinstance(result, Exception):
            self.remove(session)
            deliver(result)
        elif session.finished:
            self.remove(session)
            deliver(None)
        else:
            deliver(result)


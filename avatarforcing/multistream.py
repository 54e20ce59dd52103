"""Several streams, one model: their streaming forwards stacked into batched forwards.

Each stream runs its own :class:`~avatarforcing.sampler.StreamingSampler` (on its own thread, e.g. one live
session each) with a :class:`BatchedDiT` in place of the model.  Its window forwards, clean re-runs and anchor
prefills become :class:`~avatarforcing.model.ForwardCall` s that the :class:`StreamBatcher` collects and runs
together: calls with the same layout are concatenated along the batch axis, run as one
:meth:`WanDiT.forward <avatarforcing.model.WanDiT.forward>`, and split again.

Streams at different positions stack because every cached key is rotated at a position relative to its
window (docs/spec.md section 5): in the steady state all streams share the RoPE layout
[anchor at d | T temporal frames | L*B window frames] whatever their absolute frame.  The layout key of a call
is its kind (flow or K/V), input shape and dtype, frame positions, context length and whether it is compiled;
streams in warm-up or drain (other window widths) run in their own groups.  Results equal those of each stream
run alone (tested), up to the floating-point effects of a larger batch.

Batching policy: the batcher runs what is pending as soon as every participating stream (:meth:`StreamBatcher.
participant`) has a call waiting, or ``max_wait_s`` after the first call arrived, so a stream busy elsewhere
(decoding, waiting for audio) holds the others back by ``max_wait_s`` at most.
Inference only: forwards run under ``torch.no_grad()`` on the batcher's thread.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch

from .attention import KV
from .model import ForwardCall, WanDiT


@dataclass
class _Pending:
    call: ForwardCall
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple | None = None
    error: BaseException | None = None


def layout_key(call: ForwardCall) -> tuple:
    """Calls with equal keys can be concatenated along the batch axis."""
    ctx = None if call.ctx is None else (call.ctx[0][0].shape[1], call.ctx[0][0].dtype)
    text = ("emb", tuple(call.text.shape[1:])) if isinstance(call.text, torch.Tensor) else \
        ("kv", tuple(call.text[0][0].shape[1:]))
    return (call.kv, tuple(call.x.shape[1:]), call.x.dtype, tuple(call.frame_pos.tolist()), ctx, text,
            call.audio is None, call.compiled)


def stack_calls(calls: list[ForwardCall]) -> ForwardCall:
    """One call over the batch of ``calls`` (which share a :func:`layout_key`)."""
    if len(calls) == 1:
        return calls[0]
    first = calls[0]

    def cat_pairs(per_call: list[list]) -> list:        # per call, per block (k, v) -> per block stacked (k, v)
        return [(torch.cat([c[i][0] for c in per_call]), torch.cat([c[i][1] for c in per_call]))
                for i in range(len(per_call[0]))]
    text = (torch.cat([c.text for c in calls]) if isinstance(first.text, torch.Tensor)
            else cat_pairs([list(c.text) for c in calls]))
    return ForwardCall(
        x=torch.cat([c.x for c in calls]), t=torch.cat([c.t for c in calls]),
        audio=None if first.audio is None else torch.cat([c.audio for c in calls]),
        text=text, frame_pos=first.frame_pos,
        ctx=None if first.ctx is None else cat_pairs([c.ctx for c in calls]),
        kv=first.kv, compiled=first.compiled)


def split_result(result: tuple, sizes: list[int]) -> list[tuple]:
    """(flow, kv) of a stacked call -> one (flow, kv) per call, by batch sizes."""
    flow, kv = result
    out, start = [], 0
    for n in sizes:
        sl = slice(start, start + n)
        out.append((None if flow is None else flow[sl],
                    None if kv is None else KV([k[sl] for k in kv.k], [v[sl] for v in kv.v], kv.frames)))
        start += n
    return out


class StreamBatcher:
    """Runs the streaming forwards of the registered streams as batched forwards on one thread.

    with batcher.stream() as model:          # a BatchedDiT for this stream's sampler
        sampler = StreamingSampler(model, ...)
    """

    def __init__(self, model: WanDiT, max_wait_s: float = 0.005):
        self.model, self.max_wait_s = model, float(max_wait_s)
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._streams = 0
        self._closed = False
        self.stats = {"forwards": 0, "calls": 0, "max_batch": 0}
        self._thread = threading.Thread(target=self._loop, name="stream-batcher", daemon=True)
        self._thread.start()

    def proxy(self) -> "BatchedDiT":
        """A stand-in model whose streaming forwards go through this batcher (one per stream or shared)."""
        return BatchedDiT(self)

    def join(self, count: int = 1) -> None:
        """Count ``count`` more streams among those a batch waits for.  Count streams that are about to run
        forwards (e.g. the ready sessions' steps, all before any of them starts, so that their first forwards
        meet), not idle ones (waiting for audio); each one calls :meth:`leave` when it is done."""
        with self._cond:
            self._streams += count

    def leave(self, count: int = 1) -> None:
        with self._cond:
            self._streams -= count
            self._cond.notify_all()

    @contextlib.contextmanager
    def participant(self):
        """:meth:`join` for the duration of the block, then :meth:`leave`."""
        self.join()
        try:
            yield
        finally:
            self.leave()

    @contextlib.contextmanager
    def stream(self):
        """A participant for the duration of the block; yields its :class:`BatchedDiT`."""
        with self.participant():
            yield self.proxy()

    def submit(self, call: ForwardCall) -> tuple:
        """Run ``call`` in the next batch; blocks until its (flow, kv) is ready."""
        item = _Pending(call)
        with self._cond:
            if self._closed:
                raise RuntimeError("the stream batcher is closed")
            self._pending.append(item)
            self._cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    # ---- the batcher's thread -------------------------------------------------------------------
    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._pending) < self._streams and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, self._pending = self._pending, []
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            groups: dict[tuple, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(layout_key(item.call), []).append(item)
            for items in groups.values():
                self._run_group(items)

    def _run_group(self, items: list[_Pending]) -> None:
        try:
            with torch.no_grad():
                result = self.model.run(stack_calls([i.call for i in items]))
            parts = split_result(result, [i.call.x.shape[0] for i in items])
            for item, part in zip(items, parts):
                item.result = part
        except BaseException as exc:        # every waiting stream gets the error, the batcher goes on
            for item in items:
                item.error = exc
        self.stats["forwards"] += 1
        self.stats["calls"] += len(items)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(items))
        for item in items:
            item.done.set()


class BatchedDiT:
    """Stands in for the :class:`WanDiT` of one stream: the streaming forwards go through the batcher, every
    other attribute (``text_kv``, ``tokens_per_frame``, ``device``, ``dtype``, ``cfg``) is the model's."""

    def __init__(self, batcher: StreamBatcher):
        self._batcher, self._model = batcher, batcher.model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def window(self, noisy, ref, t, audio, cache) -> torch.Tensor:
        return self._batcher.submit(self._model.window_call(noisy, ref, t, audio, cache))[0]

    def window_kv(self, clean, ref, t, audio, cache) -> KV:
        return self._batcher.submit(self._model.window_call(clean, ref, t, audio, cache, kv=True))[1]

    def reference_kv(self, ref, audio, cache) -> KV:
        return self._batcher.submit(self._model.reference_call(ref, audio, cache))[1]

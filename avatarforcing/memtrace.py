"""Allocation tracer: live tensor-storage bytes and their peak, op by op, on real or ``meta`` tensors.

    tracer = MemoryTracer()
    tracer.track(model)                          # tensors that exist already (weights) count as live
    with tracer:
        with tracer.section("forward"):
            model(x)
    tracer.peak_bytes, tracer.sections["forward"]   # bytes; a section: {"start", "peak", "end"}

How it counts: every tensor an op returns is counted by its storage (views share one) from the op that
creates it until the storage is freed, rounded up to ``block_bytes`` (512: CUDA's caching allocator);
the peak is the largest live total right after any op, when the op's inputs and outputs are alive
together.  Kernel-internal scratch memory (cuBLAS / cuDNN workspaces) and the allocator's reserve are
not tensors and are not counted; on CUDA ``torch.cuda.max_memory_allocated`` is the ground truth.

On ``meta`` tensors no data is computed, so a full-size model runs in seconds and allocates nothing:
the numbers are those of the same computation on a GPU.  Two things make meta follow the GPU path:

* ``scaled_dot_product_attention`` (on meta and cpu) runs as the flash kernel, as CUDA does in bf16:
  output + float32 logsumexp [B, H, S_q], never an S_q x S_k matrix (meta would otherwise decompose
  into the math path);
* ``torch.autocast('meta', ...)`` is rejected by torch; inside the tracer it is treated as cpu's
  (the model only opens ``enabled=False`` regions, which change nothing).

``devices`` restricts the count to storages on those device types (e.g. ``("cuda",)`` or ``("meta",)``),
so host-side temporaries (RoPE tables computed on the CPU before their copy) are left out.

:func:`measure_stream` runs one stream of the pipeline's components under a tracer, phase by phase
(scripts/bench_memory.py at full size on meta; on a GPU next to ``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .units import LATENT_STRIDE

GiB = 2 ** 30
MiB = 2 ** 20


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA through the flash kernel: out [B, H, S_q, D] + logsumexp [B, H, S_q] (fp32), no score matrix."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out


class _FlashAttention(TorchFunctionMode):
    """Route SDPA on meta / cpu tensors through the flash kernel (CUDA keeps its own choice)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type in ("meta", "cpu"):
            return _flash_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


class _MetaSafeAutocast(torch.amp.autocast_mode.autocast):
    """torch.autocast that accepts device_type 'meta' (as cpu)."""

    def __init__(self, device_type, *args, **kwargs):
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


class MemoryTracer(TorchDispatchMode):
    """Counts live tensor storages created by ops (and the ones passed to :meth:`track`); keeps the peak."""

    def __init__(self, block_bytes: int = 512, devices: tuple[str, ...] | None = None, flash_attention: bool = True):
        super().__init__()
        self.block_bytes = max(1, int(block_bytes))
        self.devices = None if devices is None else tuple(devices)
        self.flash_attention = flash_attention
        # StorageImpl pointer -> (weak ref, bytes).  Tensors given to track() (weights) are swept only at
        # section boundaries; op outputs lazily: ``_dynamic_bytes`` may still include freed storages (an
        # upper bound) and is made exact whenever it could raise a peak, so the peaks are exact.
        self._static: dict[int, tuple[StorageWeakRef, int]] = {}
        self._dynamic: dict[int, tuple[StorageWeakRef, int]] = {}
        self._static_bytes = 0
        self._dynamic_bytes = 0
        self.peak_bytes = 0
        self.sections: dict[str, dict[str, int]] = {}
        self._open: list[str] = []
        self._stack: contextlib.ExitStack | None = None

    # ---- counting --------------------------------------------------------------------------
    def _bytes(self, nbytes: int) -> int:
        b = self.block_bytes
        return (nbytes + b - 1) // b * b

    def _add(self, t: torch.Tensor, static: bool = False) -> None:
        if self.devices is not None and t.device.type not in self.devices:
            return
        storage = _storage(t)
        if storage is None:                              # a wrapper subclass (fp8 weights): count its inner tensors
            for inner in _inner_tensors(t):
                self._add(inner, static)
            return
        key, nbytes = storage._cdata, self._bytes(storage.nbytes())
        entry = self._static.get(key)
        if entry is not None and not entry[0].expired():
            if entry[1] != nbytes:                       # resized in place
                self._static[key] = (entry[0], nbytes)
                self._static_bytes += nbytes - entry[1]
            return
        table = self._static if static else self._dynamic
        entry = self._dynamic.get(key)
        if entry is not None:
            if not entry[0].expired():
                if entry[1] != nbytes:
                    self._dynamic[key] = (entry[0], nbytes)
                    self._dynamic_bytes += nbytes - entry[1]
                if not static:
                    return
            del self._dynamic[key]
            self._dynamic_bytes -= entry[1]
        if static:
            self._static_bytes += nbytes
        else:
            self._dynamic_bytes += nbytes
        table[key] = (StorageWeakRef(storage), nbytes)

    @staticmethod
    def _sweep_table(table: dict) -> int:
        """Drop freed storages; return their bytes."""
        dead = [k for k, (ref, _) in table.items() if ref.expired()]
        return sum(table.pop(k)[1] for k in dead)

    def _sweep(self) -> None:
        self._static_bytes -= self._sweep_table(self._static)
        self._dynamic_bytes -= self._sweep_table(self._dynamic)

    @property
    def current(self) -> int:
        """Live bytes (an upper bound between sweeps; exact after :meth:`live_bytes`)."""
        return self._static_bytes + self._dynamic_bytes

    def _update_peak(self) -> None:
        """After an op: make the count exact if it could exceed a peak, then raise the peaks."""
        floor = min([self.peak_bytes] + [self.sections[n]["peak"] for n in self._open])
        if self.current <= floor:
            return
        self._dynamic_bytes -= self._sweep_table(self._dynamic)
        now = self.current
        self.peak_bytes = max(self.peak_bytes, now)
        for name in self._open:
            sec = self.sections[name]
            sec["peak"] = max(sec["peak"], now)

    def track(self, *objs) -> "MemoryTracer":
        """Count tensors that already exist: tensors, modules (parameters and buffers), or containers of them."""
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                obj = [*obj.parameters(), *obj.buffers()]
            for leaf in pytree.tree_leaves(obj):
                if isinstance(leaf, torch.Tensor):
                    self._add(leaf, static=True)
        self._sweep()
        self._update_peak()
        return self

    def live_bytes(self) -> int:
        """Bytes alive now (freed storages swept first)."""
        self._sweep()
        return self.current

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes()

    def begin(self, name: str) -> dict[str, int]:
        """Open a section: live bytes at entry, the peak until :meth:`end`, live bytes at exit."""
        start = self.live_bytes()
        self.peak_bytes = max(self.peak_bytes, start)
        self.sections[name] = {"start": start, "peak": start, "end": start}
        self._open.append(name)
        return self.sections[name]

    def end(self, name: str) -> dict[str, int]:
        self._open.remove(name)
        sec = self.sections[name]
        sec["end"] = self.live_bytes()
        self.peak_bytes = max(self.peak_bytes, sec["end"])
        return sec

    @contextlib.contextmanager
    def section(self, name: str):
        """``with tracer.section(name):`` = begin / end around the block (sections may nest)."""
        sec = self.begin(name)
        try:
            yield sec
        finally:
            self.end(name)

    # ---- the mode ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        self._update_peak()
        return out

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        if self.flash_attention:
            self._stack.enter_context(_FlashAttention())
        self._stack.enter_context(_patched_autocast())
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._sweep()
            self._stack.close()

    def report(self, unit: int = GiB) -> dict:
        """Peak, live bytes and sections in ``unit`` (GiB by default)."""
        return {"peak": self.peak_bytes / unit, "live": self.live_bytes() / unit,
                "sections": {k: {kk: vv / unit for kk, vv in v.items()} for k, v in self.sections.items()}}


@contextlib.contextmanager
def _patched_autocast():
    saved = torch.autocast
    torch.autocast = _MetaSafeAutocast
    try:
        yield
    finally:
        torch.autocast = saved


def _storage(t: torch.Tensor):
    """The tensor's storage, or None for wrapper subclasses (e.g. torchao's Float8Tensor) that have none."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    if not hasattr(t, "__tensor_flatten__"):
        return []
    names, _ = t.__tensor_flatten__()
    return [getattr(t, n) for n in names if isinstance(getattr(t, n, None), torch.Tensor)]


def tensor_bytes(*objs, block_bytes: int = 1) -> int:
    """Bytes of the distinct storages of tensors / modules / containers (weights of a model, a KV cache)."""
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        s = _storage(t)
        if s is None:
            for inner in _inner_tensors(t):
                add(inner)
        elif s._cdata not in seen:
            seen.add(s._cdata)
            total += (s.nbytes() + block_bytes - 1) // block_bytes * block_bytes

    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            obj = [*obj.parameters(), *obj.buffers()]
        for leaf in pytree.tree_leaves(obj):
            if isinstance(leaf, torch.Tensor):
                add(leaf)
    return total


# ----------------------------------------------------------------------------------------------
# the memory of a stream, phase by phase


class _Phases:
    """Per phase name: the occurrence with the largest peak, the largest rise above its start, a count."""

    def __init__(self, tracer: MemoryTracer):
        self.tracer, self.stats = tracer, {}

    def fold(self, name: str, sec: dict) -> None:
        rise = sec["peak"] - sec["start"]
        old = self.stats.get(name)
        if old is None or sec["peak"] >= old["peak"]:
            self.stats[name] = {**sec, "transient": max(rise, old["transient"] if old else 0),
                                "count": (old["count"] if old else 0) + 1}
        else:
            old["transient"], old["count"] = max(old["transient"], rise), old["count"] + 1

    @contextlib.contextmanager
    def __call__(self, name: str):
        with self.tracer.section(name) as sec:
            yield sec
        self.fold(name, sec)


def _dit_phase(args, kwargs) -> str:
    """Which streaming forward a ``WanDiT.forward`` call is: its K/V without context is the anchor prefill,
    with context the clean re-run; a flow is the window forward."""
    if not kwargs.get("kv"):
        return "dit.window_forward"
    ctx = args[5] if len(args) > 5 else kwargs.get("ctx")
    return "dit.anchor_prefill" if ctx is None else "dit.clean_rerun"


def _fabricate(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on another device; random data of its shape where it cannot be copied (from or to meta)."""
    dtype = dtype or t.dtype
    if t.device == device:
        return t.to(dtype)
    if "meta" in (t.device.type, device.type):
        return torch.randn(t.shape, device=device, dtype=dtype)
    return t.to(device, dtype)


def _to_uint8_like(frames: torch.Tensor) -> torch.Tensor:
    """The device-side work of ``vae.to_uint8`` (the pipeline's per-block frame conversion)."""
    x = ((frames.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).movedim(-4, -1)
    return x if x.device.type == "meta" else x.cpu()


@torch.no_grad()
def measure_stream(model, vae, audio_encoder, schedule, cache_cfg, *, height: int = 480, width: int = 832,
                   max_steps: int | None = None, tracer: MemoryTracer | None = None) -> dict:
    """Memory of one batch-1 stream, phase by phase, as ``AvatarPipeline.stream`` runs it: bytes.

    The components may live on ``meta`` (no compute: the full-size numbers in seconds on a CPU), on a
    GPU (then compare ``torch.cuda.max_memory_allocated``), or on the CPU.  Inputs are random; the
    reference image is encoded by the VAE, the DiT's prompt embeddings are random [1, text_len, text_dim]
    (umT5 has run and been freed before the stream), every step encodes the audio window of a live
    stream (left context + the window's audio + look-ahead) and the emitted blocks are decoded as the pipeline does.
    Runs until two consecutive emitting steps look the same (the steady state), at most ``max_steps``.

    Returns {"weights": {dit, vae, audio}, "phases": {name: {start, peak, end, transient, count}},
    "state": {kv_cache, text_kv, rotated_context, vae_decoder_cache, ...}, "steps": [...], "peak",
    "steady"}; "peak" is the stream's peak (weights included)."""
    from .sampler import StreamingSampler

    dev, dtype = model.device, model.dtype
    tracer = tracer or MemoryTracer(devices=(dev.type,))
    phases = _Phases(tracer)
    weights = {"dit": tensor_bytes(model), "vae": tensor_bytes(vae), "audio": tensor_bytes(audio_encoder)}
    tracer.track(model, vae, audio_encoder)
    open_dit: list[str] = []

    def pre(module, args, kwargs):
        open_dit.append(_dit_phase(args, kwargs))
        tracer.begin(open_dit[-1])

    def post(module, args, kwargs, out):
        name = open_dit.pop()
        phases.fold(name, tracer.end(name))

    hooks = [model.register_forward_pre_hook(pre, with_kwargs=True),
             model.register_forward_hook(post, with_kwargs=True)]
    vdev = vae.device
    sr = audio_encoder.sample_rate
    # a live stream re-encodes, each step, left context + the window's audio + the look-ahead (audio.LookaheadRows)
    window_s = (audio_encoder.left_context_seconds + schedule.L * schedule.B * LATENT_STRIDE / audio_encoder.fps
                + audio_encoder.lookahead_seconds)
    steps, steady, prev = [], False, None
    max_steps = max_steps or schedule.L + 4
    try:
        with tracer:
            with phases("vae.encode_reference"):
                pixels = torch.rand(1, 3, height, width, device=vdev) * 2 - 1
                ref = vae.encode_image(pixels.to(vae.dtype))
            text = torch.randn(1, model.cfg.text_len, model.cfg.text_dim, device=dev, dtype=dtype)
            wav = torch.randn(int(window_s * sr)) * 0.1                       # the host-side audio window
            rows = torch.zeros(0)

            def audio(start: int, stop: int) -> torch.Tensor:                # [1, F, 4D] per latent frame
                return torch.zeros(1, stop - start, model.cfg.audio_dim, device=dev, dtype=dtype)

            def noise(block: int, level: int, shape) -> torch.Tensor:
                return torch.randn(shape, device=dev, dtype=dtype)

            with phases("dit.stream_start"):                                # text K/V + style-anchor prefill
                sampler = StreamingSampler(model, schedule, cache_cfg, _fabricate(ref, dev, dtype), text,
                                           audio=audio, noise=noise)
            decoder = vae.stream_decoder()
            with phases("vae.decode_reference"):
                frames = _to_uint8_like(decoder.push(_fabricate(ref, vdev, vae.dtype)))
            for i in range(max_steps):
                with tracer.section(f"step{i}") as step_sec:
                    with phases("audio.encode_window"):
                        del rows
                        rows = audio_encoder.window_features(wav, audio_encoder.num_audio_frames(len(wav)))
                    with phases("dit.step"):                              # the forwards + the cache update
                        out = sampler.step()
                    if out is None:
                        break
                    emitted = out["emitted"]
                    del out
                    if emitted is not None:
                        del frames
                        with phases("vae.decode_block"):
                            frames = _to_uint8_like(decoder.push(_fabricate(emitted[1], vdev, vae.dtype)))
                        del emitted
                key = (step_sec["start"], step_sec["peak"], step_sec["end"])
                steps.append({"step": i, "start": key[0], "peak": key[1], "end": key[2]})
                if key == prev:
                    steady = True
                    break
                prev = key
            state = _stream_state(sampler.cache, decoder, model)
            del frames, rows
    finally:
        for h in hooks:
            h.remove()
    return {"weights": weights, "phases": phases.stats, "state": state, "steps": steps,
            "peak": tracer.peak_bytes, "steady": steady}


def _stream_state(cache, decoder, model) -> dict:
    """Bytes of what a stream keeps between steps (storages; a view keeps its whole storage alive)."""
    anchor = [] if cache.anchor is None else cache.anchor.k + cache.anchor.v
    temporal = [] if cache.temporal is None else cache.temporal.k + cache.temporal.v
    nominal = sum(t.numel() * t.element_size() for t in anchor + temporal)
    rotated = [] if cache._rotated is None or cache._rotated[3] is None else cache._rotated[3]
    kv = tensor_bytes(anchor, temporal)
    feat = [t for t in getattr(decoder, "_feat_map", []) if isinstance(t, torch.Tensor)]
    rope = [v for v in model.rope._cache.values()]
    return {"kv_cache": kv, "kv_cache_nominal": nominal, "text_kv": tensor_bytes(cache.text),
            "rotated_context": tensor_bytes(anchor, temporal, rotated) - kv, "vae_decoder_cache": tensor_bytes(feat),
            "rope_tables": tensor_bytes(rope)}

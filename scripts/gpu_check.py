"""The prepared GPU check: the real 1.3B student's code path, bf16, on one CUDA device, in a few minutes.

    python scripts/gpu_check.py                       # CUDA, the real config with random weights (no downloads)
    python scripts/gpu_check.py --device cpu --tiny   # the same code on CPU with tiny models (< 2 min; CI runs it)

Writes ``results/gpu/<device-name>.json`` (``--out`` to change) and prints a table.  Sections:

(a) parity   fp32 vs bf16 on a short stream (same weights): latent relative error per block, frame PSNR;
(b) latency  steady-state ms/frame at 480x832, B4 L4 N1 (the Table 2 protocol of scripts/bench_latency.py),
             split into audio, DiT window, KV update and VAE decode: eager, compiled, and fp8 where available;
(c) memory   peak memory of the stream in the default and the low-VRAM mode (CUDA: max_memory_allocated);
(d) long     late/early step time and memory over a 2-minute stream;
(e) sessions total frames/s of 1, 2 and 4 streams sharing the model (batched forwards, avatarforcing/multistream.py);
(f) evaluation seconds to evaluate a minute of 480x832 video with every metric of scripts/evaluate.py.

Random weights at the real architecture time and size exactly like the released ones (the DiT's zero-init
output head is given small random weights so that the parity check compares non-trivial outputs).  Every
section records its own wall time and error; a failing section does not stop the others.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.stream_state import CacheConfig  # noqa: E402
from avatarforcing.model import PRESETS, DiTConfig, WanDiT  # noqa: E402
from avatarforcing.pipeline import AvatarPipeline, resolve_device  # noqa: E402
from avatarforcing.schedule import WindowSchedule  # noqa: E402
from avatarforcing.text import TextEncoder  # noqa: E402

GIB = 2 ** 30


# ----------------------------------------------------------------------------------------------
# the pipeline under test


def schedule_config(block_frames: int = 4):
    from omegaconf import OmegaConf
    return WindowSchedule.from_config(OmegaConf.create(dict(
        num_train_timesteps=1000, shift=5.0, steps=[1000, 800, 400, 200], warp=True, block_frames=block_frames,
        window_blocks=None, passes=1)))


def build_pipeline(device: torch.device, dtype: torch.dtype, tiny: bool, seed: int = 0) -> AvatarPipeline:
    """The real student's components with random weights (or tiny ones), built directly on ``device``."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from avatarforcing.audio import Wav2Vec2Features, tiny_wav2vec2_config
    from avatarforcing.vae import WanVAE

    torch.manual_seed(seed)
    with torch.device(device):
        audio = Wav2Vec2Features(Wav2Vec2Model(tiny_wav2vec2_config() if tiny else Wav2Vec2Config()))
        if tiny:
            cfg = DiTConfig(**{**PRESETS["tiny"].__dict__, "audio_dim": 4 * audio.feature_dim})
        else:
            cfg = DiTConfig()                                     # Wan2.1-T2V-1.3B + audio (docs/spec.md section 4)
        model = WanDiT(cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.02)   # Wan's init zeroes it
        vae = WanVAE.from_config({"base_dim": 8 if tiny else 96, "z_dim": 16})
    audio.model.to(device, dtype)
    model = model.to(device, dtype).eval().requires_grad_(False)
    vae = vae.to(device, dtype).eval().requires_grad_(False)
    text = TextEncoder.none(cfg.text_dim, cfg.text_len).to(device)
    height, width = (32, 32) if tiny else (480, 832)
    return AvatarPipeline(model, vae, audio, text, schedule_config(), CacheConfig(), height, width, 25, device, dtype,
                          "cover")


def as_dtype(pipe: AvatarPipeline, dtype: torch.dtype) -> AvatarPipeline:
    """The same weights in another dtype (DiT, VAE and wav2vec2 copied)."""
    audio = copy.deepcopy(pipe.audio_encoder)
    audio.model.to(dtype)
    return pipe.replace(model=copy.deepcopy(pipe.model).to(dtype), vae=copy.deepcopy(pipe.vae).to(dtype),
                        audio_encoder=audio, dtype=dtype)


def free() -> None:
    """Return freed blocks to the device (after the caller dropped its references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# (a) parity


def run_stream(pipe: AvatarPipeline, blocks: int):
    """Latent blocks (float32) and decoded uint8 frames of a short stream with speech-like audio."""
    from avatarforcing.vae import to_uint8
    from bench_latency import reference_image, synthetic_speech

    wav = synthetic_speech(pipe.video_frames(blocks) / pipe.fps, seed=0)
    decoder = pipe.vae.stream_decoder()
    latents, frames = [], []
    for block, x in pipe.stream_latents(reference_image(pipe), wav, seed=0, num_blocks=blocks):
        if block >= 0:
            latents.append(x.float().cpu())
        frames.append(to_uint8(decoder.push(x.to(pipe.dtype))))
    return latents, np.concatenate(frames, axis=1)


def parity(pipe: AvatarPipeline, blocks: int) -> dict:
    pipe32 = as_dtype(pipe, torch.float32)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # a true fp32 reference
    try:
        lat32, fr32 = run_stream(pipe32, blocks)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    del pipe32
    free()
    pipe16 = pipe if pipe.dtype == torch.bfloat16 else as_dtype(pipe, torch.bfloat16)
    lat16, fr16 = run_stream(pipe16, blocks)
    del pipe16
    free()
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(lat16, lat32)]
    mse = float(((fr16.astype(np.float64) - fr32.astype(np.float64)) ** 2).mean())
    return {"blocks": blocks, "latent_rel_error_per_block": rel, "latent_rel_error_max": max(rel),
            "frames_psnr_db": 10 * math.log10(255 ** 2 / max(mse, 1e-12)),
            "frames_max_abs_diff": int(np.abs(fr16.astype(int) - fr32.astype(int)).max()),
            "ok": max(rel) < 0.05}


# ----------------------------------------------------------------------------------------------
# (b) latency, (c) memory, (d) long stream


def latency(pipe: AvatarPipeline, steps: int, warmup: int) -> dict:
    from bench_latency import steady_state
    out = steady_state(pipe, steps, warmup)
    return {"ms_per_frame": out["ms_per_frame"], "ms_per_frame_p95": out["ms_per_frame_p95"],
            "real_time_factor": out["real_time_factor"], "steps_timed": out["steps_timed"],
            "parts_ms_per_frame": {k: v["ms_per_frame"] for k, v in out["parts"].items()}}


def peak_memory(pipe: AvatarPipeline, steps: int) -> dict:
    """Peak memory of a stream (weights, caches, activations) over ``steps`` emitting steps, next to the
    prediction of the allocation tracer that scripts/bench_memory.py uses (avatarforcing.memtrace)."""
    from avatarforcing.memtrace import MemoryTracer, measure_stream
    from bench_latency import steady_state
    trace_args = (pipe.model, pipe.vae, pipe.audio_encoder, pipe.schedule, pipe.cache_cfg)
    if pipe.device.type == "cuda":
        sync(pipe.device)
        free()
        resident = torch.cuda.memory_allocated(pipe.device)
        torch.cuda.reset_peak_memory_stats(pipe.device)
        steady_state(pipe, steps, 1)
        out = {"kind": "cuda max_memory_allocated", "resident_gib": resident / GIB,
               "peak_gib": torch.cuda.max_memory_allocated(pipe.device) / GIB,
               "reserved_peak_gib": torch.cuda.max_memory_reserved(pipe.device) / GIB}
        free()
        base = torch.cuda.memory_allocated(pipe.device)
        torch.cuda.reset_peak_memory_stats(pipe.device)
        trace = measure_stream(*trace_args, height=pipe.height, width=pipe.width,
                               tracer=MemoryTracer(devices=("cuda",)))
        weights = sum(trace["weights"].values())
        measured = torch.cuda.max_memory_allocated(pipe.device) - base + weights   # the tracer counts the weights
        out.update({"traced_peak_gib": trace["peak"] / GIB, "measured_same_run_gib": measured / GIB,
                    "traced_over_measured": trace["peak"] / measured})
        return out
    with MemoryTracer(devices=(pipe.device.type,)) as tracer:
        steady_state(pipe, steps, 1)
    trace = measure_stream(*trace_args, height=pipe.height, width=pipe.width)
    return {"kind": "traced tensor storage (avatarforcing.memtrace), CPU", "peak_gib": tracer.peak_bytes / GIB,
            "traced_stream_peak_gib": trace["peak"] / GIB,
            "note": "CPU: tensors created during the stream (weights resident before it are not counted); "
                    "traced_stream_peak_gib is measure_stream's figure with the weights"}


def long_run(pipe: AvatarPipeline, seconds: float) -> dict:
    from bench_latency import long_stream
    blocks = max(4, math.ceil(seconds * pipe.fps / pipe.block_video_frames))
    out = long_stream(pipe, blocks)
    keep = ("blocks", "video_seconds", "memory_kind", "step_ms_early", "step_ms_late", "time_late_over_early",
            "memory_mb_early", "memory_mb_late", "memory_late_over_early")
    return {k: out[k] for k in keep}


# ----------------------------------------------------------------------------------------------
# modes


COMPILE_BACKEND = "inductor"          # --tiny on CPU: aot_eager (same graphs, no C++ code generation)


def multi_stream(pipe: AvatarPipeline, sessions=(1, 2, 4), blocks: int = 6) -> dict:
    """Several streams on one model (avatarforcing/multistream.py): each session's stream on its own thread, the
    DiT forwards stacked into batched forwards; total frames/s (VAE decode and audio per session included) for
    each session count, and the speed-up over one stream."""
    import threading

    from avatarforcing.multistream import StreamBatcher
    from bench_latency import reference_image, synthetic_speech

    wav = synthetic_speech(pipe.video_frames(blocks) / pipe.fps, seed=0)
    image = reference_image(pipe)
    batcher = StreamBatcher(pipe.model, max_wait_s=1.0)     # every session participates: batches wait for all
    shared = pipe.replace(model=batcher.proxy())
    rows = {}
    try:
        for n in sessions:
            frames = [0] * n

            def one(i):
                try:
                    for chunk in shared.stream(image, wav, seed=i, num_blocks=blocks):
                        frames[i] += chunk.shape[1]
                finally:
                    batcher.leave()
            for _ in range(2):                   # the second run is timed (the first pays one-off costs)
                frames[:] = [0] * n
                threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
                sync(pipe.device)
                t0 = time.perf_counter()
                batcher.join(n)                  # all sessions count before any starts: their forwards meet
                [th.start() for th in threads]
                [th.join() for th in threads]
                sync(pipe.device)
                wall = time.perf_counter() - t0
            rows[n] = {"total_fps": sum(frames) / wall, "wall_s": wall, "frames": sum(frames)}
    finally:
        batcher.close()
    one_fps = rows[sessions[0]]["total_fps"]
    for n, r in rows.items():
        r["speedup_vs_one_stream"] = r["total_fps"] / one_fps
    return {"sessions": rows, "batcher": dict(batcher.stats), "blocks_per_session": blocks}


def evaluation(device: torch.device, tiny: bool) -> dict:
    """Seconds to evaluate one minute of 480x832 video with every metric of scripts/evaluate.py (random weights in
    the real architectures; the goal on a GPU is < 30 s per minute)."""
    from avatarforcing.evaluation.bench import bench_evaluation
    size = (64, 64) if tiny else (480, 832)
    return bench_evaluation(seconds=1.0 if tiny else 2.0, height=size[0], width=size[1], device=str(device), log=None)


def with_mode(pipe: AvatarPipeline, mode: str) -> AvatarPipeline:
    """``pipe`` in an execution mode: eager | compiled | fp8 (on a copy of the DiT) | low_vram (in place: it
    changes the VAE's decoding and, on CUDA, adds offload hooks, so it runs last, on a fresh pipeline)."""
    from omegaconf import OmegaConf

    from avatarforcing.lowvram import apply_memory_options
    if mode == "eager":
        return pipe
    if mode == "low_vram":
        apply_memory_options(pipe.model, pipe.vae, pipe.audio_encoder, pipe.text_encoder,
                             OmegaConf.create({"low_vram": True}), pipe.device)
        return pipe
    new = pipe.replace(model=copy.deepcopy(pipe.model))
    if mode == "compiled":
        new.model.compile_streaming("default", backend=COMPILE_BACKEND)
    elif mode == "fp8":
        apply_memory_options(new.model, new.vae, new.audio_encoder, new.text_encoder,
                             OmegaConf.create({"quantize": "fp8"}), new.device)
    else:
        raise ValueError(mode)
    return new


def mode_latency(pipe: AvatarPipeline, mode: str, steps: int, warmup: int) -> dict:
    try:
        run = with_mode(pipe, mode)
    except AvatarForcingError as exc:            # e.g. fp8 on a GPU without float8 kernels
        return {"skipped": str(exc)}
    out = latency(run, steps, warmup)
    if mode == "compiled":
        out["graphs"] = run.model.compile_report()
    del run
    free()
    return out


# ----------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def section(report: dict, name: str, budget_end: float, min_seconds: float, fn, *args):
    """Run one section, recording its result, wall time, or the reason it did not run."""
    left = budget_end - time.perf_counter()
    if left < min_seconds:
        report[name] = {"skipped": f"time budget: {left:.0f} s left, section needs ~{min_seconds:.0f} s"}
        print(f"[{name}] skipped ({report[name]['skipped']})", flush=True)
        return None
    print(f"[{name}] ...", flush=True)
    t0 = time.perf_counter()
    try:
        out = fn(*args)
        out = dict(out)
    except Exception as exc:  # noqa: BLE001 - a check reports every failure and goes on
        out = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
               "traceback": traceback.format_exc(limit=6)}
        print(f"[{name}] FAILED: {out['error']}", flush=True)
    out["wall_s"] = time.perf_counter() - t0
    report[name] = out
    return out


def table(report: dict) -> str:
    rows = [f"gpu_check on {report['device']} (torch {report['torch']}, {report['config']})"]

    def get(name, *keys):
        node = report.get(name, {})
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    p = report.get("parity", {})
    rows.append(f"(a) parity      bf16 vs fp32: latent rel. error max {fmt(p.get('latent_rel_error_max'), '.4f')}, "
                f"frames PSNR {fmt(p.get('frames_psnr_db'), '.1f')} dB  {p.get('error', '')}")
    for mode in ("eager", "compiled", "fp8", "low_vram"):
        name = f"latency_{mode}"
        parts = get(name, "parts_ms_per_frame") or {}
        rows.append(f"(b) {mode:9s}   {fmt(get(name, 'ms_per_frame'))} ms/frame = audio {fmt(parts.get('audio'))} + DiT "
                    f"{fmt(parts.get('dit'))} + KV {fmt(parts.get('kv'))} + VAE {fmt(parts.get('vae'))} (+ other "
                    f"{fmt(parts.get('other'))}); real-time factor {fmt(get(name, 'real_time_factor'))}  "
                    f"{report.get(name, {}).get('error', report.get(name, {}).get('skipped', ''))}")
    for mode in ("default", "low_vram"):
        name = f"memory_{mode}"
        rows.append(f"(c) memory {mode:9s} peak {fmt(get(name, 'peak_gib'), '.3f')} GiB (traced "
                    f"{fmt(get(name, 'traced_peak_gib') or get(name, 'traced_stream_peak_gib'), '.3f')} GiB)  "
                    f"{report.get(name, {}).get('error', report.get(name, {}).get('skipped', ''))}")
    rows.append(f"(d) long stream {fmt(get('long', 'video_seconds'), '.0f')} s: step time late/early "
                f"{fmt(get('long', 'time_late_over_early'))}, memory late/early {fmt(get('long', 'memory_late_over_early'), '.3f')}"
                f"  {report.get('long', {}).get('error', '')}")
    ms = get("multi_stream", "sessions") or {}
    rows.append("(e) sessions    " + ", ".join(f"{n}: {fmt(r.get('total_fps'), '.1f')} frames/s (x{fmt(r.get('speedup_vs_one_stream'))})"
                                              for n, r in ms.items()) + f"  {report.get('multi_stream', {}).get('error', '')}")
    ev = report.get("evaluation", {})
    rows.append(f"(f) evaluation  {fmt(ev.get('seconds_per_minute'), '.1f')} s per minute of video  "
                f"{ev.get('error', ev.get('skipped', ''))}")
    rows.append(f"total {report['wall_s']:.0f} s")
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models at 32x32 (the CPU smoke run)")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 of sections (b)-(d) (default: bf16 on CUDA, fp32 on "
                   "CPU, whose bf16 3-D convolutions are ~17x slower); (a) always compares bf16 with fp32")
    p.add_argument("--out", default=None, help="JSON path (default: results/gpu/<device-name>.json)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting sections after this many seconds "
                   "(default 450 on GPU: the check must fit 8 minutes; 110 with --tiny)")
    p.add_argument("--long-seconds", type=float, default=None, help="video seconds of (d) (default 120; 12 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="steady-state steps timed in (b) (default 6; 3 with --tiny)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend of (b) compiled (default: inductor; "
                   "aot_eager with --tiny on CPU, where inductor's C++ builds alone take minutes)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: "
                   "parity,latency,compiled,fp8,memory,long,low_vram,sessions,evaluation")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        device = resolve_device(args.device)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if device.type == "cpu" and not args.tiny:
        print("error: the real 1.3B config at 480x832 needs a GPU; add --tiny for the CPU run", file=sys.stderr)
        return 1
    budget = args.budget_s or (110.0 if args.tiny else 450.0)
    budget_end = t_start + budget
    steps = args.steps or (3 if args.tiny else 6)
    long_seconds = args.long_seconds or (12.0 if args.tiny else 120.0)
    skip = set(filter(None, args.skip.split(",")))
    global COMPILE_BACKEND
    COMPILE_BACKEND = args.compile_backend or ("aot_eager" if args.tiny and device.type == "cpu" else "inductor")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    name = device_name(device)
    out = Path(args.out) if args.out else ROOT / "results" / "gpu" / (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
                                                                      + ("-tiny" if args.tiny else "") + ".json")
    report: dict = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "config": "tiny models, 32x32" if args.tiny else "Wan2.1-T2V-1.3B + audio, random weights, 480x832",
                    "schedule": "B4 L4 N1, steps [1000, 800, 400, 200] warped by shift 5, temporal cache 2 frames",
                    "dtype": dtype_name, "budget_s": budget, "compile_backend": COMPILE_BACKEND}
    print(f"gpu_check: {name}, {report['config']}", flush=True)

    t0 = time.perf_counter()
    pipe = build_pipeline(device, dtype, args.tiny)
    sync(device)
    report["build_s"] = time.perf_counter() - t0
    report["dit_params_m"] = sum(p.numel() for p in pipe.model.parameters()) / 1e6
    warm = 2
    scale = 0.2 if args.tiny else 1.0          # rough per-section time needs (s) on an H100/H200

    out.parent.mkdir(parents=True, exist_ok=True)

    def run(name: str, min_seconds: float, fn, *fn_args) -> None:
        """One section, then the JSON so far (a run stopped by a time limit keeps what it measured)."""
        section(report, name, budget_end, min_seconds * scale, fn, *fn_args)
        report["wall_s"] = time.perf_counter() - t_start
        out.write_text(json.dumps(report, indent=1))

    if "memory" not in skip:
        run("memory_default", 40, peak_memory, pipe, 3)
    if "latency" not in skip:
        run("latency_eager", 40, latency, pipe, steps, warm)
    if "long" not in skip:
        run("long", 90, long_run, pipe, long_seconds)
    if "parity" not in skip:
        run("parity", 40, parity, pipe, 2)
    if "sessions" not in skip:
        run("multi_stream", 60, multi_stream, pipe, (1, 2, 4), 2 if args.tiny else 6)
    if "fp8" not in skip:
        run("latency_fp8", 40, mode_latency, pipe, "fp8", steps, warm)
    del pipe                                     # fresh pipelines below: nothing else resident
    free()
    if "memory" not in skip or "low_vram" not in skip:
        low = build_pipeline(device, dtype, args.tiny)
        with_mode(low, "low_vram")
        if "memory" not in skip:
            run("memory_low_vram", 40, peak_memory, low, 3)
        if "low_vram" not in skip:
            run("latency_low_vram", 40, latency, low, steps, warm)
        del low
        free()
    if "evaluation" not in skip:
        run("evaluation", 60, evaluation, device, args.tiny)
    if "compiled" not in skip:                   # last: inductor's compile time of the 1.3B graphs is unknown
        run("latency_compiled", 150, mode_latency, build_pipeline(device, dtype, args.tiny), "compiled", steps,
            warm + 3)
    report["wall_s"] = time.perf_counter() - t_start
    out.write_text(json.dumps(report, indent=1))
    print("\n" + table(report))
    print(f"wrote {out}")
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency protocol of the paper's Table 2, plus the window-length sweep of Figure 4.

    python scripts/bench_latency.py [--config configs/tiny.yaml] [--device auto] \
        [--out results/bench_latency.json] [key=value ...]

Measures, on the configured model (random weights are fine: timing does not depend on them):

1. steady-state latency: per streaming step, audio encoding + DiT window forward(s) + KV update (the clean
   re-run of the emitted block) + VAE decode of the emitted block, divided by the 4B video frames the step
   emits; start-up (model build, reference encode, anchor prefill), the warm-up steps that emit nothing,
   the first emitting steps, data loading and file I/O are excluded.  Each part is reported separately.
2. audio look-ahead: the paper's formula (L-1)B/25 s with B counted in video frames, and what the window
   actually needs with B latent frames: (L-1) * 4B video frames / 25.
3. end-to-end delay: a thread pushes 40 ms audio chunks at wall-clock speed into a live stream; for every
   video frame t, the delay from receiving the audio that drives it (samples up to 640 t, docs/spec.md section 3)
   to emitting frame t.
4. flatness over a long stream: per-step time and memory (RSS; CUDA allocator on GPU) against the stream
   position; late/early ratios must be ~1.
5. Figure 4: steady-state latency for L in {1, 2, 4, 8} x N in {1, 2, 4} (DiT + KV + audio measured per
   cell, plus the VAE cost per frame from 1., which does not depend on L or N).  PNG if matplotlib is there.
6. with --compile: the steady state of 1. eager vs ``WanDiT.compile_streaming`` (torch.compile of the window
   forward and the clean re-run; --compile-mode), alternating rounds, and the compile time (first calls).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.config import load_config  # noqa: E402
from avatarforcing.pipeline import AvatarPipeline, default_config_path  # noqa: E402
from avatarforcing.profiling import StepProfiler  # noqa: E402
from avatarforcing.schedule import WindowSchedule  # noqa: E402

SAMPLE_RATE = 16000


# ----------------------------------------------------------------------------------------------
# instrumentation


def rss_bytes() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------
# inputs


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Syllable-like bursts of a harmonic voice (float32, 16 kHz): cheap, deterministic, not silent."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.2 * voice * envelope + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def endless_chunks(chunk_samples: int, seed: int = 0):
    """A live source that never ends (for the long stream)."""
    clip = synthetic_speech(8.0, seed)
    i = 0
    while True:
        j = i % len(clip)
        chunk = clip[j:j + chunk_samples]
        yield chunk
        i += len(chunk)


def reference_image(pipe: AvatarPipeline) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (pipe.height, pipe.width, 3), dtype=np.uint8)


def summarize(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)
    return {"mean": statistics.fmean(v), "p50": v[len(v) // 2], "p95": v[min(len(v) - 1, int(0.95 * len(v)))],
            "min": v[0], "max": v[-1], "n": len(v)}


# ----------------------------------------------------------------------------------------------
# 1. steady state


def steady_state(pipe: AvatarPipeline, steps: int, warmup: int) -> dict:
    prof = StepProfiler(pipe.device)
    chunk = round(pipe.audio_encoder.chunk_seconds * SAMPLE_RATE)
    with prof.hooks(pipe.model):
        # An endless live source: every timed step has a full window (no drain).
        for i, _ in enumerate(pipe.stream(reference_image(pipe), endless_chunks(chunk), profiler=prof)):
            if i >= warmup + steps:          # i = number of blocks emitted so far
                break
    prof.next_step()
    records = prof.emitting_steps()[warmup:warmup + steps]
    frames = pipe.block_video_frames
    parts = {}
    for k in ("audio", "dit", "kv", "vae", "other", "total"):
        per_step = [r[k] for r in records]
        parts[k] = {"ms_per_step": 1e3 * statistics.fmean(per_step),
                    "ms_per_frame": 1e3 * statistics.fmean(per_step) / frames}
    block_seconds = frames / pipe.fps
    return {"steps_timed": len(records), "video_frames_per_step": frames, "parts": parts,
            "ms_per_frame": parts["total"]["ms_per_frame"],
            "ms_per_frame_p95": 1e3 * summarize([r["total"] for r in records])["p95"] / frames,
            "real_time_factor": statistics.fmean(r["total"] for r in records) / block_seconds}


# ----------------------------------------------------------------------------------------------
# 2. look-ahead


def look_ahead(pipe: AvatarPipeline) -> dict:
    L, B, fps = pipe.schedule.L, pipe.schedule.B, pipe.fps
    actual_frames = (L - 1) * pipe.block_video_frames
    return {"L": L, "B_latent_frames": B, "B_video_frames": pipe.block_video_frames,
            "paper_formula_seconds": (L - 1) * B / fps,
            "paper_formula": "(L-1)*B/25 with B counted in video frames",
            "actual_video_frames": actual_frames, "actual_seconds": actual_frames / fps,
            "actual_formula": "(L-1)*4B/25 with B latent frames (the window's future blocks need their audio)"}


# ----------------------------------------------------------------------------------------------
# 3. real-time simulation


def realtime_delay(pipe: AvatarPipeline, seconds: float, chunk_ms: float = 40.0) -> dict:
    """Push audio at wall-clock speed; delay from receiving frame t's audio to emitting frame t."""
    wav = synthetic_speech(seconds, seed=1)
    chunk = int(round(chunk_ms * SAMPLE_RATE / 1000))
    spf = SAMPLE_RATE // pipe.fps
    source: queue.Queue = queue.Queue()
    arrivals: list[tuple[int, float]] = []           # (samples received so far, wall time)

    def feeder():
        t0 = time.perf_counter()
        for i, start in enumerate(range(0, len(wav), chunk)):
            piece = wav[start:start + chunk]
            wait = t0 + (start + len(piece)) / SAMPLE_RATE - time.perf_counter()  # the chunk is complete then
            if wait > 0:
                time.sleep(wait)
            arrivals.append((start + len(piece), time.perf_counter()))
            source.put(piece)
        source.put(None)

    thread = threading.Thread(target=feeder, daemon=True)
    emitted: list[tuple[int, int, float]] = []       # (first video frame, count, wall time)
    frame = 0
    for frames in pipe.stream(reference_image(pipe), source):
        if frame == 0:
            thread.start()                           # start-up (encode reference, anchor prefill) excluded
        else:
            emitted.append((frame, frames.shape[1], time.perf_counter()))
        frame += frames.shape[1]
    thread.join()

    received = np.array([a[0] for a in arrivals])
    times = np.array([a[1] for a in arrivals])
    delays = []
    drain_from = frame - pipe.schedule.L * pipe.block_video_frames   # the last L blocks drain after the audio ends
    audio_frames = math.ceil(len(wav) / spf)
    for first, count, t_emit in emitted:
        for t in range(first, first + count):
            if t > audio_frames or t >= drain_from:
                continue
            need = spf * t                                         # frame t is driven by audio frame t-1
            k = int(np.searchsorted(received, need))               # first chunk completing those samples
            delays.append(t_emit - times[k])
    frames_per_block = pipe.block_video_frames
    # Frame p of a block needs its audio up to its own frame; the block is emitted once the audio of the
    # window's newest block has arrived: (L-1) blocks + the rest of its own block later.
    expected = [((pipe.schedule.L - 1) * frames_per_block + (frames_per_block - 1 - p)) / pipe.fps
                for p in range(frames_per_block)]
    return {"audio_seconds": seconds, "chunk_ms": chunk_ms, "frames_measured": len(delays),
            "delay_seconds": summarize(delays),
            "algorithmic_delay_seconds_mean": statistics.fmean(expected),
                "real_time": "compute keeps up" if _keeps_up(pipe, emitted) else
                         "compute is slower than real time: the delay grows along the stream",
            "note": "algorithmic = look-ahead (L-1)*4B frames + waiting for the rest of the frame's block, over "
                    "25 fps; the measured delay adds compute (and chunking if audio.chunk_seconds > one block)"}


def _keeps_up(pipe: AvatarPipeline, emitted: list) -> bool:
    """Blocks were emitted at least as fast as the audio played."""
    steady = emitted[:len(emitted) - pipe.schedule.L]          # the drain runs without waiting for audio
    if len(steady) < 2:
        return True
    per_block = (steady[-1][2] - steady[0][2]) / (len(steady) - 1)
    return per_block <= 1.05 * pipe.block_video_frames / pipe.fps


# ----------------------------------------------------------------------------------------------
# 4. long stream


def long_stream(pipe: AvatarPipeline, blocks: int) -> dict:
    prof = StepProfiler(pipe.device)
    chunk = round(pipe.audio_encoder.chunk_seconds * SAMPLE_RATE)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    memory, objects = [], []
    for i, _ in enumerate(pipe.stream(reference_image(pipe), endless_chunks(chunk), profiler=prof)):
        memory.append(torch.cuda.memory_allocated() if pipe.device.type == "cuda" else rss_bytes())
        if i % max(1, blocks // 8) == 1:   # (minus the tuples this list already holds)
            objects.append((i, len(gc.get_objects()) - len(objects)))
        if i >= blocks:
            break
    prof.next_step()
    records = prof.emitting_steps()
    times = [r["total"] for r in records][2:]                    # skip the first (warm-up) steps
    mem = [m / 2 ** 20 for m in memory[3:]]
    q = max(1, len(times) // 4)                                  # medians of the first / last quarter:
    early_t, late_t = statistics.median(times[:q]), statistics.median(times[-q:])   # robust to other jobs
    early_m, late_m = statistics.median(mem[:q]), statistics.median(mem[-q:])
    slope = np.polyfit(np.arange(len(mem)), np.array(mem), 1)[0] if len(mem) > 1 else 0.0
    return {"blocks": len(records), "latent_frames": len(records) * pipe.schedule.B,
            "video_seconds": len(records) * pipe.block_video_frames / pipe.fps,
            "memory_kind": "cuda_allocated" if pipe.device.type == "cuda" else "rss",
            "step_ms_early": 1e3 * early_t, "step_ms_late": 1e3 * late_t, "time_late_over_early": late_t / early_t,
            "memory_mb_early": early_m, "memory_mb_late": late_m, "memory_late_over_early": late_m / early_m,
            "memory_mb_min": min(mem), "memory_mb_max": max(mem), "memory_mb_per_100_blocks": 100 * float(slope),
            "python_objects": objects,
            "per_step_ms": [round(1e3 * t, 3) for t in times],
            "per_step_memory_mb": [round(m, 2) for m in mem]}


# ----------------------------------------------------------------------------------------------
# 6. eager vs compiled


def compile_comparison(pipe: AvatarPipeline, steps: int, warmup: int, mode: str = "default", rounds: int = 2) -> dict:
    """Steady state of the pipeline eager and with the DiT compiled (a copy of the model), in alternating
    rounds (robust to other jobs on the machine: the best round of each is reported, all rounds are kept).

    The compiled stream compiles at its second emitting step (first full context) and CUDA graphs record
    on the next calls, so it skips 3 more emitting steps before timing."""
    if pipe.model._compiled is not None:                # inference.compile=true: time an eager copy
        pipe = pipe.replace(model=copy.deepcopy(pipe.model))                 # (copies drop the compiled core)
    model = copy.deepcopy(pipe.model)
    model.compile_streaming(mode)
    cpipe = pipe.replace(model=model)
    runs = {"eager": [], "compiled": []}
    first_wall = None
    for r in range(rounds):
        runs["eager"].append(steady_state(pipe, steps, warmup))
        t0 = time.perf_counter()
        runs["compiled"].append(steady_state(cpipe, steps, warmup + 3))
        if r == 0:
            first_wall = time.perf_counter() - t0
        print(f"  round {r + 1}: eager {runs['eager'][-1]['ms_per_frame']:.2f} ms/frame, compiled "
              f"{runs['compiled'][-1]['ms_per_frame']:.2f} ms/frame", flush=True)

    def best(kind: str) -> dict:
        run = min(runs[kind], key=lambda o: o["ms_per_frame"])
        p = run["parts"]
        return {"ms_per_frame": run["ms_per_frame"], "dit_ms_per_frame": p["dit"]["ms_per_frame"],
                "kv_ms_per_frame": p["kv"]["ms_per_frame"],
                "parts_ms_per_frame": {k: v["ms_per_frame"] for k, v in p.items()},
                "rounds_ms_per_frame": [o["ms_per_frame"] for o in runs[kind]]}

    eager, compiled = best("eager"), best("compiled")
    report = model.compile_report()
    dit_kv = (eager["dit_ms_per_frame"] + eager["kv_ms_per_frame"],
              compiled["dit_ms_per_frame"] + compiled["kv_ms_per_frame"])
    return {"mode": mode, "rounds": rounds, "steps_timed": steps, "eager": eager, "compiled": compiled,
            "speedup_total": eager["ms_per_frame"] / compiled["ms_per_frame"],
            "speedup_dit_kv": dit_kv[0] / dit_kv[1],
            "graphs": len(report), "compile_seconds": sum(g["first_call_s"] for g in report),
            "graphs_detail": report, "first_compiled_stream_wall_seconds": first_wall,
            "note": "compile_seconds: first calls of the compiled graphs (trace + inductor codegen + run); only "
                    "the DiT window forward and the clean re-run (the KV update) are compiled"}


# ----------------------------------------------------------------------------------------------
# 5. Figure 4


def sweep(pipe: AvatarPipeline, cfg, vae_ms_per_frame: float, steps: int, Ls=(1, 2, 4, 8), Ns=(1, 2, 4)) -> list[dict]:
    cells = []
    chunk = round(pipe.audio_encoder.chunk_seconds * SAMPLE_RATE)
    for L in Ls:
        for N in Ns:
            sch_cfg = OmegaConf.merge(cfg.schedule, {"window_blocks": L, "passes": N, "steps": None})
            cell = pipe.replace(schedule=WindowSchedule.from_config(sch_cfg))
            prof = StepProfiler(pipe.device)
            emitted = 0
            with prof.hooks(cell.model):
                for block, _ in cell.stream_latents(reference_image(cell), endless_chunks(chunk), profiler=prof):
                    emitted += block >= 0
                    if emitted > steps + 1:
                        break
            prof.next_step()
            records = [r for r in prof.records if "step" in r and "dit" in r][L - 1 + 1:][:steps]  # full windows
            per_step = statistics.fmean(r["step"] for r in records)
            ms = 1e3 * per_step / cell.block_video_frames
            cells.append({"L": L, "N": N, "window_latent_frames": L * cell.schedule.B,
                          "window_video_frames": L * cell.block_video_frames,
                          "dit_kv_audio_ms_per_frame": ms, "ms_per_frame": ms + vae_ms_per_frame})
            print(f"  L={L} N={N}: {ms + vae_ms_per_frame:8.2f} ms/frame ({ms:.2f} without VAE)", flush=True)
    return cells


def plot_sweep(cells: list[dict], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: PNG skipped (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for N in sorted({c["N"] for c in cells}):
        row = [c for c in cells if c["N"] == N]
        ax.plot([c["window_video_frames"] for c in row], [c["ms_per_frame"] for c in row], marker="o", label=f"N = {N}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window length (video frames, L x 4B)")
    ax.set_ylabel("latency (ms / frame)")
    ax.set_title("Latency vs. window length")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# 6. memory against the audio file's length


def file_memory(config: str, seconds=(20.0, 3600.0), video_seconds: float = 4.0) -> dict:
    """Peak RSS of ``inference.py`` (a fresh process each) making ``video_seconds`` of video from a speech file
    of each length: the file is read block by block, so its length must not show in the peak."""
    import subprocess
    import tempfile

    import soundfile as sf
    out: dict = {"config": config, "video_seconds": video_seconds, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for secs in seconds:
            wav = Path(tmp) / f"speech_{int(secs)}s.wav"
            with sf.SoundFile(str(wav), "w", SAMPLE_RATE, 1, "PCM_16") as f:   # written in 60 s pieces
                piece = synthetic_speech(min(secs, 60.0), seed=2)
                left = int(secs * SAMPLE_RATE)
                while left > 0:
                    f.write(piece[:left])
                    left -= len(piece)
            code = ("import resource, sys, runpy; sys.argv = ['inference.py', '--audio', sys.argv[1], '--output', "
                    "sys.argv[2], '--duration', sys.argv[3], '--config', sys.argv[4]]; "
                    "rc = 0\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n"
                    "    rc = e.code or 0\nprint('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
                    "sys.exit(rc)")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code, str(wav), str(Path(tmp) / "o.mp4"), str(video_seconds),
                                   config], capture_output=True, text=True, cwd=ROOT)
            peak = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")]
            if proc.returncode != 0 or not peak:
                raise RuntimeError(f"inference.py failed on a {secs:g} s file: {proc.stderr.strip()[-300:]}")
            out["runs"].append({"audio_seconds": secs, "file_mb": wav.stat().st_size / 2 ** 20,
                                "peak_rss_mb": peak[0] / 1024, "wall_s": time.perf_counter() - t0})
    first, last = out["runs"][0], out["runs"][-1]
    out["peak_ratio_longest_over_shortest"] = last["peak_rss_mb"] / first["peak_rss_mb"]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="experiment YAML (default: configs/demo.yaml, else configs/tiny.yaml)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda[:i] (default: inference.device)")
    p.add_argument("--out", default="results/bench_latency.json")
    p.add_argument("--steps", type=int, default=8, help="steady-state steps timed")
    p.add_argument("--warmup", type=int, default=2, help="emitting steps skipped before timing")
    p.add_argument("--realtime-seconds", type=float, default=6.0, help="audio length of the real-time simulation")
    p.add_argument("--long-blocks", type=int, default=150, help="blocks of the long stream (0 = skip)")
    p.add_argument("--sweep-steps", type=int, default=3, help="steps timed per L x N cell (0 = skip the sweep)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="also time the steady state with the DiT compiled")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--compile-rounds", type=int, default=2, help="alternating eager / compiled rounds")
    p.add_argument("--file-memory", action="store_true", help="only section 6: peak memory of inference.py on a 20 s "
                   "and a 1-hour audio file (fresh processes), merged into --out")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ([f"inference.device={args.device}"] if args.device else [])
    try:
        cfg = load_config(args.config or default_config_path(), overrides)
        pipe = AvatarPipeline.from_config(cfg)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sch = pipe.schedule
    dev = str(pipe.device) + (f" ({torch.cuda.get_device_name(pipe.device)})" if pipe.device.type == "cuda" else
                              f" ({torch.get_num_threads()} threads)")
    print(f"device {dev}, dtype {pipe.dtype}, {pipe.height}x{pipe.width}, B={sch.B} L={sch.L} N={sch.N}, "
          f"DiT {pipe.model.cfg.num_layers}x{pipe.model.cfg.dim}", flush=True)

    result = {"config": str(args.config or default_config_path()), "overrides": args.overrides, "device": dev,
              "dtype": str(pipe.dtype), "height": pipe.height, "width": pipe.width, "fps": pipe.fps,
              "B": sch.B, "L": sch.L, "N": sch.N, "timesteps": sch.timesteps,
              "model": OmegaConf.to_container(cfg.model), "torch": torch.__version__}

    if args.file_memory:
        print("6. peak memory against the audio file's length ...", flush=True)
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.is_file() else {}
        data["file_memory"] = fm = file_memory(str(args.config or default_config_path()))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
        for r in fm["runs"]:
            print(f"  {r['audio_seconds']:7.0f} s file ({r['file_mb']:.1f} MB): peak RSS {r['peak_rss_mb']:.0f} MB")
        print(f"  longest / shortest: {fm['peak_ratio_longest_over_shortest']:.3f}; wrote {out}")
        return 0
    print("1. steady state ...", flush=True)
    result["steady_state"] = steady = steady_state(pipe, args.steps, args.warmup)
    result["look_ahead"] = la = look_ahead(pipe)
    if args.compile:
        print(f"6. eager vs compiled ({args.compile_mode}) ...", flush=True)
        result["compile"] = compile_comparison(pipe, args.steps, args.warmup, args.compile_mode, args.compile_rounds)
    print("3. real-time simulation ...", flush=True)
    result["end_to_end"] = e2e = realtime_delay(pipe, args.realtime_seconds) if args.realtime_seconds > 0 else None
    if args.long_blocks > 0:
        print(f"4. long stream ({args.long_blocks} blocks) ...", flush=True)
        result["long_stream"] = long = long_stream(pipe, args.long_blocks)
    else:
        long = None
    if args.sweep_steps > 0:
        print("5. L x N sweep ...", flush=True)
        cells = sweep(pipe, cfg, steady["parts"]["vae"]["ms_per_frame"], args.sweep_steps)
        png = Path(args.out).with_name(Path(args.out).stem + "_fig4.png")
        result["sweep"] = {"cells": cells, "png": plot_sweep(cells, png)}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))

    p = steady["parts"]
    print("\n== latency (Table 2 protocol) ==")
    print(f"steady state   {steady['ms_per_frame']:8.2f} ms/frame  (p95 {steady['ms_per_frame_p95']:.2f}; "
          f"{steady['steps_timed']} steps of {steady['video_frames_per_step']} frames; real-time factor "
          f"{steady['real_time_factor']:.2f})")
    for k, name in (("audio", "audio encoder"), ("dit", "DiT window"), ("kv", "KV update"), ("vae", "VAE decode"),
                    ("other", "other")):
        print(f"  {name:13s}{p[k]['ms_per_frame']:8.2f} ms/frame  ({p[k]['ms_per_step']:.1f} ms/step)")
    print(f"look-ahead     paper formula (L-1)B/25 = {la['paper_formula_seconds']:.2f} s; actual with B latent frames "
          f"(L-1)*4B/25 = {la['actual_seconds']:.2f} s ({la['actual_video_frames']} frames)")
    if e2e:
        d = e2e["delay_seconds"]
        print(f"end-to-end     {d['mean']:.2f} s mean (p50 {d['p50']:.2f}, p95 {d['p95']:.2f}, max {d['max']:.2f}) "
              f"over {d['n']} frames; algorithmic {e2e['algorithmic_delay_seconds_mean']:.2f} s; {e2e['real_time']}")
    if long:
        print(f"long stream    {long['blocks']} blocks ({long['video_seconds']:.0f} s of video): time late/early "
              f"{long['time_late_over_early']:.2f}, memory late/early {long['memory_late_over_early']:.3f} "
              f"({long['memory_kind']} median {long['memory_mb_early']:.0f} -> {long['memory_mb_late']:.0f} MB, range "
              f"{long['memory_mb_min']:.0f}..{long['memory_mb_max']:.0f}, trend {long['memory_mb_per_100_blocks']:+.1f} "
              f"MB/100 blocks); python objects {long['python_objects'][0][1]} -> {long['python_objects'][-1][1]}")
    if args.sweep_steps > 0:
        print(f"sweep          {result['sweep']['png']}")
    if args.compile:
        c = result["compile"]
        print(f"compiled       {c['compiled']['ms_per_frame']:8.2f} ms/frame vs eager {c['eager']['ms_per_frame']:.2f} "
              f"(x{c['speedup_total']:.2f}; DiT + KV x{c['speedup_dit_kv']:.2f}); {c['graphs']} graphs compiled in "
              f"{c['compile_seconds']:.1f} s ({c['mode']})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

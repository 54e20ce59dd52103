"""Live server throughput and delay with 1, 2, 4 and 8 concurrent sessions, batched vs. one after another.

    python scripts/bench_serve.py [--sessions 1,2,4,8] [--seconds 4] [--out results/bench_serve.json] [key=value ...]

For each session count a real ``python serve.py`` (the demo model unless --config) serves that many
``scripts/live_client.py`` clients at once, twice:

* ``--pace 0`` (audio as fast as possible): total generated frames/s over all sessions, i.e. throughput;
* ``--pace 1`` (audio in real time, 20 ms packets): per-session delay (frame arrival minus the time its
  audio was sent; mean and p95 over sessions' frames) and dropped frames,

once with the sessions' DiT forwards stacked into one batch (the server's default, avatarforcing/multistream.py)
and once with ``--no-batch`` (sessions step one after another on the same engine thread).  Prints a table and
writes JSON.  On this project's CPU machine the DiT is a small part of a step (the demo model at 64x64), so
batching mainly shows that N streams cost less than N single streams where the forward dominates; on a GPU,
``scripts/gpu_check.py`` reports the same at 480x832.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.live.launch import running_server  # noqa: E402


def _live_client():
    spec = importlib.util.spec_from_file_location("live_client", ROOT / "scripts" / "live_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_clients(client, url: str, n: int, audio: Path, pace: float, tmp: Path) -> dict:
    """``n`` clients at once -> totals over sessions and their reports."""
    reports, errors = [None] * n, []

    def one(i):
        try:
            args = client.build_parser().parse_args(["--server", url, "--audio", str(audio), "--seed", str(i),
                                                     "--pace", str(pace), "--output", str(tmp / f"s{i}.mp4"),
                                                     "--timeout", "300"])
            reports[i] = client.run(args)
        except BaseException as exc:   # noqa: BLE001 (reported)
            errors.append(f"session {i}: {exc}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    if errors:
        raise AvatarForcingError("; ".join(errors))
    frames = sum(r["received"] for r in reports)
    return {"sessions": n, "wall_s": round(wall, 3), "frames": frames, "total_fps": round(frames / wall, 2),
            "delay_mean_s": round(statistics.fmean(r["delay_mean_s"] for r in reports), 4),
            "delay_p95_s": round(max(r["delay_p95_s"] for r in reports), 4),
            "first_block_latency_s": round(statistics.fmean(r["first_block_latency_s"] for r in reports), 4),
            "dropped": sum(r["dropped"] for r in reports),
            "behind_realtime": any(r["behind_realtime"] for r in reports)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", default="1,2,4,8")
    p.add_argument("--seconds", type=float, default=4.0, help="audio per session (default: 4)")
    p.add_argument("--config", default=None)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_serve.json"))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    try:
        counts = [int(x) for x in args.sessions.split(",") if x.strip()]
    except ValueError:
        print(f"error: --sessions must be a comma-separated list of ints, got '{args.sessions}'", file=sys.stderr)
        return 1
    from avatarforcing.media import load_audio, write_wav

    client = _live_client()
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        audio = tmp / "speech.wav"
        write_wav(audio, load_audio(ROOT / "assets" / "example.wav")[:int(args.seconds * 16000)])
        for mode in ("batched", "sequential"):
            server_args = ["--max-sessions", str(max(counts))] + (["--no-batch"] if mode == "sequential" else [])
            server_args += (["--config", args.config] if args.config else []) + list(args.overrides)
            with running_server(*server_args, timeout=180) as url:
                for n in counts:
                    row = {"mode": mode}
                    for pace, name in ((0.0, "throughput"), (1.0, "realtime")):
                        r = run_clients(client, url, n, audio, pace, tmp)
                        row["sessions"] = n
                        row[name] = r
                    print(f"{mode:10s} {n} session(s): {row['throughput']['total_fps']:7.1f} frames/s total; "
                          f"real time: delay {row['realtime']['delay_mean_s']:.2f} s mean / "
                          f"{row['realtime']['delay_p95_s']:.2f} s p95, dropped {row['realtime']['dropped']}, "
                          f"behind real time: {row['realtime']['behind_realtime']}", flush=True)
                    results.append(row)
    out = {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "seconds_per_session": args.seconds,
           "config": args.config or "configs/demo.yaml", "overrides": list(args.overrides),
           "date": time.strftime("%Y-%m-%d"), "rows": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

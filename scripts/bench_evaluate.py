#!/usr/bin/env python
"""How long scripts/evaluate.py takes for one minute of 480x832 video, stage by stage (CPU by default).

    python scripts/bench_evaluate.py [--seconds 2] [--height 480 --width 832] [--device cpu] [--threads N]

Every metric (sync, csim, fid, fvd, adj_lpips, delta_e, psnr, ssim, flicker) runs on a synthetic clip of --seconds
with random weights in the real architectures; the time is scaled linearly to 60 s (each stage is per frame or
per 16-frame clip).  Prints and writes results/bench_evaluate.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

import torch  # noqa: E402

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.evaluation.bench import bench_evaluation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="length of the measured clip (default 2 s)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "results" / "bench_evaluate.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = bench_evaluation(args.seconds, args.height, args.width, args.device)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(f"one minute of {args.height}x{args.width} video: {result['seconds_per_minute'] / 60:.1f} min on "
          f"{result['device']} ({result['torch_threads']} threads); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

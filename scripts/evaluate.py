#!/usr/bin/env python
"""Evaluate generated talking-head videos with the peers' metrics (SyncNet, ArcFace, FID, FVD, LPIPS, CIEDE2000).

    python scripts/evaluate.py --generated outputs/ --reference refs/ [--ground-truth real/] \
        --metrics sync,csim,fid,fvd,adj_lpips,delta_e --weights eval_weights/ --out results.json

DIR_OR_LIST: a folder, a .txt list (one path a line) or one file; references / audio / ground truth are matched
to the generated videos by file name (or by line, for two .txt lists).  Weights layout and download commands:
docs/evaluation.md.  Without --weights only the weight-free metrics (delta_e, psnr, ssim, flicker) run, on centre
crops.  Writes the JSON (per video, aggregate, seconds per stage) and a markdown table next to it (.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.evaluation.runner import CROPS, METRICS, evaluate_videos, jsonable, markdown_table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generated", required=True, help="generated videos: folder, .txt list or file")
    p.add_argument("--reference", help="reference images (or videos: first frame), matched by name; csim, delta_e")
    p.add_argument("--ground-truth", help="real videos: fid/fvd reference set; psnr/ssim against the same name")
    p.add_argument("--audio", help="driving audio for sync (default: each video's own audio track)")
    p.add_argument("--metrics", help=f"comma-separated, from {','.join(METRICS)} (default: all whose inputs are given)")
    p.add_argument("--weights", help="weights folder (docs/evaluation.md); omit for weight-free metrics only")
    p.add_argument("--out", default="results.json", help="output JSON; the markdown table goes next to it (.md)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--crop", default="auto", choices=CROPS, help="face crops: s3fd (with --weights) or centre")
    p.add_argument("--tail-seconds", type=float, default=10.0, help="length of the 'last' split (default 10 s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AvatarForcingError(f"cannot create the output folder {out.parent} ({exc.strerror}); "
                                     "choose a writable --out") from None
        results = evaluate_videos(args.generated, args.reference, args.ground_truth, args.audio,
                                  args.metrics.split(",") if args.metrics else None, args.weights,
                                  args.device, args.crop, args.tail_seconds, progress=not args.no_progress)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = markdown_table(results)
    out.write_text(json.dumps(jsonable(results), indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

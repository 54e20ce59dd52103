#!/usr/bin/env python
"""The paper's ablations (Tables 3-6, Figures 4-5) on a real config, real checkpoints and real clips.

    python scripts/ablations.py --config configs/avatarforcing.yaml --checkpoint checkpoints/model.pt \
        --eval-list eval.txt --tables 3,4,5,6 [--ode-checkpoint ode.pt] [--teacher-checkpoint teacher.pt] \
        [--baseline-self-forcing sf.pt] [--baseline-causal-ode causal.pt] [--metrics sync,csim,...] \
        [--weights eval_weights/] [--out results/ablations] [--seconds 20] [--fast] [key=value ...]

The eval list holds one item a line: ``image audio [ground_truth_video]`` (paths relative to the list file, quoted
if they have spaces, ``#`` comments).  Every variant (avatarforcing/ablations.py) streams every item with the same
noise seed; the videos are scored with the peers' metrics (avatarforcing/evaluation/, docs/evaluation.md): with
--weights sync, csim, fid, fvd, adj_lpips, delta_e (FID / FVD and psnr / ssim need ground-truth videos), without
it the weight-free delta_e and flicker (+ psnr, ssim).  Variants whose model is not given (Table 4's teacher and
ODE student) are reported as not evaluated; Table 6 uses the trained baselines if given, else the DMD / ODE
students at L = 1.  Each paper claim is judged by a paired bootstrap over the items (>= 2 items; use 10+).

Writes to --out: tableN.csv / tableN_per_case.csv / tableN.md, tables.md (the tables and the claims), summary.json,
fig4_latency.png / fig5_stability.png (Table 3) and samples/tableN_side_by_side.mp4 (the first item).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.ablations import (FAST_GRID, FULL_GRID, TAIL_SECONDS, add_arguments, cli,  # noqa: E402
                                     parse_tables, print_summary, read_eval_list, run_tables)

MODEL_FLAGS = {"dmd": "checkpoint", "ode": "ode_checkpoint", "teacher": "teacher_checkpoint",
               "self_forcing": "baseline_self_forcing", "causal_ode": "baseline_causal_ode"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", required=True, help="the student's config (e.g. configs/avatarforcing.yaml)")
    p.add_argument("--checkpoint", required=True, help="the final (DMD) student")
    p.add_argument("--eval-list", required=True, help="one item a line: image audio [ground_truth_video]")
    p.add_argument("--ode-checkpoint", help="the ODE-only student (Table 4 'Student'; Table 6's causal-ODE fallback)")
    p.add_argument("--teacher-checkpoint", help="the bidirectional teacher (Table 4)")
    p.add_argument("--baseline-self-forcing", help="a trained one-step Self-Forcing baseline (Table 6)")
    p.add_argument("--baseline-causal-ode", help="a trained one-step causal-ODE baseline (Table 6)")
    p.add_argument("--metrics", help="comma-separated, from sync,csim,fid,fvd,adj_lpips,delta_e,psnr,ssim,flicker "
                                     "(default: all whose weights and inputs are given)")
    p.add_argument("--weights", help="metric weights folder (docs/evaluation.md); omit for weight-free metrics")
    p.add_argument("--eval-device", default="auto", help="device of the metric models: auto | cpu | cuda | cuda:N")
    p.add_argument("--crop", default="auto", help="face crops: auto | s3fd | centre")
    p.add_argument("--out", default="results/ablations")
    p.add_argument("--seconds", type=float, default=None, help="cut every item's audio to this length")
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return cli(_main, parse_args(argv))


def _main(args) -> int:
    from avatarforcing.ablations import resolve_config
    from avatarforcing.evaluation.scorer import VideoScorer

    tables = parse_tables(args.tables)
    if args.seconds is not None and args.seconds <= 0:
        raise AvatarForcingError(f"--seconds must be > 0, got {args.seconds}")
    models = {name: getattr(args, flag) for name, flag in MODEL_FLAGS.items()}
    for name, flag in MODEL_FLAGS.items():
        if models[name] is not None and not Path(models[name]).is_file():
            raise AvatarForcingError(f"--{flag.replace('_', '-')} {models[name]} not found; pass an existing "
                                     "checkpoint")
    items = read_eval_list(args.eval_list, args.seconds)
    cfg = resolve_config(args.config, list(args.overrides))
    grid = FAST_GRID if args.fast else FULL_GRID
    teacher_steps = args.teacher_steps or (4 if args.fast else int(cfg.ode.teacher_steps))
    scorer = VideoScorer(args.metrics.split(",") if args.metrics else None, args.weights, args.eval_device,
                         args.crop, TAIL_SECONDS, ground_truth=any(i.ground_truth is not None for i in items))
    settings = {"config": str(args.config), "overrides": list(args.overrides), "eval_list": str(args.eval_list),
                "items": [i.name for i in items], "seconds": args.seconds, "seed": args.seed, "fast": bool(args.fast),
                "grid": [list(grid[0]), list(grid[1])], "teacher_steps": teacher_steps, "tail_seconds": TAIL_SECONDS,
                "models": {k: v for k, v in models.items() if v}, "metrics": list(scorer.evaluator.metrics),
                "weights": args.weights, "device": str(cfg.inference.device)}
    intro = (f"Config `{args.config}`, final student `{args.checkpoint}`; {len(items)} item(s) of `{args.eval_list}`"
             f"{f' cut to {args.seconds:g} s' if args.seconds else ''}, noise seed {args.seed}; teacher: "
             f"{teacher_steps} Euler steps with CFG over the whole clip.  Generated by `scripts/ablations.py`"
             f"{' --fast' if args.fast else ''}.")
    if len(items) < 2:
        print("warning: one item: the claims need >= 2 items for a paired bootstrap (use 10+)", file=sys.stderr)
    summary = run_tables(tables, models, items, scorer, cfg, Path(args.out), grid, teacher_steps, args.seed,
                         not args.no_videos, args.variant_videos, intro, settings)
    print_summary(summary, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's ablations (Tables 3-6, Figures 4-5) in the synthetic world, on the models of a world run.

The generic runner (avatarforcing/ablations.py, also behind scripts/ablations.py for real weights and clips) with
the world's run layout, held-out cases and metrics (avatarforcing/world/evaluate.py's WorldScorer).

    python scripts/world_ablations.py --run runs/world --config configs/world/base.yaml --out results/world \
        [--tables 3,4,5,6] [--cases 2] [--seconds 60] [--fast] [--teacher-steps K] [key=value ...]

Reads (written by avatarforcing/world/pipeline.py; layout: avatarforcing/world/layout.py): RUN/codec.pt,
RUN/metric_nets.pt, RUN/teacher/export/model.pt, RUN/ode_student/export/model.pt, RUN/dmd/export/model.pt and, if present, the one-step causal baselines
RUN/causal_ode/export/model.pt and RUN/self_forcing/export/model.pt.

Every variant is rolled out on the same held-out clips (avatarforcing/world/evaluate.py: world seed 10_000, never
used in training) for --seconds, evaluated as Total / Last (final 10 s) and averaged over the cases.

  Tables (avatarforcing/ablations.py): 3 the L x N grid (L, N in 1,2,4,8; --fast: L in 1,2,4, N in 1,2) of the
  final student at inference + fig4_latency.png, fig5_stability.png; 4 teacher / ODE student / DMD student and
  the dual anchors; 5 anchor-audio zero padding and RoPE re-indexing; 6 the one-step causal baselines at L = 1
  (the trained baselines if the run has them, else the DMD / ODE students run with L = 1).  Each paper claim is
  judged by a paired bootstrap over the cases (inconclusive or not evaluated with 1 case).

Writes to --out: tableN.csv / tableN_per_case.csv / tableN.md, tables.md (all tables and an auto-generated
claims section; results/README.md embeds it), summary.json, the PNGs, and samples/tableN_side_by_side.mp4 (case 0, the
real clip then the variants left to right, audio muxed; order in the .txt next to it).  tables.md and
summary.json are rewritten after every table, so a partial run leaves the tables done so far; --reuse skips
tables whose results in summary.json were made with the same settings.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.ablations import (FAST_GRID, FULL_GRID, TAIL_SECONDS, add_arguments, cli,  # noqa: E402
                                     parse_tables, print_summary, resolve_config, run_tables)
from avatarforcing.world.evaluate import (HELD_OUT_WORLD_SEED, WorldScorer, case_item, held_out_cases,  # noqa: E402
                                          load_metric_nets, run_overrides, world_version)
from avatarforcing.world.layout import RunLayout  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run", default="runs/world", help="run folder of avatarforcing/world/pipeline.py")
    p.add_argument("--config", default="configs/world/base.yaml")
    p.add_argument("--out", default="results/world")
    p.add_argument("--cases", type=int, default=2, help="held-out clips")
    p.add_argument("--seconds", type=float, default=60.0, help="rollout length")
    p.add_argument("--metric-nets", default=None, help="default RUN/metric_nets.pt")
    p.add_argument("--case-seed", type=int, default=HELD_OUT_WORLD_SEED, help="world seed of the held-out clips")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (latencies depend on it)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the tables already in summary.json if made with the same settings (and skip them)")
    add_arguments(p)
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def device_name(cfg) -> str:
    dev = str(cfg.inference.device)
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)"
            if dev == "cpu" or not torch.cuda.is_available() else dev)


def reused_tables(summary_path: Path, settings: dict) -> dict:
    """--reuse: the tables of summary.json if it was made with the same settings (date, git, device aside)."""
    if not summary_path.is_file():
        return {}
    old = json.loads(summary_path.read_text())
    same = {k: v for k, v in settings.items() if k not in ("date", "git", "device")}
    if {k: old.get("settings", {}).get(k) for k in same} == json.loads(json.dumps(same)):
        return {int(k): v for k, v in old.get("tables", {}).items()}
    print("--reuse: summary.json was made with other settings; recomputing everything", flush=True)
    return {}


def main(argv=None) -> int:
    return cli(_main, parse_args(argv))


def _main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = parse_tables(args.tables)
    if args.cases < 1 or args.seconds <= 0:
        raise AvatarForcingError("--cases must be >= 1 and --seconds > 0")
    run, out = Path(args.run), Path(args.out)
    layout = RunLayout(run)
    models = layout.models()
    nets_path = Path(args.metric_nets) if args.metric_nets else layout.metric_nets
    missing = [str(p) for p in (models["dmd"], nets_path) if not p.is_file()]
    if missing:
        raise AvatarForcingError("missing run files for tables " + ",".join(map(str, tables)) + ": "
                                 + ", ".join(missing) + "; run avatarforcing/world/pipeline.py first")
    if not layout.codec.is_file():
        print(f"warning: {layout.codec} not found: the config's vae is used as is", file=sys.stderr)
    cfg = resolve_config(args.config, run_overrides(run) + list(args.overrides))
    size = int(cfg.inference.height)
    if int(cfg.inference.width) != size:
        raise AvatarForcingError("the world is square: set inference.height == inference.width")
    grid = FAST_GRID if args.fast else FULL_GRID
    teacher_steps = args.teacher_steps or (4 if args.fast else int(cfg.ode.teacher_steps))

    cases = held_out_cases(args.cases, args.seconds, size=size, seed=args.case_seed, version=world_version(cfg),
                           cache_dir=run / "cases", workers=max(1, args.threads or 1))
    settings = {"run": str(run), "config": str(args.config), "overrides": list(args.overrides), "cases": args.cases,
                "seconds": args.seconds, "frames": cases[0].num_frames, "case_world_seed": args.case_seed,
                "case_clip_seeds": [c.seed for c in cases], "seed": args.seed, "fast": bool(args.fast),
                "grid": [list(grid[0]), list(grid[1])], "teacher_steps": teacher_steps, "tail_seconds": TAIL_SECONDS,
                "device": device_name(cfg), "threads": torch.get_num_threads(), "git": git_commit(),
                "date": datetime.date.today().isoformat(),
                "checkpoints": {k: (str(p), os.path.getmtime(p)) for k, p in models.items() if p.is_file()}}
    previous = reused_tables(out / "summary.json", settings) if args.reuse else {}
    intro = (f"In the synthetic world: run `{run}`, config `{args.config}`; {args.cases} held-out case(s) (world seed "
             f"{args.case_seed}, clip indices 0..{args.cases - 1}; never used in training), {args.seconds:g}-second "
             f"rollouts ({cases[0].num_frames} frames at 25 fps), teacher: {teacher_steps} Euler steps with CFG over "
             f"the whole clip.  Device: {settings['device']}.  Generated {settings['date']} by "
             f"`scripts/world_ablations.py`{' --fast' if args.fast else ''}.")
    summary = run_tables(tables, models, [case_item(c) for c in cases], WorldScorer(load_metric_nets(nets_path)),
                         cfg, out, grid, teacher_steps, args.seed, not args.no_videos, args.variant_videos, intro,
                         settings, previous, real_row=True)
    print_summary(summary, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

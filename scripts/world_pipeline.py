"""Run the paper's pipeline end to end on the synthetic talking-heads world (CPU, ~45 min on 2 cores).

    python scripts/world_pipeline.py [--config configs/world/pipeline.yaml] [--stages teacher,ode] [key=value ...]

Stages: data, codec, shards, teacher, backfill, ode, dmd, metric_nets, evaluate.  Finished stages are
skipped, so calling it again resumes.  world.ship=true copies the result to assets/demo/ (the demo model).
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.config import load_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/world/pipeline.yaml")
    ap.add_argument("--stages", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from avatarforcing.world.layout import RunLayout
        from avatarforcing.world.pipeline import run_pipeline
        cfg = load_config(args.config, args.overrides)
        run_pipeline(cfg, args.stages.split(",") if args.stages else None)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(RunLayout(cfg.world.run).state_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

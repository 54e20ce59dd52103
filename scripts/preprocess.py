"""Videos with audio (+ captions) -> training clip samples (VAE latents, reference latent, audio, text).

    python scripts/preprocess.py --config configs/train_teacher_tiny.yaml data.source=videos/ data.shards=data/shards
    python scripts/preprocess.py --config ... --rank 0 --world 4 ...   # or under torchrun / accelerate launch

Resumable (done samples are skipped); see avatarforcing/train/preprocess.py and data.py for the format.
"""
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from avatarforcing import AvatarForcingError  # noqa: E402


def main(argv=None) -> int:
    from avatarforcing.train.data import sharded_job_parser
    ap = sharded_job_parser(__doc__)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from avatarforcing.config import load_config
        from avatarforcing.train.data import dist_rank_world
        from avatarforcing.train.preprocess import preprocess
        cfg = load_config(args.config, args.overrides)
        rank, world = dist_rank_world(args.rank, args.world)
        stats = preprocess(cfg, rank, world, progress=not args.no_progress)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())

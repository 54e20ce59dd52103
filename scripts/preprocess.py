"""Videos with audio (+ captions) -> training clip samples (VAE latents, reference latent, audio, text).

    python scripts/preprocess.py --config configs/train_teacher_tiny.yaml data.source=videos/ data.shards=data/shards
    python scripts/preprocess.py --config ... --rank 0 --world 4 ...   # or under torchrun / accelerate launch

Resumable (done samples are skipped); see avatarforcing/train/preprocess.py and data.py for the format.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from avatarforcing.train.data import run_sharded_job, sharded_job_parser
    args = sharded_job_parser(__doc__).parse_args(argv)

    def job(cfg, rank, world):
        from avatarforcing.train.preprocess import preprocess
        return preprocess(cfg, rank, world, progress=not args.no_progress)
    return run_sharded_job(args, job)


if __name__ == "__main__":
    sys.exit(main())

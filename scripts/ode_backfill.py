"""ODE backfill: teacher Euler trajectories (CFG) stored at exactly the student's timesteps.

    python scripts/ode_backfill.py --config configs/train_ode_tiny.yaml data.shards=data/shards data.ode=data/ode \
        ode.teacher=runs/teacher/export/model.pt
    torchrun --nproc_per_node 8 scripts/ode_backfill.py --config configs/train_ode.yaml ...   # sharded over processes

The stored timesteps are WindowSchedule.from_config(schedule).timesteps; the teacher's sigma grid
(ode.teacher_steps, ode.teacher_shift) is built to contain them exactly.  Resumable (done samples skipped).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    from avatarforcing.train.data import run_sharded_job, sharded_job_parser
    ap = sharded_job_parser(__doc__)
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda:$LOCAL_RANK when available)")
    args = ap.parse_args(argv)

    def job(cfg, rank, world):
        import os

        import torch

        from avatarforcing.train.ode import backfill
        device = args.device
        if device is None and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
        return backfill(cfg, rank, world, device=device, progress=not args.no_progress)
    return run_sharded_job(args, job)


if __name__ == "__main__":
    sys.exit(main())

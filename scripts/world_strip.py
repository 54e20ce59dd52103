"""A strip of frames: one held-out case's real video above the shipped student's and its broken variants.

    python scripts/world_strip.py --config configs/world/sway_student.yaml --out results/world_sway/strip.png \
        [--case 0] [--seconds 4] [--every 4] [--controls "temporal cache at wrong RoPE positions,context noise at t = 1000"]

Rows, top to bottom: the real video, the clean student, then each named control of avatarforcing/world/controls.py
(same noise seed as the benches).  Columns: every --every-th frame from the start, --seconds long.  The case is
held-out case --case of the benches' world (world seed 10_000), so the strip shows what the benches score.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.ablations import cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the student's config (its inference.checkpoint is the student)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--case", type=int, default=0, help="held-out case index")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--every", type=int, default=4, help="keep every n-th frame")
    p.add_argument("--controls", default="", help="comma-separated control names (controls.json's 'control')")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _main(args) -> int:
    import torch
    from PIL import Image

    from avatarforcing.config import load_config, resolve_path
    from avatarforcing.world.bench import Arm, rollout_arm
    from avatarforcing.world.controls import controls
    from avatarforcing.world.evaluate import HELD_OUT_WORLD_SEED, held_out_cases, world_version

    known = {c.name: c for c in controls()}
    wanted = [n.strip() for n in args.controls.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise AvatarForcingError(f"unknown control(s) {unknown}; choose from {sorted(known)}")
    if args.every < 1 or args.seconds <= 0 or args.case < 0:
        raise AvatarForcingError("--every must be >= 1, --seconds > 0 and --case >= 0")
    torch.set_num_threads(2)
    cfg = load_config(args.config)
    student = resolve_path(cfg.inference.checkpoint or "")
    if not Path(student).is_file():
        raise AvatarForcingError(f"student checkpoint not found: '{student}'; set inference.checkpoint in {args.config}")
    cases = held_out_cases(args.case + 2, args.seconds, size=int(cfg.inference.height), seed=HELD_OUT_WORLD_SEED,
                           version=world_version(cfg))                # the next case lends a control its identity
    case = cases[args.case]
    rows = [case.real_frames]
    for arm in [Arm("clean")] + [known[n] for n in wanted]:          # an arm's overrides need their own pipeline
        frames, _ = rollout_arm(arm, arm.pipe(cfg, student), case, cases, seed=args.seed)
        rows.append(frames)
    n = min(len(r) for r in rows)
    strip = np.concatenate([np.concatenate(list(r[:n:args.every]), axis=1) for r in rows], axis=0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(strip).save(out)
    print(f"wrote {out}: rows real, clean{''.join(', ' + w for w in wanted)}; every {args.every}th of {n} frames")
    return 0


def main(argv=None) -> int:
    return cli(_main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""Stage 2: DMD on rolling-window rollouts (mixed-window backprop) against the frozen CFG teacher.

    python train_dmd.py --config configs/train_dmd_tiny.yaml dmd.teacher=<teacher> dmd.generator=<ODE export>
    accelerate launch train_dmd.py --config configs/train_dmd.yaml ...
"""
import sys

from avatarforcing.train.dmd import DMDStage
from avatarforcing.train.loop import main

if __name__ == "__main__":
    sys.exit(main(DMDStage, description=__doc__))

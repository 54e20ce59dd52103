"""Stage 1: one-step ODE regression of the streaming student on stored teacher trajectories.

    python train_ode.py --config configs/train_ode_tiny.yaml data.ode=data/ode
    accelerate launch train_ode.py --config configs/train_ode.yaml data.ode=... train.init=<teacher or Wan2.1>
"""
import sys

from avatarforcing.train.ode import ODEStage
from avatarforcing.train.loop import main

if __name__ == "__main__":
    sys.exit(main(ODEStage, description=__doc__))

"""Train the bidirectional audio-conditioned teacher by flow matching.

    python train_teacher.py --config configs/train_teacher_tiny.yaml data.shards=data/shards
    accelerate launch train_teacher.py --config configs/train_teacher.yaml data.shards=... train.init=<Wan2.1 folder>
"""
import sys

from avatarforcing.train.teacher import TeacherStage
from avatarforcing.train.loop import main

if __name__ == "__main__":
    sys.exit(main(TeacherStage, description=__doc__))

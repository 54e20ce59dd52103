"""Kill-and-resume: a run killed midway and resumed ends bit-identical to an uninterrupted run (CPU)."""
import os
import signal
import subprocess
import sys
import time

import torch

from avatarforcing.config import load_config
from avatarforcing.train.dmd import DMDStage
from avatarforcing.train.synthetic import random_dit, write_checkpoint, write_clip_samples
from avatarforcing.train.teacher import TeacherStage
from avatarforcing.train.checkpointing import complete_checkpoints
from avatarforcing.train.loop import run_stage


def assert_same(a, b, path="state"):
    """Bit-exact equality of nested checkpoint contents (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def final_state(out):
    state = torch.load(complete_checkpoints(out / "checkpoints")[-1] / "state.pt", weights_only=False)
    return {k: state[k] for k in ("step", "models", "ema", "optimizers", "schedulers", "data")}


def test_teacher_killed_with_sigkill_and_resumed_is_bit_exact(tmp_path):
    shards = tmp_path / "shards"
    over = lambda out: [f"data.shards={shards}", f"train.output_dir={out}", "train.steps=10", "train.save_every=2",
                        "train.progress=false", "train.keep_checkpoints=0"]
    cfg = load_config("configs/train_teacher_tiny.yaml", over(tmp_path / "a"))
    write_clip_samples(cfg, shards, 3)
    run_stage(TeacherStage, cfg)                                          # uninterrupted

    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "train_teacher.py", "--config", "configs/train_teacher_tiny.yaml",
                             *over(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoints" / "step_00000004").is_dir():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = complete_checkpoints(out / "checkpoints")
    killed_at = int(done[-1].name.split("_")[1]) if done else 0
    print(f"killed after checkpoint {killed_at}")
    assert killed_at < 10, "the run finished before it could be killed"
    (out / "checkpoints" / ".step_00000099.tmp").mkdir(parents=True, exist_ok=True)   # a half-written save
    run_stage(TeacherStage, load_config("configs/train_teacher_tiny.yaml", over(out)))   # train.resume=auto
    assert_same(final_state(tmp_path / "a"), final_state(out))
    assert (out / "export" / "model.pt").is_file()


def test_dmd_stopped_and_resumed_is_bit_exact(tmp_path):
    cfg0 = load_config("configs/train_dmd_tiny.yaml", [f"data.shards={tmp_path / 'shards'}"])
    write_clip_samples(cfg0, tmp_path / "shards", 2)
    write_checkpoint(random_dit(cfg0, 1, head_std=0.05), tmp_path / "teacher.pt")
    over = lambda out, *x: load_config("configs/train_dmd_tiny.yaml", [
        f"dmd.data={tmp_path / 'shards'}", f"dmd.teacher={tmp_path / 'teacher.pt'}", f"train.output_dir={out}",
        "train.steps=4", "train.save_every=0", "train.progress=false", "train.grad_accum=2", *x])
    run_stage(DMDStage, over(tmp_path / "a"))
    run_stage(DMDStage, over(tmp_path / "b", "train.stop_after=2"))
    assert [p.name for p in complete_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_00000002"]
    run_stage(DMDStage, over(tmp_path / "b"))
    assert_same(final_state(tmp_path / "a"), final_state(tmp_path / "b"))

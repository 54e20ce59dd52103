"""The shipped demo: `python inference.py` with no arguments makes a talking-face mp4 from the example inputs."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from avatarforcing.config import load_config
from avatarforcing.media import load_audio, probe_video, read_video

ROOT = Path(__file__).resolve().parent.parent


def test_demo_assets_are_shipped():
    for name in ("assets/demo/model.pt", "assets/demo/codec.pt", "assets/example.png", "assets/example.wav",
                 "configs/demo.yaml"):
        assert (ROOT / name).is_file(), f"{name} is missing: run scripts/world_pipeline.py world.ship=true"


def test_inference_without_arguments_makes_the_demo_video(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # run from another folder: the defaults must not depend on the working directory
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "inference.output=" + str(tmp_path / "demo.mp4")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert out == tmp_path / "demo.mp4"
    info = probe_video(out)
    seconds = len(load_audio(ROOT / "assets" / "example.wav")) / 16000
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    size = (int(cfg.inference.width), int(cfg.inference.height))
    assert info["has_audio"] and info["fps"] == 25.0 and (info["width"], info["height"]) == size
    assert info["frames"] >= seconds * 25 and (info["frames"] - 1) % 16 == 0
    frames, _ = read_video(out)
    # a trained model: frames are a face, not noise; the mouth region moves over time
    assert frames.std(axis=0).mean() < 40
    H, W = frames.shape[1:3]
    mouth = frames[:, int(H * 0.56):int(H * 0.78), int(W * 0.375):int(W * 0.625)].astype(np.float32)
    assert np.abs(np.diff(mouth, axis=0)).mean() > 0.5


EXAMPLES = {"v1": (ROOT / "assets" / "example.png", ROOT / "assets" / "example.wav"),
            "v2": (ROOT / "assets" / "world_v2" / "example.png", ROOT / "assets" / "world_v2" / "example.wav")}


def _world_video(tmp_path, config, world, *overrides):
    """inference.py with ``config`` on world ``world``'s example inputs -> frames [T, 64, 64, 3]."""
    image, audio = EXAMPLES[world]
    out = tmp_path / f"{world}_{len(list(tmp_path.iterdir()))}.mp4"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--config", config,
                           "--image", str(image), "--audio", str(audio),
                           "inference.output=" + str(out), *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    frames, _ = read_video(out)
    assert frames.shape[1:] == (64, 64, 3) and len(frames) >= 25 * len(load_audio(audio)) / 16000
    return frames


def test_world_v2_student_makes_a_video(tmp_path):
    """World v2's shipped student (configs/world/v2_student.yaml) on its example inputs, through inference.py."""
    frames = _world_video(tmp_path, "configs/world/v2_student.yaml", "v2")
    assert frames.std(axis=0).mean() < 40                 # a face, not noise


@pytest.mark.parametrize("config,world", [("configs/world/v2_anchor_student.yaml", "v2"),
                                          ("configs/world/anchor_student.yaml", "v1")])
def test_attention_only_student_takes_identity_from_its_anchor(tmp_path, config, world):
    """The shipped students with no reference channels (in_dim 16: the anchor world's, and world v1's in
    configs/world/anchor_student.yaml) make a face from their example.  Without the style anchor the student never
    sees the reference and the face changes from the first block; with the reference as the first frame of its
    temporal cache instead, the first block is the anchored one, and then the face drifts (results/world_v2_anchor/,
    results/world_anchor/: the style-anchor claim)."""
    frames = _world_video(tmp_path, config, world)
    assert frames.std(axis=0).mean() < 40
    blind = _world_video(tmp_path, config, world, "cache.style_anchor=false")
    seeded = _world_video(tmp_path, config, world, "cache.style_anchor=false", "cache.reference_in_temporal=true")
    change = lambda a, s: np.abs(a[s].astype(np.float32) - frames[s]).mean()    # noqa: E731
    first, late = slice(1, 17), slice(-48, None)                       # block 0 (frame 0 is the image) / last 3
    assert change(blind, first) > 20 and change(blind, late) > 20
    assert change(seeded, first) < 5 < 20 < change(seeded, late)

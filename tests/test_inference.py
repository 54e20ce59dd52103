"""inference.py end to end (subprocess) on the tiny random model: our CLI, the release's CLI, and errors."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from avatarforcing.config import load_config
from avatarforcing.media import probe_video
from avatarforcing.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
BLOCK_FRAMES = 16                                   # 4 latent frames x 4 video frames


def run(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")     # tiny model: one thread is fastest on a shared CPU
    return subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=240)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (77, 100, 4), dtype=np.uint8), "RGBA").save(d / "face.png")
    t = np.arange(int(0.9 * 44100)) / 44100                               # 0.9 s, 44.1 kHz stereo
    sf.write(d / "speech.wav", np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], 1), 44100)
    (d / "bad.wav").write_bytes(b"RIFF not really a wav file" * 10)
    return d


def expected_frames(seconds: float) -> int:
    rows = 1 + math.ceil(seconds * 25)                                     # video frames the audio drives
    blocks = max(1, math.ceil(math.ceil((rows - 1) / 4) / 4))
    return 1 + BLOCK_FRAMES * blocks


def test_cli_writes_video_with_audio(inputs, tmp_path):
    out = tmp_path / "out" / "avatar.mp4"
    proc = run("--image", inputs / "face.png", "--audio", inputs / "speech.wav", "--output", out, "--seed", 3,
               "--config", TINY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    info = probe_video(out)
    assert expected_frames(0.9) == 33
    # keep_aspect (the default, as in the release): 100x77 within a 64*64 area, floored to multiples of 16
    assert info == dict(frames=33, fps=25.0, width=64, height=48, has_audio=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["avatar.mp4"]  # no temporary files left
    assert "random" in proc.stderr                                         # says the weights are random


def test_release_command_with_data_list(inputs, tmp_path):
    cfg = load_config(TINY)
    model = build_model(cfg.model)
    ckpt = tmp_path / "checkpoints" / "model.pt"
    ckpt.parent.mkdir()
    torch.save({"generator": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    data = tmp_path / "data"
    data.mkdir()
    (data / "list.txt").write_text(
        f'{inputs / "face.png"} {inputs / "speech.wav"} "a person talking, studio light"\n'
        f"\n../data/img2.png  speech2.wav 'second one'\n")
    Image.new("RGB", (64, 96), (200, 120, 90)).save(data / "img2.png")
    sf.write(data / "speech2.wav", np.zeros(4000, np.float32), 16000)
    proc = run("--config_path", TINY, "--output_folder", tmp_path / "outputs", "--checkpoint_path", ckpt,
               "--data_path", data / "list.txt", "--num_output_frames", 6, "--i2v", "inference.batch_size=2",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    paths = sorted(proc.stdout.strip().splitlines()[-2:])
    assert [os.path.basename(p) for p in paths] == ["0000_face.mp4", "0001_img2.mp4"]
    assert "note:" in proc.stderr and "multiple of B" in proc.stderr     # 6 latent frames -> 9 (2 blocks)
    # keep_aspect gives the two images different sizes (100x77 -> 64x48, 64x96 -> 48x64): two batches of one
    for p, (w, h) in zip(paths, [(64, 48), (48, 64)]):
        assert probe_video(p) == dict(frames=1 + 2 * BLOCK_FRAMES, fps=25.0, width=w, height=h, has_audio=True)
    assert "loaded DiT weights" in proc.stderr


@pytest.mark.parametrize("case", ["missing image", "unreadable audio", "unwritable output", "unknown key"])
def test_errors_are_one_line(inputs, tmp_path, case):
    out = tmp_path / "out" / "x.mp4"
    args = ["--image", inputs / "face.png", "--audio", inputs / "speech.wav", "--output", out, "--config", TINY]
    if case == "missing image":
        args[1] = tmp_path / "nope.png"
    elif case == "unreadable audio":
        args[3] = inputs / "bad.wav"
    elif case == "unwritable output":
        (tmp_path / "file").write_text("a file, not a folder")
        out = tmp_path / "file" / "x.mp4"
        args[5] = out
    else:
        args.append("model.no_such_key=1")
    proc = run(*args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("*.mp4"))

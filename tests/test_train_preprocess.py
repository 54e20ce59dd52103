"""scripts/preprocess.py on generated mp4/wav files (tiny random VAE, weight-free audio features, no text model)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from avatarforcing.config import load_config
from avatarforcing.media import VideoWriter, write_wav
from avatarforcing.train import data as D
from avatarforcing.train.preprocess import list_sources, preprocess


def make_video(path, frames, fps, size=(80, 96), audio=None, seed=0):
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.integers(0, 255, (1, h, w, 3))
    video = np.clip(base + np.arange(frames)[:, None, None, None] * 2, 0, 255).astype(np.uint8)
    with VideoWriter(path, fps=fps, audio_path=audio) as wr:
        wr.write(video)


def tone(seconds, freq=220.0):
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_preprocess_videos_to_clip_samples(tmp_path):
    src = tmp_path / "videos"
    src.mkdir()
    write_wav(tmp_path / "a_audio.wav", tone(2.0))
    make_video(src / "a.mp4", 60, 30, audio=tmp_path / "a_audio.wav")      # 2 s at 30 fps -> 50 frames at 25 fps
    make_video(src / "b.mp4", 30, 25, seed=1)                              # silent video, audio beside it
    write_wav(src / "b.wav", tone(1.2, 330))
    (src / "b.txt").write_text("a person talking")
    (src / "broken.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "shards"
    over = [f"data.source={src}", f"data.shards={out}", "data.clips_per_video=null"]
    r = subprocess.run([sys.executable, "scripts/preprocess.py", "--config", "configs/train_teacher_tiny.yaml",
                        "--no-progress", *over], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["written"] == 3 and stats["bad"] == 1 and stats["bad_files"][0].endswith("broken.mp4")
    assert "broken.mp4" in r.stderr and "broken.mp4" in (out / "errors_rank0.txt").read_text()
    files = D.list_samples(out)
    assert len(files) == 3
    for f in files:
        s, meta = D.read_sample(f, with_metadata=True)
        assert s["latents"].shape == (16, 7, 8, 8) and s["ref"].shape == (16, 1, 8, 8)
        assert torch.equal(s["ref"], s["latents"][:, :1])
        assert s["audio"].shape == (7, 256) and s["audio"][0].abs().sum() == 0 and s["audio"][1:].abs().sum() > 0
        assert s["text"].shape[-1] == 32
    caps = {D.read_sample(f, with_metadata=True)[1]["caption"] for f in files}
    assert "a person talking" in caps
    assert (out / D.NULL_TEXT).is_file()

    # resumable: a second run (here in-process, 2 "processes" one after the other) writes nothing new
    cfg = load_config("configs/train_teacher_tiny.yaml", over)
    assert sum(preprocess(cfg, rank, 2, progress=False)["written"] for rank in (0, 1)) == 0

    # on_error=fail: the bad video stops the run with its name (a and b are done, only broken.mp4 is left)
    from avatarforcing import AvatarForcingError
    with pytest.raises(AvatarForcingError, match="broken.mp4"):
        preprocess(load_config("configs/train_teacher_tiny.yaml", over + ["data.on_error=fail"]), progress=False)

    # a CSV source with video / audio / caption columns
    (tmp_path / "list.csv").write_text("video,audio,caption\nvideos/b.mp4,videos/b.wav,hello there\n")
    assert list_sources(tmp_path / "list.csv")[0]["caption"] == "hello there"
    cfg = load_config("configs/train_teacher_tiny.yaml", [f"data.source={tmp_path / 'list.csv'}",
                                                          f"data.shards={tmp_path / 'csv_shards'}", "data.on_error=fail"])
    assert preprocess(cfg, progress=False)["written"] == 1

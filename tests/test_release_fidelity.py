"""Release-fidelity switches end to end: the reference image's size rule (inference.resize)."""
from __future__ import annotations

import numpy as np
import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.config import apply_overrides, load_config
from avatarforcing.media import read_video
from avatarforcing.pipeline import AvatarPipeline


def portrait(h: int = 64, w: int = 32) -> np.ndarray:
    arr = np.full((h, w, 3), 40, np.uint8)
    arr[: h // 8] = 250                         # a bright band at the top: cover-crop would cut it away
    return arr


@pytest.fixture(scope="module")
def tiny_cfg(repo_root):
    return load_config(repo_root / "configs/tiny.yaml", ["schedule.block_frames=1"])


def test_keep_aspect_video_follows_the_image(tiny_cfg, tmp_path, repo_root):
    pipe = AvatarPipeline.from_config(tiny_cfg)             # 64x64 area budget, keep_aspect (the default)
    assert pipe.resize == "keep_aspect"
    out = pipe.generate(portrait(), repo_root / "assets/example.wav", tmp_path / "p.mp4", num_blocks=1, progress=False)
    frames, _ = read_video(out)
    assert frames.shape[1:3] == (80, 32)                    # 1:2 kept within 64*64, floored to multiples of 16
    cover = pipe.replace(resize="cover")
    frames_c, _ = read_video(cover.generate(portrait(), repo_root / "assets/example.wav", tmp_path / "c.mp4",
                                            num_blocks=1, progress=False))
    assert frames_c.shape[1:3] == (64, 64)


def test_keep_aspect_batch_of_different_shapes_is_refused(tiny_cfg):
    pipe = AvatarPipeline.from_config(tiny_cfg)
    with pytest.raises(AvatarForcingError, match="different sizes.*inference.batch_size=1 or inference.resize=cover"):
        pipe.load_images([portrait(), portrait(32, 64)])


def test_bad_resize_value(tiny_cfg):
    with pytest.raises(AvatarForcingError, match="inference.resize is 'crop'; use keep_aspect"):
        AvatarPipeline.from_config(apply_overrides(tiny_cfg, ["inference.resize=crop"]))

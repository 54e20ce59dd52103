"""Config loading: defaults, experiment layering, overrides, strictness, reference-release configs."""
import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.config import load_config
from avatarforcing.schedule import WindowSchedule


def test_defaults_and_overrides():
    cfg = load_config(None, ["schedule.passes=2", "cache.temporal_frames=3", "schedule.steps=[1000,500]"])
    assert cfg.schedule.passes == 2 and cfg.cache.temporal_frames == 3 and list(cfg.schedule.steps) == [1000, 500]
    assert cfg.model.dim == 1536


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(AvatarForcingError, match="unknown config key 'schedule.nope'"):
        load_config(None, ["schedule.nope=1"])
    p = tmp_path / "x.yaml"
    p.write_text("cache:\n  temporal_frame: 3\n")
    with pytest.raises(AvatarForcingError, match="unknown config key .*temporal_frame"):
        load_config(p)
    with pytest.raises(AvatarForcingError, match="key=value"):
        load_config(None, ["schedule.passes"])
    with pytest.raises(AvatarForcingError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_experiment_layering(tmp_path):
    (tmp_path / "base.yaml").write_text("schedule:\n  block_frames: 2\n")
    (tmp_path / "exp.yaml").write_text("defaults: [base.yaml]\ncache:\n  style_anchor: false\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert cfg.schedule.block_frames == 2 and cfg.cache.style_anchor is False


def test_reference_release_config(tmp_path):
    p = tmp_path / "avatarforcing.yaml"
    p.write_text(
        "denoising_step_list: [1000, 750, 500, 250]\nwarp_denoising_step: true\nnum_frame_per_block: 4\n"
        "context_noise: 0\ni2v: true\nmodel_kwargs:\n  timestep_shift: 5.0\n  model_init_kwargs:\n"
        "    num_frame_per_block: 4\n    local_attn_size: 12\n")
    cfg = load_config(p)
    assert list(cfg.schedule.steps) == [1000, 750, 500, 250] and cfg.schedule.shift == 5.0
    assert WindowSchedule.from_config(cfg.schedule).L == 4


def test_release_config_sets_the_release_behaviour(repo_root):
    """configs/avatarforcing.yaml (reference layout) carries our release-fidelity switches."""
    cfg = load_config(repo_root / "configs/avatarforcing.yaml")
    assert cfg.cache.rerun_anchor == "absolute" and cfg.inference.resize == "keep_aspect"
    assert cfg.audio.file_features == "offline" and cfg.inference.dtype == "auto"
    assert list(cfg.schedule.steps) == [1000, 800, 400, 200] and cfg.schedule.block_frames == 4

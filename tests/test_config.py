"""Config loading: defaults, experiment layering, overrides, strictness, reference-release configs."""
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from avatarforcing import AvatarForcingError
from avatarforcing.config import _TYPES, _schema, load_config
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


# ---- value types -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, example", [
    ("schedule.window_blocks=abc", "is not an int (expected an int or null); e.g. schedule.window_blocks=2"),
    ("schedule.passes=abc", "is not an int (expected an int); e.g. schedule.passes=1"),
    ("inference.fps=abc", "is not an int (expected an int); e.g. inference.fps=25"),
    ("cache.temporal_frames=abc", "is not an int (expected an int); e.g. cache.temporal_frames=2"),
])
def test_wrong_type_override_is_one_line_error_before_loading(repo_root, tmp_path, override, example):
    out = tmp_path / "x.mp4"
    proc = subprocess.run([sys.executable, str(repo_root / "inference.py"), "--config", str(repo_root / "configs/tiny.yaml"),
                           "--output", str(out), override], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {override} {example}"], proc.stderr       # nothing loaded: no warnings before it
    assert not out.exists() and proc.stdout == ""


def test_every_default_key_has_a_type():
    schema = _schema()                                   # raises if a null / empty-list default lacks a _TYPES entry
    assert set(_TYPES) <= set(schema)                    # no stale entries
    assert schema["seed"].kind == "int" and schema["schedule.shift"].kind == "float"
    assert schema["model.patch_size"].elem == "int" and schema["train.betas"].elem == "float"


@pytest.mark.parametrize("key", sorted(k for k, v in _TYPES.items() if "|null" in v))
def test_nullable_keys_accept_null_and_their_type(key):
    spec = _schema()[key]
    assert OmegaConf.select(load_config(None, [f"{key}=null"]), key) is None
    good = {"int": "3", "float": "2.5", "str": "some/path", "list": "[1,2.5]" if spec.elem == "float" else "[a=1]"}
    cfg = load_config(None, [f"{key}={good[spec.kind]}"]) if spec.kind != "list" or spec.elem != "str" else None
    if spec.kind == "float":
        assert OmegaConf.select(load_config(None, [f"{key}=3"]), key) == 3          # an int is a float too
    if cfg is not None:
        assert OmegaConf.select(cfg, key) is not None
    bad = "[1,2]" if spec.kind == "str" else "abc"
    with pytest.raises(AvatarForcingError, match=rf"^{key}={re.escape(bad)} is not .* or null\); e\.g\. {key}="):
        load_config(None, [f"{key}={bad}"])


def test_other_types(tmp_path):
    with pytest.raises(AvatarForcingError, match=r"^cache.style_anchor=1 is not a bool \(expected true or false\)"):
        load_config(None, ["cache.style_anchor=1"])
    with pytest.raises(AvatarForcingError, match=r"^seed=1.5 is not an int"):
        load_config(None, ["seed=1.5"])
    with pytest.raises(AvatarForcingError, match=r"^model.patch_size=\[1,2.5,2\] is not a list of ints"):
        load_config(None, ["model.patch_size=[1,2.5,2]"])
    with pytest.raises(AvatarForcingError, match=r"^schedule=3 sets a whole section"):
        load_config(None, ["schedule=3"])
    cfg = load_config(None, ["schedule.shift=3", "inference.prompt=123", "train.mixed_precision=no",
                             "schedule.steps=[1000,952.5]", "schedule.window_blocks=null"])
    assert cfg.schedule.shift == 3 and cfg.inference.prompt == "123" and cfg.train.mixed_precision == "no"
    assert list(cfg.schedule.steps) == [1000, 952.5] and cfg.schedule.window_blocks is None
    # YAML values are checked too, naming the file
    p = tmp_path / "x.yaml"
    p.write_text("schedule:\n  window_blocks: abc\n")
    with pytest.raises(AvatarForcingError, match=r"config file .*x.yaml: schedule.window_blocks: abc is not an int"):
        load_config(p)
    p.write_text("train:\n  mixed_precision: no\n")                   # YAML 'no' is false: quote it
    with pytest.raises(AvatarForcingError, match=r"mixed_precision: false is not a str .*quote"):
        load_config(p)
    # reference-layout files: the translated values are checked
    p.write_text("denoising_step_list: [1000, abc]\nnum_frame_per_block: 4\ninference:\n  fps: x\n")
    with pytest.raises(AvatarForcingError, match=r"schedule.steps: \[1000,abc\] is not a list of numbers"):
        load_config(p)
    p.write_text("denoising_step_list: [1000, 500]\nnum_frame_per_block: 4\ninference:\n  fps: x\n")
    with pytest.raises(AvatarForcingError, match=r"inference.fps: x is not an int"):
        load_config(p)


def test_world_section_lives_in_the_world_configs(repo_root):
    """`world:` is a plugin section (avatarforcing/world registers it): configs/world/* set it, the rest lack it."""
    assert "world" not in load_config(None) and "world" not in load_config(repo_root / "configs/tiny.yaml")
    with pytest.raises(AvatarForcingError, match=r"unknown config key 'world.run'.*world config"):
        load_config(repo_root / "configs/tiny.yaml", ["world.run=/tmp/x"])
    cfg = load_config(repo_root / "configs/world/pipeline.yaml", ["world.clips=3"])
    assert cfg.world.clips == 3 and cfg.world.run == "runs/world"
    with pytest.raises(AvatarForcingError, match=r"world.clips=abc is not an int"):
        load_config(repo_root / "configs/world/pipeline.yaml", ["world.clips=abc"])


def test_world_override_lists_are_checked(tmp_path, repo_root):
    base = repo_root / "configs/world/base.yaml"
    cfg = load_config(base, ["world.teacher_overrides=[train.steps=2,train.lr=1.0e-3]"])
    assert list(cfg.world.teacher_overrides) == ["train.steps=2", "train.lr=1.0e-3"]
    with pytest.raises(AvatarForcingError, match=r"world.teacher_overrides: train.steps=x is not an int"):
        load_config(base, ["world.teacher_overrides=[train.steps=x]"])
    p = tmp_path / "w.yaml"
    p.write_text("world:\n  dmd_overrides:\n    - train.stepz=1\n")
    with pytest.raises(AvatarForcingError, match=r"unknown config key 'train.stepz'"):
        load_config(p)


def test_every_shipped_config_loads(repo_root):
    paths = sorted((repo_root / "configs").rglob("*.yaml"))
    assert repo_root / "configs/avatarforcing.yaml" in paths and repo_root / "configs/world/fast.yaml" in paths
    for path in paths:
        load_config(path)

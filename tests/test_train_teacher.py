"""Teacher stage: flow matching from YAML, CFG, the Euler sampler's grid."""
import pytest
import torch

from avatarforcing.checkpoint import load_dit
from avatarforcing.config import load_config
from avatarforcing.model import build_model
from avatarforcing.train import data as D
from avatarforcing.train.synthetic import random_dit, write_clip_samples
from avatarforcing.train.teacher import TeacherStage, guidance_text, guided_flow, sigma_grid
from avatarforcing.train.loop import Trainer


def test_teacher_lowers_its_loss_from_yaml(tmp_path):
    cfg = load_config("configs/train_teacher_tiny.yaml", [
        f"data.shards={tmp_path / 'shards'}", f"train.output_dir={tmp_path / 'run'}", "train.steps=12",
        "train.progress=false", "train.save_every=0"])
    write_clip_samples(cfg, tmp_path / "shards", 2)
    tr = Trainer(cfg, "teacher")
    stage = TeacherStage(cfg, tr)
    batch = D.collate([stage.data.ds.get(i) for i in range(2)])           # the fixed small batch
    before = stage.eval_loss(batch)
    tr.run(stage)
    after = stage.eval_loss(batch)
    print(f"teacher fixed-batch loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    # the export loads into a fresh model with load_dit (what ODE backfill / inference do)
    m = build_model(cfg.model)
    load_dit(m, tmp_path / "run" / "export" / "model.pt", use_ema=True)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000012"


def test_cfg_combines_three_passes():
    cfg = load_config("configs/train_teacher_tiny.yaml")
    model = random_dit(cfg, 0, head_std=0.05).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 5, 4, 4, generator=g)
    ref, t = torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([[0.0, 500, 500, 500, 500]])
    audio, text, neg = torch.randn(1, 5, 256, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(8, 32, generator=g)
    with torch.no_grad():
        v3 = guided_flow(model, x, t, ref, audio, guidance_text(text, neg, 3), 3.0, 2.0)
        v2 = guided_flow(model, x, t, ref, audio, guidance_text(text, neg, 2), 3.0, 3.0)
        a0 = audio.clone()
        a0[:, 0] = 0
        c = model.clip(x, ref, t, a0, text)
        m = model.clip(x, ref, t, torch.zeros_like(a0), text)
        u = model.clip(x, ref, t, torch.zeros_like(a0), neg[None])
    torch.testing.assert_close(v3, u + 3.0 * (m - u) + 2.0 * (c - m), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v2, u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)


def test_sigma_grid_contains_the_student_sigmas_exactly():
    student = [1.0, 0.9523809523809523, 0.7692307692307693, 0.5555555555555556]
    for steps in (4, 8, 40, 50):
        grid = sigma_grid(steps, 5.0, student)
        assert grid[0] == 1.0 and grid[-1] == 0.0
        assert all(a > b for a, b in zip(grid, grid[1:]))
        assert all(s in grid for s in student)                            # exact membership, no tolerance
        assert len(grid) - 1 >= steps


def test_wandb_is_optional(tmp_path):
    import importlib.util

    from avatarforcing import AvatarForcingError
    cfg = load_config("configs/train_teacher_tiny.yaml", [f"train.output_dir={tmp_path}", "train.wandb=true"])
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(AvatarForcingError, match="pip install wandb"):
        Trainer(cfg, "teacher")

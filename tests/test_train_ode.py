"""ODE backfill (stored timesteps) and ODE regression (inference-exact context, loss decrease)."""
import os
import subprocess
import sys

import pytest
import torch

from avatarforcing import AvatarForcingError
from avatarforcing.stream_state import CacheConfig, NoiseSource
from avatarforcing.config import load_config
from avatarforcing.sampler import StreamingSampler
from avatarforcing.schedule import WindowSchedule
from avatarforcing.train import data as D
from avatarforcing.train.ode import ODEStage, backfill, backfill_grid, build_cache, window_x0
from avatarforcing.train.synthetic import random_dit, write_checkpoint, write_clip_samples
from avatarforcing.train.teacher import euler_sample, guidance_text
from avatarforcing.train.loop import Trainer


_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ode")
    cfg = load_config("configs/train_ode_tiny.yaml", [f"data.shards={root / 'shards'}"])
    write_clip_samples(cfg, root / "shards", 3)
    write_checkpoint(random_dit(cfg, 7), root / "teacher.pt")
    return root


def _cfg(root, *extra):
    return load_config("configs/train_ode_tiny.yaml", [
        f"data.shards={root / 'shards'}", f"ode.teacher={root / 'teacher.pt'}", "train.progress=false", *extra])


def test_backfill_stores_the_configured_timesteps(world):
    for steps, out in (("[1000,800,400,200]", "ode_a"), ("[1000,500]", "ode_b")):
        cfg = _cfg(world, f"schedule.steps={steps}", f"data.ode={world / out}")
        stats = backfill(cfg, progress=False)
        assert stats["written"] == 3
        want = WindowSchedule.from_config(cfg.schedule).timesteps
        for p in D.list_samples(world / out):
            s = D.read_sample(p)
            assert s["timesteps"].tolist() == want                        # exactly the student's timesteps
            assert s["trajectory"].shape[0] == len(want) and s["clean"].shape == (16, 7, 8, 8)
            assert torch.equal(s["trajectory"][:, :, :1], s["ref"][None].expand(len(want), -1, -1, -1, -1))
    a = D.read_sample(D.list_samples(world / "ode_a")[0])["timesteps"].tolist()
    b = D.read_sample(D.list_samples(world / "ode_b")[0])["timesteps"].tolist()
    assert len(a) == 4 and len(b) == 2 and a[1] == pytest.approx(952.381, abs=1e-3) and b[1] == pytest.approx(833.333, abs=1e-3)
    # resumable: nothing left to do
    assert backfill(_cfg(world, "schedule.steps=[1000,500]", f"data.ode={world / 'ode_b'}"), progress=False)["written"] == 0


def test_stored_states_lie_on_the_teacher_trajectory(world):
    cfg = _cfg(world, f"data.ode={world / 'ode_a'}")
    if not (world / "ode_a").is_dir():
        backfill(cfg, progress=False)
    path = D.list_samples(world / "ode_a")[0]
    s = D.read_sample(path)
    from avatarforcing.checkpoint import load_dit
    from avatarforcing.model import build_model
    from avatarforcing.units import stable_seed as _seed_of
    teacher = build_model(cfg.model).eval()
    load_dit(teacher, world / "teacher.pt")
    g = torch.Generator().manual_seed(_seed_of(0, path.stem))
    noise = torch.randn((1, 16, 7, 8, 8), generator=g)
    grid, sigmas = backfill_grid(cfg)
    null = D.read_null_text(world / "shards", 8, 32)
    text = guidance_text(D.pad_text(s["text"], 8)[None], null["negative"], 2)
    clean, states = euler_sample(teacher, noise, s["ref"][None], s["audio"][None], text, grid, 2.0, 2.0, record=sigmas)
    torch.testing.assert_close(torch.stack([x[0] for x in states]), s["trajectory"], atol=1e-5, rtol=0)
    torch.testing.assert_close(clean[0], s["clean"], atol=1e-5, rtol=0)
    assert torch.equal(s["trajectory"][0, :, 1:], noise[0, :, 1:])            # level 0 = t 1000 = the noise


def test_backfill_cli_and_ode_refuses_a_store_for_other_timesteps(world, tmp_path):
    out = tmp_path / "ode_cli"
    r = subprocess.run([sys.executable, "scripts/ode_backfill.py", "--config", "configs/train_ode_tiny.yaml",
                        "--no-progress", f"data.shards={world / 'shards'}", f"data.ode={out}",
                        f"ode.teacher={world / 'teacher.pt'}", "schedule.steps=[1000,500]", "ode.num_samples=1"],
                       capture_output=True, text=True, timeout=120, env=_ENV)
    assert r.returncode == 0, r.stderr
    assert len(D.list_samples(out)) == 1
    cfg = _cfg(world, f"data.ode={out}", f"train.output_dir={tmp_path / 'run'}", "train.batch_size=1")
    tr = Trainer(cfg, "ode")
    with pytest.raises(AvatarForcingError, match="timesteps.*re-run scripts/ode_backfill.py"):
        ODEStage(cfg, tr)
    r = subprocess.run([sys.executable, "train_ode.py", "--config", "configs/train_ode_tiny.yaml",
                        f"data.ode={out}", f"train.output_dir={tmp_path / 'run2'}", "train.batch_size=1"],
                       capture_output=True, text=True, timeout=120, env=_ENV)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "timesteps" in r.stderr


def test_ode_context_reproduces_the_streaming_sampler_exactly():
    """Window x0 with build_cache (clean history = the sampler's emitted blocks) equals StreamingSampler's,
    also with a noisy context (context_noise > 0: both draw the re-run noise from the stream's NoiseSource) and
    without a style anchor, the reference starting the temporal cache (cache.reference_in_temporal)."""
    cfg = load_config("configs/train_ode_tiny.yaml")
    torch.manual_seed(0)
    model = random_dit(cfg, 3, head_std=0.1).eval()
    sch = WindowSchedule.from_config(cfg.schedule)
    g = torch.Generator().manual_seed(1)
    nb, B = 4, sch.B
    ref = torch.randn(1, 16, 1, 4, 4, generator=g)
    audio = torch.randn(1, 1 + nb * B, 256, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    for cache_kw in (dict(), dict(rope_reindex=False, zero_anchor_audio=False, context_noise=0),
                     dict(context_noise=200.0), dict(context_noise=120.0, rerun_anchor="absolute"),
                     dict(style_anchor=False, reference_in_temporal=True)):   # a causal model's cache, no anchor
        cc = CacheConfig(**{**CacheConfig.from_config(cfg.cache).__dict__, **cache_kw})
        noise = NoiseSource(5)
        sampler = StreamingSampler(model, sch, cc, ref, text, audio=lambda s, e: audio[:, s:e], noise=noise, num_blocks=nb)
        clean = torch.zeros(1, 16, 1 + nb * B, 4, 4)
        clean[:, :, :1] = ref
        for step in sch.plan(nb):
            xs = [sampler.window[b] if age > 0 else noise(b, 0, (1, 16, B, 4, 4)) for b, age in zip(step.blocks, step.ages)]
            x = torch.cat(xs, 2)
            lv = [sch.level(a, 0) for a in step.ages]
            t = torch.tensor([[sch.timesteps[l] for l in lv for _ in range(B)]])
            sigma = torch.tensor([[sch.sigmas[l] for l in lv for _ in range(B)]])
            with torch.no_grad():
                cache = build_cache(model, cc, sch, ref, text, clean, audio, step.blocks[0], context_blocks=nb,
                                    noise=noise)   # the stream's noise: the re-runs see the same noisy context
                mine = window_x0(model, cache, sch, step, x, t, sigma, ref, audio)
                out = sampler.step()
            theirs = torch.cat([out["x0"][b] for b in step.blocks], 2)
            torch.testing.assert_close(mine, theirs.float(), atol=2e-5, rtol=0)
            if out["emitted"] is not None:
                b, x0 = out["emitted"]
                clean[:, :, 1 + b * B:1 + (b + 1) * B] = x0


def test_ode_regression_lowers_its_loss_from_yaml(world, tmp_path):
    cfg = _cfg(world, f"data.ode={world / 'ode_a'}", f"train.output_dir={tmp_path / 'run'}", "train.steps=15",
               "train.save_every=0", f"train.init={world / 'teacher.pt'}")
    if not (world / "ode_a").is_dir():
        backfill(cfg, progress=False)
    tr = Trainer(cfg, "ode")
    stage = ODEStage(cfg, tr)
    batch = D.collate([stage.data.ds.get(i) for i in range(3)])
    before = stage.eval_loss(batch)
    tr.run(stage)
    after = stage.eval_loss(batch)
    print(f"ODE fixed-batch loss (all windows of the plan) {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before
    assert (tmp_path / "run" / "export" / "model.pt").is_file()

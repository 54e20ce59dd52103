"""DMD: the gradient formula, mixed-window backprop, training from YAML, the memory model."""
import pytest
import torch

from avatarforcing import AvatarForcingError
from avatarforcing.stream_state import CacheConfig, NoiseSource
from avatarforcing.config import load_config
from avatarforcing.model import PRESETS
from avatarforcing.sampler import StreamingSampler
from avatarforcing.schedule import WindowSchedule
from avatarforcing.train import data as D
from avatarforcing.train.dmd import DMDStage, choose_backprop_steps, dmd_gradient, dmd_loss, rollout
from avatarforcing.train.memory import dmd_memory
from avatarforcing.train.synthetic import random_dit, write_checkpoint, write_clip_samples
from avatarforcing.train.loop import Trainer


def test_dmd_gradient_matches_a_direct_computation():
    x = torch.tensor([[[1.0, 2.0], [3.0, 5.0]], [[0.0, -1.0], [2.0, 2.0]]], requires_grad=True)
    fake = torch.tensor([[[1.5, 2.0], [2.0, 5.0]], [[1.0, -1.0], [2.0, 0.0]]])
    real = torch.tensor([[[1.0, 1.0], [3.0, 4.0]], [[0.0, 1.0], [2.0, 2.0]]])
    # by hand: sample 0 mean|x - real| = (0 + 1 + 0 + 1) / 4 = 0.5 ; sample 1 = (0 + 2 + 0 + 0) / 4 = 0.5
    g_hand = torch.tensor([[[0.5, 1.0], [-1.0, 1.0]], [[1.0, -2.0], [0.0, -2.0]]]) / 0.5
    g = dmd_gradient(x, fake, real)
    assert torch.equal(g, g_hand)
    dmd_loss(x, g, "sum").backward()
    assert torch.equal(x.grad, g_hand)                                    # dL/dx = g exactly
    x.grad = None
    dmd_loss(x, g, "mean").backward()
    torch.testing.assert_close(x.grad, g_hand / x.numel(), atol=0, rtol=1e-7)
    # through a toy generator x = theta * z: dL/dtheta = sum(g * z)
    theta, z = torch.tensor(0.7, requires_grad=True), torch.randn(2, 2, 2)
    xg = theta * z
    g = dmd_gradient(xg, fake, real)
    dmd_loss(xg, g, "sum").backward()
    torch.testing.assert_close(theta.grad, (g * z).sum())


def test_mixed_window_backprop_only_through_the_chosen_steps():
    cfg = load_config("configs/train_dmd_tiny.yaml")
    model = random_dit(cfg, 1, head_std=0.05)
    sch = WindowSchedule.from_config(cfg.schedule)
    nb, B = 3, sch.B
    g = torch.Generator().manual_seed(0)
    picks = {tuple(choose_backprop_steps(sch, nb, 1, torch.Generator().manual_seed(s))) for s in range(20)}
    emitting = {s.index for s in sch.plan(nb) if s.emits is not None}
    assert all(len(p) == 1 and p[0] in emitting for p in picks) and len(picks) > 1
    assert choose_backprop_steps(sch, nb, 1, torch.Generator().manual_seed(4)) == \
        choose_backprop_steps(sch, nb, 1, torch.Generator().manual_seed(4))  # same seed, same choice
    ref = torch.randn(1, 16, 1, 4, 4, generator=g)
    audio = torch.randn(1, 1 + nb * B, 256, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    step = sorted(emitting)[1]                                            # emits block 1
    x = rollout(model, sch, CacheConfig.from_config(cfg.cache), ref, model.text_kv(text), audio, nb, NoiseSource(0), [step])
    assert x.shape == (1, 16, 1 + nb * B, 4, 4)
    model.zero_grad()
    x[:, :, 1 + B:1 + 2 * B].sum().backward()
    assert model.blocks[0].self_attn.q.weight.grad.abs().sum() > 0
    assert model.text_embedding[0].weight.grad.abs().sum() > 0            # the text path is trained too
    with torch.no_grad():
        ref_x = rollout(model, sch, CacheConfig.from_config(cfg.cache), ref, model.text_kv(text), audio, nb, NoiseSource(0))
    torch.testing.assert_close(x.detach(), ref_x)                         # grad or not, the same rollout
    # blocks emitted by no-grad steps carry no gradient to the parameters
    x2 = rollout(model, sch, CacheConfig.from_config(cfg.cache), ref, model.text_kv(text), audio, nb, NoiseSource(0), [step])
    params = [p for p in model.parameters()]
    for blk in (0, 2):
        grads = torch.autograd.grad(x2[:, :, 1 + blk * B:1 + (blk + 1) * B].sum(), params, allow_unused=True,
                                    retain_graph=True)
        assert all(gr is None or gr.abs().sum() == 0 for gr in grads)


@pytest.fixture(scope="module")
def dmd_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmd")
    cfg = load_config("configs/train_dmd_tiny.yaml", [f"data.shards={root / 'shards'}"])
    write_clip_samples(cfg, root / "shards", 2)
    write_checkpoint(random_dit(cfg, 11, head_std=0.05), root / "teacher.pt")
    write_checkpoint(random_dit(cfg, 12, head_std=0.05), root / "student.pt")
    return root


def dmd_cfg(root, out, *extra):
    return load_config("configs/train_dmd_tiny.yaml", [
        f"dmd.data={root / 'shards'}", f"dmd.teacher={root / 'teacher.pt'}", f"dmd.generator={root / 'student.pt'}",
        f"train.output_dir={out}", "train.progress=false", *extra])


@pytest.mark.parametrize("grad_blocks", ["emitted", "window"])
def test_dmd_trains_from_yaml(dmd_world, tmp_path, grad_blocks):
    cfg = dmd_cfg(dmd_world, tmp_path / "run", "train.steps=6", "train.save_every=0", f"dmd.grad_blocks={grad_blocks}")
    tr = Trainer(cfg, "dmd")
    st = DMDStage(cfg, tr)
    batch = D.collate([st.data.ds.get(i) for i in range(2)])
    # fixed evaluation: rollout noise, t and eps fixed; critic loss on the initial generator's rollouts, and the
    # DMD regression to the fixed target x - g computed before training
    with torch.no_grad():
        x_init = st.generate(batch, 0, 0, "eval")
        _, g0 = st.generator_loss(x_init, batch, torch.Generator().manual_seed(5))
        target = x_init[:, :, 1:] - g0
    crit_before = st.critic_loss(x_init, batch, torch.Generator().manual_seed(6)).item()
    gen_before = 0.5 * (g0 ** 2).mean().item()
    tr.run(st)
    with torch.no_grad():
        x_after = st.generate(batch, 0, 0, "eval")
        crit_after = st.critic_loss(x_init, batch, torch.Generator().manual_seed(6)).item()
    gen_after = 0.5 * ((x_after[:, :, 1:] - target) ** 2).mean().item()
    print(f"DMD ({grad_blocks}) critic fixed-batch loss {crit_before:.4f} -> {crit_after:.4f}; "
          f"generator DMD loss to the fixed target {gen_before:.3e} -> {gen_after:.3e}")
    assert crit_after < 0.95 * crit_before
    assert gen_after < gen_before
    assert (tmp_path / "run" / "export" / "model.pt").is_file()


def test_memory_model_of_the_1p3b_dmd_stage():
    one = dmd_memory(PRESETS["wan2.1-1.3b"])
    eight = dmd_memory(PRESETS["wan2.1-1.3b"], world=8, fsdp=True)
    assert 1.3e9 < one["params"] < 1.5e9
    assert one["generator_states"] == pytest.approx(16 * one["params"] / 2 ** 30)
    assert eight["total"] < one["total"] / 2 and one["total"] > 40


def test_dmd_data_defaults_to_the_ode_store():
    """dmd.data is ${data.ode} unless set; neither set is a one-line error naming the key."""
    cfg = load_config("configs/train_dmd_tiny.yaml", ["data.ode=/some/ode_store"])
    assert cfg.dmd.data == "/some/ode_store"
    assert load_config("configs/train_dmd_tiny.yaml", ["data.ode=a", "dmd.data=b"]).dmd.data == "b"
    with pytest.raises(AvatarForcingError, match=r"dmd.data is not set .*dmd.data=<ODE store or shards folder>"):
        DMDStage(load_config("configs/train_dmd_tiny.yaml"), None)


def test_window_grad_blocks_reach_every_window_position():
    """dmd.grad_blocks=window: the clip ends with the chosen step's x0 of every block in its window, and each of
    them (every noise level of the window) carries gradient; emitted blocks before it are the rollout's."""
    cfg = load_config("configs/train_dmd_tiny.yaml")
    model = random_dit(cfg, 1, head_std=0.05)
    sch = WindowSchedule.from_config(cfg.schedule)
    nb, B, L = 4, sch.B, sch.L
    assert L >= 2
    g = torch.Generator().manual_seed(0)
    ref, audio = torch.randn(1, 16, 1, 4, 4, generator=g), torch.randn(1, 1 + nb * B, 256, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    cc = CacheConfig.from_config(cfg.cache)
    plan = list(sch.plan(nb))
    step = next(s for s in plan if s.emits == 0)                  # emits block 0, blocks 1..L-1 still noisy
    x = rollout(model, sch, cc, ref, model.text_kv(text), audio, nb, NoiseSource(0), [step.index], "window")
    assert x.shape[2] == 1 + len(step.blocks) * B
    with torch.no_grad():                                         # the same step's predictions, without grad
        smp = StreamingSampler(model, sch, cc, ref, model.text_kv(text), audio=lambda s, e: audio[:, s:e],
                               noise=NoiseSource(0), num_blocks=nb)
        for _ in range(step.index + 1):
            out = smp.step()
    want = torch.cat([ref] + [out["x0"][b] for b in step.blocks], 2)
    torch.testing.assert_close(x.detach(), want)
    params = list(model.parameters())
    for j, blk in enumerate(step.blocks):                         # oldest (emitted) to newest (t = 1000)
        grads = torch.autograd.grad(x[:, :, 1 + blk * B:1 + (blk + 1) * B].square().sum(), params,
                                    allow_unused=True, retain_graph=True)
        assert sum(float(gr.abs().sum()) for gr in grads if gr is not None) > 0, f"window position {j}"
    emitted = rollout(model, sch, cc, ref, model.text_kv(text), audio, nb, NoiseSource(0), [step.index])
    assert emitted.shape[2] == 1 + nb * B                          # the default is unchanged: all emitted blocks
    with pytest.raises(AvatarForcingError, match="dmd.grad_blocks"):
        rollout(model, sch, cc, ref, model.text_kv(text), audio, nb, NoiseSource(0), [step.index], "all")

"""Noise schedule and the B_{L,N} window layout."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from avatarforcing import AvatarForcingError
from avatarforcing.schedule import NoiseSchedule, WindowSchedule, add_noise, flow_to_x0
from helpers import schedule_cfg


def test_warped_student_steps_match_spec_and_diffusers():
    sch = WindowSchedule.from_config(schedule_cfg())
    assert sch.timesteps == pytest.approx([1000.0, 952.381, 769.231, 555.556], abs=1e-3)
    assert sch.sigmas == pytest.approx([1.0, 0.952381, 0.769231, 0.555556], abs=1e-6)
    # the shifted 1000-step training table of diffusers holds the same values at those indices
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    table = ref.timesteps.tolist()                       # descending, 1000 entries
    for step, t in zip([1000, 800, 400, 200], sch.timesteps):
        assert table[1000 - step] == pytest.approx(t, abs=1e-3)
    # unwarped steps are used as timesteps directly
    raw = WindowSchedule.from_config(schedule_cfg(warp=False))
    assert raw.timesteps == [1000.0, 800.0, 400.0, 200.0]


def test_flow_identities():
    x0, eps = torch.randn(2, 16, 3, 4, 4), torch.randn(2, 16, 3, 4, 4)
    sigma = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]])
    xt = add_noise(x0, eps, sigma)
    torch.testing.assert_close(flow_to_x0(xt, eps - x0, sigma), x0, atol=1e-5, rtol=1e-5)


def _visits(sch, n_blocks):
    visits = {b: [] for b in range(n_blocks)}
    emitted, sizes = [], []
    for st in sch.plan(n_blocks):
        sizes.append(len(st.blocks))
        assert list(st.blocks) == sorted(st.blocks)
        for b, age in zip(st.blocks, st.ages):
            visits[b].extend(sch.level(age, n) for n in range(sch.N))
        if st.emits is not None:
            emitted.append(st.emits)
    return visits, emitted, sizes


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4, 9])
def test_warmup_steady_drain_default(n_blocks):
    sch = WindowSchedule.from_config(schedule_cfg())
    visits, emitted, sizes = _visits(sch, n_blocks)
    assert emitted == list(range(n_blocks))                        # every block once, in order
    assert all(v == [0, 1, 2, 3] for v in visits.values())         # noisiest -> cleanest, each level once
    assert len(sizes) == n_blocks + 3
    if n_blocks >= 4:
        assert sizes[:3] == [1, 2, 3] and sizes[-3:] == [3, 2, 1] and set(sizes[3:-3]) <= {4}
    assert max(sizes) == min(4, n_blocks)


@pytest.mark.parametrize("L,N,B", [(1, 1, 4), (2, 2, 1), (3, 2, 2), (8, 1, 1), (1, 4, 4)])
def test_other_window_shapes(L, N, B):
    sch = WindowSchedule.from_config(schedule_cfg(steps=None, window_blocks=L, passes=N, block_frames=B))
    assert len(sch.timesteps) == L * N and sch.timesteps[0] == 1000.0
    visits, emitted, sizes = _visits(sch, 7)
    assert emitted == list(range(7))
    assert all(v == list(range(L * N)) for v in visits.values())
    assert max(sizes) == min(L, 7)
    assert sch.latent_frames(7) == 1 + 7 * B


def test_unbounded_plan_never_drains():
    sch = WindowSchedule.from_config(schedule_cfg())
    plan = sch.plan(None)
    steps = [next(plan) for _ in range(50)]
    assert [len(s.blocks) for s in steps[3:]] == [4] * 47
    assert [s.emits for s in steps[3:6]] == [0, 1, 2]


def test_schedule_errors():
    with pytest.raises(AvatarForcingError, match="L\\*N"):
        WindowSchedule.from_config(schedule_cfg(window_blocks=3))
    with pytest.raises(AvatarForcingError, match="decreasing"):
        WindowSchedule([200, 400])
    with pytest.raises(AvatarForcingError, match="window_blocks"):
        WindowSchedule.from_config(schedule_cfg(steps=None))


def test_training_timesteps_shifted_and_clamped():
    ns = NoiseSchedule(1000, 5.0)
    t = ns.sample_timesteps((20000,), generator=torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 980
    assert t.median() > 700   # shift 5 pushes mass to high noise: median sigma = 5*.5/(1+4*.5) = 0.833


def test_blocks_for_video_frames():
    sch = WindowSchedule.from_config(schedule_cfg())
    assert sch.blocks_for_video_frames(897) == 56        # 225 latent frames = 1 + 56*4
    assert sch.blocks_for_video_frames(898) == 57
    assert sch.blocks_for_video_frames(1) == 1

"""The streaming sampler against a from-scratch implementation of Algorithm 1 (no cache reuse)."""
import pytest
import torch

from avatarforcing.sampler import StreamingSampler

from avatarforcing.stream_state import NoiseSource
from avatarforcing.schedule import WindowSchedule, add_noise, flow_to_x0
from helpers import cache_cfg, random_tiny_model, schedule_cfg
from oracle import full_window_forward

H = W = 4


def reference_algorithm1(model, sch, cfg, ref, text, audio, noise, n_blocks):
    """Algorithm 1 written plainly: every window is recomputed from the full history with a mask.

    The context of later windows is the emitted blocks as the clean re-run sees them: noised to
    sigma = context_noise / 1000 with the stream's noise at level -1 when context_noise > 0."""
    B, L, N = sch.B, sch.L, sch.N
    x = {}                       # block -> current noisy latent
    emitted = []                 # clean x0 of emitted blocks, in order
    context = []                 # what the re-run of each emitted block sees
    for i in range(n_blocks + L - 1):
        active = [b for b in range(n_blocks) if b <= i < b + L]
        for b in active:
            if i == b:
                x[b] = noise(b, 0, (1, 16, B, H, W))
        for n in range(N):
            levels = [(i - b) * N + n for b in active]
            xw = torch.cat([x[b] for b in active], 2)
            t = torch.tensor([[sch.timesteps[l] for l in levels for _ in range(B)]])
            s = torch.tensor([[sch.sigmas[l] for l in levels for _ in range(B)]])
            with torch.no_grad():
                v = full_window_forward(model, ref, text, context, xw, t, audio, cfg, B)
            x0 = flow_to_x0(xw, v, s)
            for j, (b, l) in enumerate(zip(active, levels)):
                blk = x0[:, :, j * B:(j + 1) * B]
                if l == L * N - 1:
                    emitted.append(blk)
                    tc = float(cfg.context_noise)
                    context.append(add_noise(blk, noise(b, -1, blk.shape), tc / 1000) if tc > 0 else blk)
                else:
                    x[b] = add_noise(blk, noise(b, l + 1, blk.shape), sch.sigmas[l + 1])
    return emitted


@pytest.mark.parametrize("L,N,B,T,n_blocks,rerun_anchor,context_noise", [
    (4, 1, 2, 2, 6, "window", 0), (2, 2, 1, 3, 5, "window", 0), (3, 1, 2, 2, 2, "window", 0),
    (1, 1, 2, 2, 3, "window", 0), (4, 1, 2, 2, 6, "absolute", 0), (2, 2, 1, 3, 5, "absolute", 0),
    (4, 1, 2, 2, 6, "window", 150.0), (2, 2, 1, 3, 5, "window", 150.0), (2, 4, 2, 1, 4, "absolute", 400.0)])
def test_sampler_equals_reference_algorithm(L, N, B, T, n_blocks, rerun_anchor, context_noise):
    model = random_tiny_model(1)
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(1, 16, 1, H, W, generator=g)
    text = torch.randn(1, 8, model.cfg.text_dim, generator=g)
    audio = torch.randn(1, 1 + n_blocks * B, model.cfg.audio_dim, generator=g)
    steps = None if (L, N) != (4, 1) else [1000, 800, 400, 200]
    sch = WindowSchedule.from_config(schedule_cfg(steps=steps, window_blocks=L, passes=N, block_frames=B))
    cfg = cache_cfg(temporal_frames=T, rerun_anchor=rerun_anchor, context_noise=context_noise)
    smp = StreamingSampler(model, sch, cfg, ref, text, audio=lambda a, b: audio[:, a:b], noise=NoiseSource(7),
                           num_blocks=n_blocks)
    with torch.no_grad():
        got = list(smp)
    want = reference_algorithm1(model, sch, cfg, ref, text, audio, NoiseSource(7), n_blocks)
    assert [b for b, _ in got] == list(range(n_blocks))
    for (_, a), b in zip(got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_sampler_batch_equals_single():
    model = random_tiny_model(2)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 16, 1, H, W, generator=g)
    text = torch.randn(2, 8, model.cfg.text_dim, generator=g)
    audio = torch.randn(2, 9, model.cfg.audio_dim, generator=g)
    sch = WindowSchedule.from_config(schedule_cfg(block_frames=2))

    class PerSampleNoise(NoiseSource):      # batch row r gets the noise of a single-sample stream with seed r
        def __call__(self, block, level, shape):
            return torch.cat([NoiseSource(r)(block, level, (1, *shape[1:])) for r in range(shape[0])])

    with torch.no_grad():
        both = list(StreamingSampler(model, sch, cache_cfg(), ref, text, lambda a, b: audio[:, a:b], PerSampleNoise(0), 4))
        for r in range(2):
            one = list(StreamingSampler(model, sch, cache_cfg(), ref[r:r + 1], text[r:r + 1],
                                        lambda a, b: audio[r:r + 1, a:b], NoiseSource(r), 4))
            for (_, x2), (_, x1) in zip(both, one):
                torch.testing.assert_close(x2[r:r + 1], x1, atol=1e-5, rtol=1e-4)


def test_dmd_style_gradients_flow_only_through_chosen_steps():
    model = random_tiny_model(3)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 16, 1, H, W, generator=g)
    text = torch.randn(1, 8, model.cfg.text_dim, generator=g)
    sch = WindowSchedule.from_config(schedule_cfg(block_frames=1))
    smp = StreamingSampler(model, sch, cache_cfg(), ref, text, num_blocks=3)
    outs = []
    while (o := smp.step(grad=len(outs) == 4)) is not None:     # step 4 emits block 1
        outs.append(o)
    emitted = {o["emitted"][0]: o["emitted"][1] for o in outs if o["emitted"] is not None}
    assert emitted[1].requires_grad and not emitted[0].requires_grad and not emitted[2].requires_grad
    assert smp.cache.temporal.k[0].requires_grad is False


def test_rerun_anchor_position_changes_only_later_blocks():
    """cache.rerun_anchor=absolute (the release) moves the anchor only in the clean re-run, to absolute frame 0.
    With B = T = 2 the re-runs of blocks 0 and 1 start right after frame 0 of [temporal | block] anyway (u = 1,
    so d = -1 is frame 0), hence blocks 0..2 are identical; block 2's re-run (u = 3) differs, and so block 3."""
    model = random_tiny_model(1)
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(1, 16, 1, H, W, generator=g)
    text = torch.randn(1, 8, model.cfg.text_dim, generator=g)
    sch = WindowSchedule.from_config(schedule_cfg(block_frames=2))
    out = {}
    for mode in ("window", "absolute"):
        smp = StreamingSampler(model, sch, cache_cfg(rerun_anchor=mode), ref, text, noise=NoiseSource(7), num_blocks=5)
        with torch.no_grad():
            out[mode] = [x for _, x in smp]
    for b in range(3):
        torch.testing.assert_close(out["window"][b], out["absolute"][b])
    for b in (3, 4):
        assert (out["window"][b] - out["absolute"][b]).abs().max() > 1e-4

"""The DiT and its streaming attention: cached windows vs. one masked full forward, RoPE, audio, masks."""
import pytest
import torch

from avatarforcing.attention import KV, block_causal_groups, frame_mask
from avatarforcing.stream_state import prefill_anchor, write_temporal
from avatarforcing.sampler import StreamingSampler
from avatarforcing.schedule import WindowSchedule, add_noise
from helpers import cache_cfg, random_tiny_model
from oracle import full_window_forward

H = W = 4          # latent grid -> 2x2 = 4 tokens per frame
TEXT = 8


def _setup(seed=0, **model_kw):
    model = random_tiny_model(seed, **model_kw)
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(1, 16, 1, H, W, generator=g)
    text = torch.randn(1, TEXT, model.cfg.text_dim, generator=g)
    audio = torch.randn(1, 80, model.cfg.audio_dim, generator=g)
    return model, ref, text, audio, g


CASES = {
    "default": dict(temporal_frames=2),
    "temporal_spans_blocks": dict(temporal_frames=3),
    "no_style_anchor": dict(temporal_frames=2, style_anchor=False),
    "no_temporal_anchor": dict(temporal_frames=2, temporal_anchor=False),
    "no_rope_reindex": dict(temporal_frames=2, rope_reindex=False),
    "offset_minus_3": dict(temporal_frames=2, anchor_offset=-3),
    "anchor_gets_audio": dict(temporal_frames=2, zero_anchor_audio=False),
    "noisy_context": dict(temporal_frames=2, context_noise=50.0),
}


@pytest.mark.parametrize("case", list(CASES) + ["no_reference_channels"])
def test_cached_window_equals_masked_full_forward(case):
    """After many slides, the cached window forward equals one forward over the whole history with a mask
    (also for a model without reference channels, in_dim 16: identity through the anchor only)."""
    cfg = cache_cfg(**CASES.get(case, CASES["default"]))
    model, ref, text, audio, g = _setup(**({"in_dim": 16} if case == "no_reference_channels" else {}))
    Bf = 2
    sch = WindowSchedule([1000, 700, 300], block_frames=Bf)
    smp = StreamingSampler(model, sch, cfg, ref, text, audio=lambda a, b: audio[:, a:b])
    clean_blocks = []
    for k in range(6):                       # six emitted blocks: the cache slides past its budget
        window = torch.randn(1, 16, 3 * Bf, H, W, generator=g)
        t = torch.tensor([[555.0] * Bf + [769.0] * Bf + [1000.0] * Bf])
        first = 1 + k * Bf
        if not cfg.zero_anchor_audio:
            prefill_anchor(model, smp.cache, smp.ref, audio[:, first:first + 1])
        with torch.no_grad():
            assert smp.cache.next_frame == first
            cached = model.window(window, ref, t, audio[:, first:first + 3 * Bf], smp.cache)
            full = full_window_forward(model, ref, text, clean_blocks, window, t, audio, cfg, Bf)
        torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
        # emit a clean block: the sampler's clean re-run writes the temporal cache
        clean = torch.randn(1, 16, Bf, H, W, generator=g)
        write_temporal(model, smp.cache, sch, smp.ref, k, clean, audio[:, first:first + Bf], smp.noise)
        if cfg.context_noise:   # the re-run saw the block noised to context_noise with the stream's noise
            clean = add_noise(clean, smp.noise(k, -1, clean.shape), cfg.context_noise / 1000)
        clean_blocks.append(clean)
    if cfg.temporal_anchor:
        assert smp.cache.temporal.frames == cfg.temporal_frames
        assert smp.cache.temporal.k[0].shape[1] == cfg.temporal_frames * model.tokens_per_frame(H, W)


@pytest.mark.parametrize("in_dim", [33, 16])
def test_reference_in_temporal_is_frame_zero_of_the_context(in_dim):
    """Without the style anchor, ``reference_in_temporal`` makes the reference latent frame 0 of the temporal
    cache: the first window equals one clip forward over [reference | window] in which the reference (t = 0, zero
    audio) sees only itself.  The reference then leaves with the budget like any emitted frame."""
    model, ref, text, audio, g = _setup(in_dim=in_dim)
    cfg = cache_cfg(temporal_frames=2, style_anchor=False, reference_in_temporal=True)
    sch = WindowSchedule([1000, 500], block_frames=2)
    smp = StreamingSampler(model, sch, cfg, ref, text, audio=lambda a, b: audio[:, a:b])
    assert smp.cache.next_frame == 1 and smp.cache.temporal.frames == 1
    window = torch.randn(1, 16, 4, H, W, generator=g)
    t = torch.tensor([[700.0] * 2 + [1000.0] * 2])
    with torch.no_grad():
        cached = model.window(window, ref, t, audio[:, 1:5], smp.cache)
        x = torch.cat([ref, window], 2)
        a = torch.cat([torch.zeros_like(audio[:, :1]), audio[:, 1:5]], 1)
        mask = frame_mask([1] * 5, [[0]] + [[0, 1, 2, 3, 4]] * 4, model.tokens_per_frame(H, W))
        full = model.clip(x, ref, torch.cat([torch.zeros(1, 1), t], 1), a, text, mask=mask)[:, :, 1:]
        unseeded = model.window(window, ref, t, audio[:, 1:5],
                                StreamingSampler(model, sch, cache_cfg(temporal_frames=2, style_anchor=False),
                                                 ref, text).cache)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4)
    assert (cached - unseeded).abs().max() > 1e-3              # the reference is really in the context
    for k in range(2):
        write_temporal(model, smp.cache, sch, smp.ref, k, torch.randn(1, 16, 2, H, W, generator=g), None, smp.noise)
    assert smp.cache.next_frame == 5 and smp.cache.temporal.frames == 2


def test_model_in_dim_must_fit_the_latent_channels():
    from avatarforcing import AvatarForcingError
    with pytest.raises(AvatarForcingError, match=r"model.in_dim=20 with out_dim=16: use 33 .* or 16"):
        random_tiny_model(0, in_dim=20)


def test_relative_positions_make_streams_unbounded():
    """Window outputs do not depend on how far the stream has run (with re-indexing), even past 1024 frames."""
    model, ref, text, audio, g = _setup()
    sch = WindowSchedule([1000, 500], block_frames=2)
    window = torch.randn(1, 16, 4, H, W, generator=g)
    t = torch.tensor([[700.0] * 2 + [1000.0] * 2])
    clean = torch.randn(1, 16, 2, H, W, generator=g)
    outs = {}
    for start in (1, 21, 5001):
        smp = StreamingSampler(model, sch, cache_cfg(), ref, text)
        smp.cache.next_frame = start - 2          # pretend the stream has already emitted start-3 frames
        write_temporal(model, smp.cache, sch, smp.ref, 0, clean, None, smp.noise)
        with torch.no_grad():
            outs[start] = model.window(window, ref, t, None, smp.cache)
    torch.testing.assert_close(outs[1], outs[21])
    torch.testing.assert_close(outs[1], outs[5001])
    # without re-indexing the anchor drifts away: outputs change with stream position, but still run
    smp = StreamingSampler(model, sch, cache_cfg(rope_reindex=False), ref, text)
    smp.cache.next_frame = 5001
    with torch.no_grad():
        far = model.window(window, ref, t, None, smp.cache)
    assert torch.isfinite(far).all() and not torch.allclose(far, outs[1], atol=1e-4)


def test_rope_depends_only_on_relative_positions():
    model, ref, text, audio, g = _setup()
    x = torch.randn(1, 16, 3, H, W, generator=g)
    t = torch.tensor([[100.0, 500.0, 900.0]])
    with torch.no_grad():
        a = model.clip(x, ref, t, audio[:, :3], text, frame_pos=torch.arange(3))
        b = model.clip(x, ref, t, audio[:, :3], text, frame_pos=torch.arange(3) + 4000)
        c = model.clip(x, ref, t, audio[:, :3], text, frame_pos=torch.tensor([0, 2, 4]))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a, c, atol=1e-4)


def test_per_frame_timesteps():
    model, ref, text, audio, g = _setup()
    x = torch.randn(2, 16, 3, H, W, generator=g)
    ref2, text2 = ref.expand(2, -1, -1, -1, -1), text.expand(2, -1, -1)
    with torch.no_grad():
        scalar = model.clip(x, ref2, torch.tensor([300.0, 300.0]), None, text2)
        per_frame = model.clip(x, ref2, torch.full((2, 3), 300.0), None, text2)
        mixed = model.clip(x, ref2, torch.tensor([[300.0, 300.0, 900.0]] * 2), None, text2)
    torch.testing.assert_close(scalar, per_frame)
    assert not torch.allclose(scalar[:, :, 2], mixed[:, :, 2], atol=1e-4)


def test_cache_text_as_embeddings_or_kv():
    """A cache may hold the prompt's embeddings (projected at every forward, as training does) or their
    cross-attention K/V computed once (inference): the same streaming outputs either way."""
    model, ref, text, audio, g = _setup()
    sch = WindowSchedule([1000, 500], block_frames=2)
    window = torch.randn(1, 16, 4, H, W, generator=g)
    t = torch.tensor([[700.0] * 2 + [1000.0] * 2])
    outs = []
    for prompt in (text, model.text_kv(text)):
        smp = StreamingSampler(model, sch, cache_cfg(), ref, text)
        smp.cache.text = prompt
        prefill_anchor(model, smp.cache, smp.ref)
        write_temporal(model, smp.cache, sch, smp.ref, 0, window[:, :, :2], None, smp.noise)
        with torch.no_grad():
            outs.append(model.window(window, ref, t, audio[:, 3:7], smp.cache))
    torch.testing.assert_close(outs[0], outs[1])


def test_audio_is_injected_per_frame():
    """With frames isolated by the mask, changing frame 1's audio changes only frame 1's output."""
    model, ref, text, audio, g = _setup()
    x = torch.randn(1, 16, 3, H, W, generator=g)
    t = torch.full((1, 3), 500.0)
    mask = frame_mask([1, 1, 1], [[0], [1], [2]], model.tokens_per_frame(H, W))
    a2 = audio[:, :3].clone()
    a2[:, 1] += 1.0
    with torch.no_grad():
        base = model.clip(x, ref, t, audio[:, :3], text, mask=mask)
        moved = model.clip(x, ref, t, a2, text, mask=mask)
    diff = (base - moved).abs().amax(dim=(0, 1, 3, 4))
    assert diff[1] > 1e-3 and diff[0] == 0 and diff[2] == 0
    assert model.cfg.audio_block_ids == [1, 2]
    assert len(model.audio_cond_projs) == 2


def test_real_config_audio_layers():
    from avatarforcing.model import PRESETS
    cfg = PRESETS["wan2.1-1.3b"]
    assert cfg.audio_block_ids == list(range(2, 16)) and cfg.head_dim == 128


def test_block_causal_mask_hides_the_future():
    model, ref, text, audio, g = _setup()
    x = torch.randn(1, 16, 5, H, W, generator=g)
    t = torch.full((1, 5), 400.0)
    groups, allowed = block_causal_groups(5, 2)
    assert groups == [1, 2, 2] and allowed == [[0], [0, 1], [0, 1, 2]]
    mask = frame_mask(groups, allowed, model.tokens_per_frame(H, W))
    x2 = x.clone()
    x2[:, :, 3:] += 1.0
    with torch.no_grad():
        a = model.clip(x, ref, t, audio[:, :5], text, mask=mask)
        b = model.clip(x2, ref, t, audio[:, :5], text, mask=mask)
    torch.testing.assert_close(a[:, :, :3], b[:, :, :3])
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])


def test_gradient_checkpointing_same_gradients():
    model, ref, text, audio, g = _setup()
    x = torch.randn(1, 16, 2, H, W, generator=g)
    t = torch.full((1, 2), 400.0)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.cfg.gradient_checkpointing = ckpt
        model.clip(x, ref, t, audio[:, :2], text).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    model.cfg.gradient_checkpointing = False
    torch.testing.assert_close(grads[0], grads[1])


def test_tokens_per_frame_from_resolution():
    model, *_ = _setup()
    assert model.tokens_per_frame(60, 104) == 1560       # 480x832 video
    assert model.tokens_per_frame(64, 64) == 1024
    x = torch.randn(1, 16, 1, 6, 10)
    with torch.no_grad():
        assert model.clip(x, x, torch.zeros(1, 1), None, torch.zeros(1, 4, model.cfg.text_dim)).shape == (1, 16, 1, 6, 10)


def test_kv_tail_keeps_budget():
    k = [torch.arange(6.0).view(1, 6, 1, 1)]
    kv = KV(k, k, 3).tail(2, 2)
    assert kv.frames == 2 and kv.k[0].flatten().tolist() == [2, 3, 4, 5]

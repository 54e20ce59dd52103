"""Several streams on one model: stacked batched forwards give each stream what it gets alone."""
import threading

import numpy as np
import pytest
import torch

from avatarforcing.multistream import StreamBatcher, layout_key
from avatarforcing.sampler import StreamingSampler
from avatarforcing.schedule import WindowSchedule
from avatarforcing.stream_state import NoiseSource
from helpers import cache_cfg, random_tiny_model

H = W = 4


def _stream(model, seed: int, blocks: int, cfg=None, started: threading.Event | None = None):
    """Emitted latents of one stream with its own reference, prompt, audio and noise."""
    g = torch.Generator().manual_seed(100 + seed)
    ref = torch.randn(1, 16, 1, H, W, generator=g)
    text = torch.randn(1, 8, model.cfg.text_dim, generator=g)
    audio = torch.randn(1, 1 + 2 * blocks, model.cfg.audio_dim, generator=g)
    sch = WindowSchedule([1000, 700, 300], block_frames=2)
    smp = StreamingSampler(model, sch, cfg or cache_cfg(temporal_frames=2), ref, text,
                           audio=lambda a, b: audio[:, a:b], noise=NoiseSource(seed), num_blocks=blocks)
    out = []
    with torch.no_grad():
        for i, (_, x0) in enumerate(smp):
            out.append(x0)
            if started is not None and i == 1:
                started.set()
    return torch.cat(out, 2)


def _concurrent(batcher, jobs):
    """Run ``jobs`` [(seed, blocks, start_after_event)] on threads through the batcher; the jobs that start at
    once join the batcher before any of them runs, so their first forwards meet."""
    results, errors = {}, []
    events = {seed: threading.Event() for seed, _, _ in jobs}
    batcher.join(sum(after is None for _, _, after in jobs))

    def run(seed, blocks, after):
        try:
            if after is not None:
                events[after].wait(timeout=60)
                batcher.join()
            try:
                results[seed] = _stream(batcher.proxy(), seed, blocks, started=events[seed])
            finally:
                batcher.leave()
        except BaseException as exc:    # noqa: BLE001 (reported below)
            errors.append(exc)
            events[seed].set()
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    return results


def _solo_and_batched(model, jobs):
    """Each job's stream alone, then all of them at once through one batcher -> (solo, batched, stats)."""
    solo = {seed: _stream(model, seed, blocks) for seed, blocks, _ in jobs}
    batcher = StreamBatcher(model, max_wait_s=5.0)   # wait for every participant: deterministic batches
    try:
        got = _concurrent(batcher, jobs)
    finally:
        batcher.close()
    return solo, got, batcher.stats


def test_streams_at_different_positions_batch_and_match_solo_runs():
    """Three streams with different inputs, lengths and start times (so at different absolute positions when
    they share a forward) each equal their solo run; forwards were actually shared."""
    model = random_tiny_model(3)
    jobs = [(0, 9, None), (1, 7, 0), (2, 5, 1)]      # stream 1 starts once stream 0 emitted 2 blocks, etc.
    solo, got, stats = _solo_and_batched(model, jobs)
    for seed, _, _ in jobs:
        assert got[seed].shape == solo[seed].shape
        torch.testing.assert_close(got[seed], solo[seed], atol=2e-5, rtol=1e-4)
    assert stats["max_batch"] >= 2, stats
    assert stats["forwards"] < stats["calls"]


def test_bf16_streams_batch_and_match_solo_runs():
    """The dtype users run on a GPU: batched bf16 streams equal their solo bf16 runs up to bf16 rounding."""
    model = random_tiny_model(3).to(torch.bfloat16)
    jobs = [(0, 6, None), (1, 5, None)]
    solo, got, stats = _solo_and_batched(model, jobs)
    for seed, _, _ in jobs:
        err = ((got[seed].float() - solo[seed].float()).norm() / solo[seed].float().norm()).item()
        print(f"bf16 batched vs solo, stream {seed}: relative error {err:.2e}")
        assert err < 0.02, (seed, err)
    assert stats["max_batch"] >= 2


def test_layout_key_separates_what_cannot_stack():
    """Warm-up (narrower window, shorter context) and steady state have different keys; the same layout at
    different absolute positions has the same key."""
    model = random_tiny_model(0)
    sch = WindowSchedule([1000, 700, 300], block_frames=2)
    g = torch.Generator().manual_seed(0)
    ref, text = torch.randn(1, 16, 1, H, W, generator=g), torch.randn(1, 8, model.cfg.text_dim, generator=g)
    keys = []
    for start in (0, 40):
        smp = StreamingSampler(model, sch, cache_cfg(temporal_frames=2), ref, text)
        with torch.no_grad():
            for _ in range(start + 4):
                smp.step()
            x = torch.randn(1, 16, 6, H, W)
            keys.append(layout_key(model.window_call(x, ref, torch.full((1, 6), 500.0), None, smp.cache)))
    fresh = StreamingSampler(model, sch, cache_cfg(temporal_frames=2), ref, text)
    warm = layout_key(model.window_call(torch.randn(1, 16, 2, H, W), ref, torch.full((1, 2), 1000.0), None,
                                        fresh.cache))
    assert keys[0] == keys[1] and warm != keys[0]


def test_a_failing_forward_reaches_its_stream_and_the_batcher_goes_on():
    model = random_tiny_model(0)
    batcher = StreamBatcher(model, max_wait_s=0.0)
    try:
        with batcher.stream() as proxy:
            smp = StreamingSampler(model, WindowSchedule([1000, 500], block_frames=2), cache_cfg(),
                                   torch.randn(1, 16, 1, H, W), torch.randn(1, 8, model.cfg.text_dim))
            bad = model.window_call(torch.randn(1, 16, 2, H, W), torch.randn(1, 16, 1, H, W),
                                    torch.full((1, 2), 500.0), torch.randn(1, 2, 7), smp.cache)  # audio_dim 7
            with pytest.raises(RuntimeError):
                batcher.submit(bad)
            out = _stream(proxy, 5, 3)
        torch.testing.assert_close(out, _stream(model, 5, 3), atol=1e-6, rtol=0)
    finally:
        batcher.close()


def test_pipeline_sessions_share_the_model(repo_root):
    """Two pipeline streams (demo model, VAE decode and audio per stream) on threads through one batcher
    give the frames each gives alone."""
    from avatarforcing.config import load_config
    from avatarforcing.pipeline import AvatarPipeline
    pipe = AvatarPipeline.from_config(load_config(repo_root / "configs/demo.yaml"))
    image, wav = repo_root / "assets/example.png", repo_root / "assets/example.wav"

    def frames(p, seed):
        return np.concatenate(list(p.stream(image, wav, seed=seed, num_blocks=4)), axis=1)
    solo = {seed: frames(pipe, seed) for seed in (0, 1)}
    batcher = StreamBatcher(pipe.model, max_wait_s=5.0)
    got, errors = {}, []

    def run(seed):
        try:
            got[seed] = frames(pipe.replace(model=batcher.proxy()), seed)
        except BaseException as exc:    # noqa: BLE001
            errors.append(exc)
        finally:
            batcher.leave()
    batcher.join(2)                     # both sessions count before either starts
    threads = [threading.Thread(target=run, args=(s,)) for s in (0, 1)]
    [th.start() for th in threads]
    [th.join(timeout=120) for th in threads]
    batcher.close()
    assert not errors, errors
    for seed in (0, 1):
        assert np.abs(got[seed].astype(int) - solo[seed].astype(int)).max() <= 1
    assert batcher.stats["max_batch"] == 2

"""The audio feed of a stream (avatarforcing.audio.AudioFeed): offline features for files and waveforms,
re-encoded look-ahead windows for live sources, flat memory, no reads past what a window needs."""
import queue

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avatarforcing.stream_state import CacheConfig
from avatarforcing.audio import (AudioFeed, BatchAudio, LookaheadRows, MelFeatures, OfflineRows, Wav2Vec2Features,
                                 latent_audio)
from avatarforcing.media import load_audio, write_wav
from avatarforcing.pipeline import AvatarPipeline
from avatarforcing.schedule import WindowSchedule
from avatarforcing.text import TextEncoder
from helpers import random_tiny_model, schedule_cfg

SR = 16000
L, B = 4, 4


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Syllable-rate bursts of a gliding harmonic voice + a little noise (float32, 16 kHz)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    phase = 2 * np.pi * np.cumsum(140 + 40 * np.sin(2 * np.pi * 0.7 * t)) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = np.clip(np.sin(2 * np.pi * 3.3 * t + seed), 0, None)
    return (0.2 * voice * env + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def chunked(wav, sizes):
    """Irregular live chunks."""
    i, k = 0, 0
    while i < len(wav):
        yield wav[i:i + sizes[k % len(sizes)]]
        i, k = i + sizes[k % len(sizes)], k + 1


def windows(num_blocks=None):
    """(step, first, stop) of the sampler's windows (latent frames, the reference excluded)."""
    sched = WindowSchedule([1000.0, 900.0, 800.0, 700.0], block_frames=B, window_blocks=L)
    for step in sched.plan(num_blocks):
        yield step, 1 + step.blocks[0] * B, 1 + (step.blocks[-1] + 1) * B


def run_feed(feed, num_blocks):
    """Every window's features, in the sampler's order -> list of [F, 4D]."""
    return [feed.latent(first, stop) for _, first, stop in windows(num_blocks)]


@pytest.fixture(scope="module")
def w2v():
    torch.manual_seed(0)
    return Wav2Vec2Features.from_config()


# ------------------------------------------------------------------ files and waveforms: offline

class StubVAE:
    z_dim = 16

    def encode_image(self, img):                              # [B, 3, H, W] -> [B, 16, 1, H/8, W/8]
        return F.avg_pool2d(img.float(), 8).repeat(1, 6, 1, 1)[:, :16, None]


def test_pipeline_uses_offline_features_for_files_and_waveforms(w2v, tmp_path, monkeypatch):
    """What the sampler gets for a waveform or a file is exactly latent_audio(encoder.encode(wav))."""
    model = random_tiny_model(0, audio_dim=4 * w2v.feature_dim)
    pipe = AvatarPipeline(model, StubVAE(), w2v, TextEncoder.none(model.cfg.text_dim, model.cfg.text_len),
                          WindowSchedule.from_config(schedule_cfg()), CacheConfig(), 16, 16)
    assert w2v.file_features == "offline"
    seen = []                                                     # (start, stop, features) per sampler call
    call = BatchAudio.__call__

    def spy(self, start, stop):
        out = call(self, start, stop)
        seen.append((start, stop, out))
        return out

    monkeypatch.setattr(BatchAudio, "__call__", spy)
    wav = speechlike(1.9)                                         # 48 audio frames: 1 + 48 rows -> 3 blocks
    write_wav(tmp_path / "a.wav", wav, SR)
    image = np.zeros((16, 16, 3), np.uint8)
    for source, samples in ((wav, wav), (tmp_path / "a.wav", load_audio(tmp_path / "a.wav"))):
        seen.clear()
        assert [b for b, _ in pipe.stream_latents(image, source)] == [-1, 0, 1, 2]
        offline = latent_audio(w2v.encode(samples), 1 + 3 * B)   # [13, 4D]
        assert len(seen) == 3 + L - 1                             # one call per streaming step
        for start, stop, got in seen:
            assert torch.equal(got[0], offline[start:stop])


def test_file_features_streaming_streams_files(w2v):
    wav = speechlike(3.0)
    offline = AudioFeed(w2v, wav, 640)
    assert isinstance(offline.source, OfflineRows) and offline.ended
    w2v.file_features = "streaming"
    try:
        streamed = AudioFeed(w2v, wav, 1000)
    finally:
        w2v.file_features = "offline"
    assert isinstance(streamed.source, LookaheadRows)
    live = AudioFeed(w2v, chunked(wav, [333, 4000]), 0)
    for a, b in zip(run_feed(streamed, 4), run_feed(live, 4)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ live: look-ahead windows

@pytest.mark.parametrize("lookahead", [0.0, 0.36])
def test_streaming_independent_of_chunking(w2v, lookahead):
    wav = speechlike(4.0, seed=1)
    w2v.lookahead_seconds = lookahead
    try:
        q: queue.Queue = queue.Queue()
        for c in chunked(wav, [5000, 17]):
            q.put(c)
        q.put(None)
        runs = [run_feed(AudioFeed(w2v, src, 0), 6) for src in
                (chunked(wav, [640]), chunked(wav, [1234, 1, 7000, 320]), q, [wav])]
    finally:
        w2v.lookahead_seconds = 0.0
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def _cosines_by_age(enc, wav, num_steps):
    """Mean cosine (streaming vs offline) per window position: age 0 = newest .. L-1 = oldest (emitted)."""
    offline = latent_audio(enc.encode(wav), 1 + (num_steps + 1) * B)
    feed = AudioFeed(enc, chunked(wav, [320]), 0)
    by_age = [[] for _ in range(L)]
    for (step, first, stop), _ in zip(windows(), range(num_steps)):
        got = feed.latent(first, stop).view(stop - first, 4, -1)
        want = offline[first:stop].view(stop - first, 4, -1)
        cos = F.cosine_similarity(got, want, dim=-1)                  # [F, 4]
        for i, age in enumerate(step.ages):
            by_age[age].append(cos[i * B:(i + 1) * B].mean())
    return [torch.stack(c).mean().item() for c in by_age]


def test_oldest_window_position_is_closest_to_offline(w2v):
    wav = speechlike(6.0, seed=2)                                     # 9 steps, windows well inside the clip
    cos = _cosines_by_age(w2v, wav, 9)
    assert cos[L - 1] > cos[0] + 0.003 and cos[L - 1] > 0.98
    # MelFeatures is causal: every position equals offline bit for bit, right context or not
    mel = MelFeatures()
    offline = latent_audio(mel.encode(wav), 1 + 10 * B)
    feed = AudioFeed(mel, chunked(wav, [320]), 0)
    for (_, first, stop), _ in zip(windows(), range(9)):
        assert torch.equal(feed.latent(first, stop), offline[first:stop])


def test_block_features_are_revised_until_emitted(w2v):
    """A block's features change while it moves through the window; they are final when it is emitted."""
    wav = speechlike(4.0, seed=3)
    feed = AudioFeed(w2v, chunked(wav, [640]), 0)
    history = {}                                                      # block -> its features per age
    for step, first, stop in windows():
        if step.index == L:
            break
        x = feed.latent(first, stop)
        for i, blk in enumerate(step.blocks):
            history.setdefault(blk, []).append(x[i * B:(i + 1) * B])
    first_block = history[0]
    assert len(first_block) == L
    assert all(not torch.equal(a, b) for a, b in zip(first_block, first_block[1:]))


def test_reads_only_what_the_window_needs(w2v):
    """The feed pulls audio up to the window end + look-ahead and no further (a live source would block)."""
    wav = speechlike(4.0)
    for lookahead in (0.0, 0.2):
        w2v.lookahead_seconds = lookahead
        try:
            read = [0]

            def source():
                for i in range(0, len(wav), 320):
                    read[0] = i + 320
                    yield wav[i:i + 320]
            feed = AudioFeed(w2v, source(), 0)
            for step, first, stop in windows():
                if step.index == 5:
                    break
                feed.latent(first, stop)
                need = (4 * (stop - 1) + round(lookahead * 25)) * 640    # samples up to the right edge
                assert need <= read[0] < need + 320
        finally:
            w2v.lookahead_seconds = 0.0


def test_feed_memory_is_bounded_on_a_long_stream():
    mel = MelFeatures()
    clip = speechlike(4.0, seed=4)

    def endless():
        while True:
            yield from chunked(clip, [700, 3000, 1])

    feed = AudioFeed(mel, endless(), 0)
    ctx, window = round(mel.left_context_seconds * 25), L * B * 4
    for step, first, stop in windows():
        feed.latent(first, stop)
        src = feed.source
        held = len(src.buf) + sum(len(c) for c in src.pending)     # samples kept: left context + window + 1 chunk
        assert held <= (ctx + window) * 640 + 3000
        if step.index == 300:
            break
    # offline rows are dropped as the windows pass too (amortised: at most twice what is still ahead)
    feed = AudioFeed(mel, speechlike(30.0), 0)                        # 751 rows
    run_feed(feed, 40)                                                # the last window starts at row 625
    assert len(feed.source._rows) <= 2 * (751 - 625)

"""AvatarPipeline: audio feeding, stream length, live vs offline audio, batching, flat memory.

A stub VAE (pooling / nearest upsampling) keeps these fast; the real VAE runs in test_inference.py."""
import gc
import logging
import math
import queue
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from avatarforcing import AvatarForcingError
from avatarforcing.stream_state import CacheConfig
from avatarforcing.audio import MelFeatures, latent_audio
from avatarforcing.audio import AudioFeed
from avatarforcing.pipeline import AvatarPipeline
from inference import blocks_for_latent_frames
from avatarforcing.schedule import WindowSchedule
from avatarforcing.text import TextEncoder
from helpers import random_tiny_model, schedule_cfg

SR = 16000


class StubDecoder:
    def __init__(self):
        self.first = True

    def push(self, z):                                        # [B, 16, f, h, w] -> [B, 3, n, 8h, 8w]
        x = torch.tanh(z[:, :3].float()).repeat_interleave(4, dim=2)
        if self.first:
            x, self.first = x[:, :, 3:], False
        return F.interpolate(x, scale_factor=(1, 8, 8), mode="nearest")


class StubVAE:
    z_dim = 16

    def encode_image(self, img):                              # [B, 3, H, W] -> [B, 16, 1, H/8, W/8]
        return F.avg_pool2d(img.float(), 8).repeat(1, 6, 1, 1)[:, :16, None]

    def stream_decoder(self):
        return StubDecoder()


def make_pipe(size=16, **sched) -> AvatarPipeline:
    audio = MelFeatures()
    model = random_tiny_model(0, audio_dim=4 * audio.feature_dim)
    return AvatarPipeline(model, StubVAE(), audio, TextEncoder.none(model.cfg.text_dim, model.cfg.text_len),
                          WindowSchedule.from_config(schedule_cfg(**sched)), CacheConfig(), size, size)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    env = np.clip(np.sin(2 * np.pi * 3 * t + seed), 0, None)
    return (0.3 * env * np.sin(2 * np.pi * (150 + 40 * seed) * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def image(seed: int = 0, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def chunked(wav, sizes):
    """Irregular live chunks."""
    i, k = 0, 0
    while i < len(wav):
        n = sizes[k % len(sizes)]
        yield wav[i:i + n]
        i, k = i + n, k + 1


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def test_audio_feed_matches_offline_grouping():
    """Window after window, the feed serves exactly latent_audio(encode(wav)) (zeros past the end)."""
    enc = MelFeatures()
    wav = speech(1.3)
    offline = latent_audio(enc.encode(wav), 40)                       # [40, 4D], zero-padded
    feed = AudioFeed(enc, chunked(wav, [700, 3000, 1]), chunk_samples=0)
    for start in range(0, 30, 4):                                     # windows move forward like the sampler's
        stop = start + 9
        torch.testing.assert_close(feed.latent(start, stop), offline[start:stop], rtol=0, atol=1e-6)
    assert feed.ended and feed.received == 1 + math.ceil(len(wav) / 640)
    with pytest.raises(RuntimeError):
        feed.latent(0, 2)                                             # already dropped


def test_stream_length_frames_and_reference(pipe):
    wav = speech(0.9)                                                 # 1 + 23 rows -> 2 blocks of 16 frames
    blocks = list(pipe.stream(image(), wav, seed=1))
    assert [b.shape for b in blocks] == [(1, 1, 16, 16, 3)] + [(1, 16, 16, 16, 3)] * 2
    assert all(b.dtype == np.uint8 for b in blocks)
    assert pipe.blocks_for_frames(pipe.audio_video_frames(len(wav))) == 2
    assert len(list(pipe.stream(image(), wav, num_blocks=3))) == 4   # explicit length: audio zero-padded


def test_short_or_empty_audio_gives_one_block(pipe, caplog):
    with caplog.at_level(logging.INFO, logger="avatarforcing"):
        out = list(pipe.stream_latents(image(), np.zeros(0, np.float32)))
    assert [b for b, _ in out] == [-1, 0]
    assert any("less than one block" in r.getMessage() for r in caplog.records)
    assert [b for b, _ in pipe.stream_latents(image(), speech(0.1))] == [-1, 0]


def test_live_audio_equals_full_waveform(pipe):
    """Irregular chunks from an iterable, and a queue fed by a thread, give the offline waveform's latents."""
    wav = speech(2.1, seed=2)
    want = list(pipe.stream_latents(image(1), wav, seed=5))
    got_iter = list(pipe.stream_latents(image(1), chunked(wav, [1234, 99, 5000, 640]), seed=5))

    q: queue.Queue = queue.Queue()

    def feed():
        for c in chunked(wav, [2000, 300]):
            q.put(c)
        q.put(None)

    threading.Thread(target=feed, daemon=True).start()
    got_queue = list(pipe.stream_latents(image(1), q, seed=5))
    assert [b for b, _ in want] == list(range(-1, 4))                 # 1 + 53 rows -> 4 blocks
    for got in (got_iter, got_queue):
        assert [b for b, _ in got] == [b for b, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert torch.equal(a, b)                                  # MelFeatures streams exactly


def test_batch_equals_single_runs(pipe):
    wavs = [speech(1.0, seed=0), speech(1.0, seed=1)]
    imgs = [image(0), image(1)]
    batch = list(pipe.stream_latents(imgs, wavs, prompt=["a", "b"], seed=[3, 4]))
    singles = [list(pipe.stream_latents(imgs[i], wavs[i], seed=3 + i)) for i in range(2)]
    assert [b for b, _ in batch] == [b for b, _ in singles[0]] == [b for b, _ in singles[1]]
    for k, (_, x) in enumerate(batch):
        for i in range(2):
            torch.testing.assert_close(x[i:i + 1], singles[i][k][1], atol=2e-5, rtol=1e-4)
    frames = list(pipe.stream(imgs, wavs, seed=[3, 4]))
    assert frames[1].shape == (2, 16, 16, 16, 3)
    with pytest.raises(AvatarForcingError):
        next(pipe.stream(imgs, wavs[0]))


def _live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
            if isinstance(obj, FakeTensor) or obj.device.type == "meta":   # left by torch.compile tests
                continue
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def test_long_stream_has_flat_memory(pipe):
    """1600 latent frames (400 blocks, past the 1024-frame RoPE table of other codebases) from an endless live
    source, DiT only: nothing grows."""
    chunk = 640 * 16

    def endless():
        wav = speech(4.0, seed=3)
        while True:
            for i in range(0, len(wav), chunk):
                yield wav[i:i + chunk]

    marks = {}
    stream = pipe.stream_latents(image(2), endless(), seed=0)
    for block, x0 in stream:
        if block in (100, 399):
            del x0
            gc.collect()
            marks[block] = (_live_tensor_bytes(), len(gc.get_objects()))
        if block == 399:
            break
    stream.close()
    (bytes_early, objs_early), (bytes_late, objs_late) = marks[100], marks[399]
    assert bytes_late == bytes_early
    assert abs(objs_late - objs_early) < 50


def test_generate_leaves_nothing_on_failure(pipe, tmp_path, monkeypatch):
    from avatarforcing.media import write_wav
    write_wav(tmp_path / "a.wav", speech(0.5), SR)
    out = tmp_path / "out.mp4"

    def broken(*args, **kwargs):
        yield np.zeros((1, 1, 16, 16, 3), np.uint8)
        raise RuntimeError("boom")

    monkeypatch.setattr(pipe, "stream", broken)
    with pytest.raises(RuntimeError):
        pipe.generate(image(), tmp_path / "a.wav", out, progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "a.wav"]


def test_model_without_reference_channels_streams():
    """in_dim 16 (identity through the anchor only) runs through the pipeline, with and without the style anchor
    (then the reference starts the temporal cache); a VAE whose channels fit neither layout is refused."""
    audio = MelFeatures()
    model = random_tiny_model(0, audio_dim=4 * audio.feature_dim, in_dim=16)
    text = TextEncoder.none(model.cfg.text_dim, model.cfg.text_len)
    sch = WindowSchedule.from_config(schedule_cfg())
    outs = []
    for cache in (CacheConfig(), CacheConfig(style_anchor=False, reference_in_temporal=True)):
        pipe = AvatarPipeline(model, StubVAE(), audio, text, sch, cache, 16, 16)
        outs.append(np.concatenate([b[0] for b in pipe.stream(image(), speech(0.9), seed=1)]))
        assert outs[-1].shape == (33, 16, 16, 3)
    assert np.abs(outs[0].astype(int) - outs[1]).mean() > 0.05        # the anchor reaches this model

    class EightChannels(StubVAE):
        z_dim = 8
    with pytest.raises(AvatarForcingError, match=r"model.in_dim is 16 but the VAE has 8 latent channels .* 17, or 8"):
        AvatarPipeline(model, EightChannels(), audio, text, sch, CacheConfig(), 16, 16)


def test_checks_and_rounding(caplog):
    with pytest.raises(AvatarForcingError, match="multiple of 16"):
        make_pipe(size=24)
    audio = MelFeatures()
    wide = random_tiny_model(0, audio_dim=4 * audio.feature_dim, patch_size=(1, 4, 4))   # 8x VAE x 4x4 patches
    text = TextEncoder.none(wide.cfg.text_dim, wide.cfg.text_len)
    with pytest.raises(AvatarForcingError, match=r"not a multiple of 32x32 .*inference.height=32"):
        AvatarPipeline(wide, StubVAE(), audio, text, WindowSchedule.from_config(schedule_cfg()), CacheConfig(), 16, 16)
    AvatarPipeline(wide, StubVAE(), audio, text, WindowSchedule.from_config(schedule_cfg()), CacheConfig(), 32, 32)
    audio = MelFeatures()
    model = random_tiny_model(0)                                      # audio_dim 64 != 4 x 64
    with pytest.raises(AvatarForcingError, match="audio_dim"):
        AvatarPipeline(model, StubVAE(), audio, TextEncoder.none(32, 8),
                       WindowSchedule.from_config(schedule_cfg()), CacheConfig(), 16, 16)
    with caplog.at_level(logging.INFO, logger="avatarforcing"):
        assert blocks_for_latent_frames(225, 4) == 56
        assert not caplog.records
        assert blocks_for_latent_frames(10, 4) == 3
        assert "note:" in caplog.records[-1].getMessage()


def test_generate_batch_gives_each_video_its_length(pipe, tmp_path):
    from avatarforcing.media import probe_video, write_wav
    write_wav(tmp_path / "short.wav", speech(0.5), SR)                # 1 block
    write_wav(tmp_path / "long.wav", speech(0.9, seed=1), SR)         # 2 blocks
    outs = pipe.generate([image(0), image(1)], [tmp_path / "short.wav", tmp_path / "long.wav"],
                         [tmp_path / "a.mp4", tmp_path / "b.mp4"], progress=False)
    assert [probe_video(p)["frames"] for p in outs] == [17, 33]
    assert all(probe_video(p)["has_audio"] for p in outs)

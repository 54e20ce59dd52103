import math

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from avatarforcing import AvatarForcingError
from avatarforcing.audio import (AudioFeatureExtractor, MelFeatures, Wav2Vec2Features, build_audio_encoder,
                                 latent_audio, tiny_wav2vec2_config)
from avatarforcing.units import video_frames_of_latent as video_frames_for_latent
from avatarforcing.media import load_audio


def speechlike(num_samples, sr=16000, seed=0):
    """Deterministic 'speech': a gliding harmonic tone with syllable-rate amplitude modulation + noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sr
    f0 = 150 + 50 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t)
    return (0.2 * voice * env + 0.02 * rng.standard_normal(num_samples)).astype(np.float32)


@pytest.fixture(scope="module")
def w2v():
    torch.manual_seed(0)
    return Wav2Vec2Features.from_config()


def run_stream(ext, wav, step=1000, **kw):
    s = ext.stream(**kw)
    rows = [s.push(wav[i:i + step]) for i in range(0, len(wav), step)]
    return torch.cat(rows + [s.flush()])


# ------------------------------------------------------------------ latent grouping

def test_latent_audio_alignment():
    t, d = 14, 3
    feats = torch.arange(t).float()[:, None].repeat(1, d)  # row j holds j
    lat = latent_audio(feats, 5)  # needs 1 + 4*4 = 17 rows: rows 14..16 are zero-padded
    assert lat.shape == (5, 4 * d)
    assert (lat[0] == 0).all()
    for k in range(1, 5):
        got = lat[k].view(4, d)[:, 0]
        want = torch.tensor([j if j < t else 0 for j in video_frames_for_latent(k)]).float()
        assert torch.equal(got, want), k
    assert list(video_frames_for_latent(0)) == [0] and list(video_frames_for_latent(2)) == [5, 6, 7, 8]
    batched = latent_audio(torch.stack([feats, feats + 100]), 3)  # [B, T, D], truncated to 9 rows
    assert batched.shape == (2, 3, 4 * d) and torch.equal(batched[0], latent_audio(feats, 3))
    assert batched[1, 2].view(4, d)[:, 0].tolist() == [105, 106, 107, 108]
    with pytest.raises(AvatarForcingError):
        latent_audio(feats, 0)


# ------------------------------------------------------------------ wav2vec2

def test_wav2vec2_feature_dim_and_rows(w2v):
    cfg = w2v.model.config
    assert w2v.feature_dim == (cfg.num_hidden_layers + 2) * cfg.hidden_size == 4 * 32
    # wav2vec2-base-960h: 12 layers x 768 -> last_hidden_state + 13 hidden states = 14 x 768
    assert (12 + 2) * 768 == 10752
    wav = speechlike(16000 + 100)  # 1.00625 s -> ceil(25.16) = 26 audio frames
    f = w2v.encode(wav)
    assert f.shape == (1 + 26, w2v.feature_dim)
    assert (f[0] == 0).all() and (f[1:].abs().sum(-1) > 0).all()
    assert torch.equal(w2v.encode(wav, num_frames=10), f[:10])
    padded = w2v.encode(wav, num_frames=40)
    assert torch.equal(padded[:27], f) and (padded[27:] == 0).all()
    # the features are the transformer outputs at 25 fps: [last | hidden_0 | hidden_1 | hidden_2]
    last, h_last = f[1:, :32], f[1:, -32:]
    assert torch.allclose(last, h_last)


def test_wav2vec2_stream_vs_offline(w2v):
    wav = speechlike(16000 * 5 + 123)
    off = w2v.encode(wav)
    st = run_stream(w2v, wav)
    assert st.shape == off.shape and (st[0] == 0).all()
    rel = (st - off)[1:].norm(dim=-1) / off[1:].norm(dim=-1)
    print(f"\nwav2vec2 (tiny, random) stream vs offline, per-frame relative L2 difference: "
          f"max {rel.max():.3f} mean {rel.mean():.3f}")
    # Offline, the clip's ceil(N/640) frames are spread over its CNN frames with align_corners, so frame i
    # samples CNN position i*(T50-1)/(n-1): it drifts by up to one CNN frame (20 ms) with the clip length;
    # stream windows are whole frames, where frame i is exactly CNN frame 2i. With random weights, features
    # decorrelate within one CNN frame, and two unrelated vectors of equal norm differ by ~sqrt(2). Require
    # clearly correlated features on average.
    assert torch.isfinite(rel).all() and rel.mean() < 1.0 and rel.max() < 2.0
    # Without the drift (clip of whole 25 fps frames) what is left is the window-level GroupNorm of the CNN
    # and the missing right context at chunk ends (measured ~0.2 mean).
    wav = wav[: 640 * 125]
    off, st = w2v.encode(wav), run_stream(w2v, wav)
    rel = (st - off)[1:].norm(dim=-1) / off[1:].norm(dim=-1)
    print(f"aligned clip: max {rel.max():.3f} mean {rel.mean():.3f}")
    assert rel.mean() < 0.4


def test_wav2vec2_stream_whole_clip_chunk_equals_offline(w2v):
    wav = speechlike(16000 * 2 + 77)
    st = run_stream(w2v, wav, chunk_seconds=100.0)  # one chunk = the clip, running stats = clip stats
    assert torch.allclose(st, w2v.encode(wav), atol=1e-5)


def test_stream_independent_of_push_sizes(w2v):
    wav = speechlike(16000 * 2)
    a = run_stream(w2v, wav, step=16000 * 2)
    b = run_stream(w2v, wav, step=333)
    assert torch.allclose(a, b, atol=1e-5)
    s = w2v.stream()
    first = s.push(wav[:100])  # nothing complete yet: just the zero row
    assert first.shape == (1, w2v.feature_dim) and (first == 0).all()
    chunk = s.push(wav[100:640 * 16])  # one full chunk (16 frames)
    assert chunk.shape == (16, w2v.feature_dim)
    s.flush()
    with pytest.raises(AvatarForcingError, match="flushed"):
        s.push(wav)


def test_wav2vec2_from_pretrained_folder(tmp_path, w2v):
    w2v.model.save_pretrained(tmp_path / "w2v")
    loaded = build_audio_encoder(OmegaConf.create({"encoder": "wav2vec2", "path": str(tmp_path / "w2v")}))
    wav = speechlike(8000)
    assert torch.allclose(loaded.encode(wav), w2v.encode(wav), atol=1e-6)


def test_resampled_stereo_input_same_frames(tmp_path, w2v):
    seconds = 1.3
    x = speechlike(int(seconds * 44100), sr=44100)
    sf.write(tmp_path / "s.wav", np.stack([x, 0.5 * x], 1), 44100)
    wav = load_audio(tmp_path / "s.wav")
    assert w2v.encode(wav).shape[0] == 1 + math.ceil(seconds * 25)
    assert MelFeatures().encode(wav).shape[0] == 1 + math.ceil(seconds * 25)


# ------------------------------------------------------------------ weight-free features

def test_mel_features_stream_equals_offline():
    mel = MelFeatures()
    assert isinstance(mel, AudioFeatureExtractor) and mel.feature_dim == 64
    wav = speechlike(16000 * 3 + 500)
    off = mel.encode(wav)
    assert off.shape == (1 + math.ceil(len(wav) / 640), 64)
    assert torch.equal(off, mel.encode(wav))  # deterministic
    assert off[1:].abs().max() < 10 and off[1:, :32].std() > 0.1  # fixed normalization keeps it O(1)
    # causal windows: with >= 2 frames of left context the stream equals offline everywhere, bit for bit
    # (computed in float64, a frame's result does not depend on how many frames share the window)
    assert torch.equal(run_stream(mel, wav), off)
    t = torch.from_numpy(wav)
    for a0, n in [(0, 1), (5, 1), (7, 3), (40, 16), (11, 64)]:
        window = t[max(0, a0 - 2) * 640:(a0 + n) * 640]                # two frames of left context
        rows = mel.window_features(window, mel.num_audio_frames(len(window)))[-n:]
        assert torch.equal(rows, off[1 + a0:1 + a0 + n]), (a0, n)
    # without left context only the chunk edges differ: the first frame's window reaches into the past,
    # and the second frame's delta uses the first frame
    st = run_stream(mel, wav, left_context_seconds=0.0)
    edges = {j + e for j in range(1, off.shape[0], mel.stream().chunk_frames) for e in (0, 1)} - {1, 2}
    inner = [j for j in range(off.shape[0]) if j not in edges]
    assert torch.allclose(st[inner], off[inner], atol=1e-4)
    assert not torch.allclose(st, off, atol=1e-4)


def test_mel_features_react_to_audio():
    mel = MelFeatures()
    wav = speechlike(16000)
    wav[8000:] = 0.0  # silence in the second half
    f = mel.encode(wav)
    energy = f[1:, 31]  # log energy (static part)
    assert energy[:10].mean() > energy[-10:].mean() + 1.0


# ------------------------------------------------------------------ config / errors

def test_build_audio_encoder_and_errors(tmp_path):
    cfg = OmegaConf.load("configs/default.yaml").audio
    world = build_audio_encoder(OmegaConf.merge(cfg, {"encoder": "world"}))
    assert isinstance(world, MelFeatures) and world.stream().chunk_frames == 16
    tiny = build_audio_encoder(OmegaConf.merge(cfg, {"tiny": True}))
    assert isinstance(tiny, Wav2Vec2Features) and tiny.feature_dim == 128
    assert cfg.file_features == tiny.file_features == "offline" and tiny.lookahead_seconds == 0.0
    streaming = build_audio_encoder(OmegaConf.merge(cfg, {"encoder": "world", "file_features": "streaming",
                                                          "lookahead_seconds": 0.32}))
    assert streaming.file_features == "streaming" and streaming.lookahead_seconds == 0.32
    with pytest.raises(AvatarForcingError, match="audio.path is not set"):
        build_audio_encoder(cfg)
    with pytest.raises(AvatarForcingError, match=str(tmp_path / "nope")):
        build_audio_encoder(OmegaConf.merge(cfg, {"path": str(tmp_path / "nope")}))
    with pytest.raises(AvatarForcingError, match="not known"):
        build_audio_encoder(OmegaConf.merge(cfg, {"encoder": "hubert"}))
    with pytest.raises(AvatarForcingError, match="mono"):
        world.encode(np.zeros((2, 100), np.float32))
    assert tiny_wav2vec2_config().hidden_size == 32


@pytest.mark.parametrize("key, value, match", [
    ("file_features", "whole", "audio.file_features is 'whole'; use offline .* or streaming"),
    ("lookahead_seconds", -0.5, "audio.lookahead_seconds is -0.5; it must be a number of seconds >= 0"),
    ("lookahead_seconds", "soon", "audio.lookahead_seconds is 'soon'; .* e.g. audio.lookahead_seconds=0.0"),
    ("left_context_seconds", -1, "audio.left_context_seconds is -1; it must be a number of seconds >= 0"),
    ("chunk_seconds", 0, "audio.chunk_seconds is 0; it must be a number of seconds > 0"),
])
def test_bad_stream_options_are_one_line_errors(key, value, match):
    cfg = OmegaConf.merge(OmegaConf.load("configs/default.yaml").audio, {"encoder": "world", key: value})
    with pytest.raises(AvatarForcingError, match=match) as err:
        build_audio_encoder(cfg)
    assert "\n" not in str(err.value)

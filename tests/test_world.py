"""The synthetic world: speech, renderer ground truth, determinism and the on-disk dataset."""
import csv
import json

import numpy as np
import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.world import (Identity, clip_seed, generate_clip, load_ground_truth, measure_mouth_open,
                                 render, sample_identity, sample_motion, sample_reference, speech_envelope,
                                 synth_speech, write_world)


@pytest.fixture(scope="module")
def clip():
    return generate_clip(seed=7, seconds=6.0, size=64)


def test_speech_shapes_range_and_determinism():
    a, b, c = synth_speech(3.0, seed=1), synth_speech(3.0, seed=1), synth_speech(3.0, seed=2)
    assert a.wav.dtype == np.float32 and a.wav.shape == (48000,) and np.abs(a.wav).max() <= 1.0
    assert a.envelope.shape == (75,) and a.envelope.min() >= 0 and a.envelope.max() <= 1
    assert np.array_equal(a.wav, b.wav) and not np.array_equal(a.wav, c.wav)
    # ground truth is the fixed envelope function of the wave: metrics recompute it from audio
    assert np.array_equal(a.envelope, speech_envelope(a.wav, 16000, 25, 75))


def test_speech_is_speech_like():
    s = synth_speech(12.0, seed=3)
    env = s.envelope
    assert (env < 0.05).mean() > 0.1, "pauses between phrases and a silent start"
    assert (env > 0.5).mean() > 0.2, "loud voiced syllables"
    assert env[0] == 0.0, "clips start silent (reference frame has a closed mouth)"
    loud = env > 0.3
    peaks = np.sum((env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:]) & loud[1:-1])
    rate = peaks / (loud.sum() / 25)                      # syllable peaks per second of speech
    assert 2.5 < rate < 8.0
    spec = np.abs(np.fft.rfft(s.wav[16000:32000]))       # harmonic voice: energy below 4 kHz
    freqs = np.fft.rfftfreq(16000, 1 / 16000)
    assert spec[freqs < 4000].sum() > 5 * spec[freqs > 5000].sum()


def test_envelope_follows_audio_delay_and_prefix():
    s = synth_speech(4.0, seed=4)
    delayed = np.concatenate([np.zeros(5 * 640, np.float32), s.wav])[:len(s.wav)]
    env_d = speech_envelope(delayed, 16000, 25, 100)
    np.testing.assert_allclose(env_d[6:-2], s.envelope[1:-7], atol=1e-4)   # exactly 5 frames later
    short = synth_speech(2.0, seed=4)
    assert np.array_equal(short.wav, s.wav[:32000])
    np.testing.assert_array_equal(short.envelope[:-2], s.envelope[:48])


def test_render_is_deterministic_antialiased_and_moves():
    ident = sample_identity(3)
    T = 3
    pose = np.zeros((T, 3), np.float32)
    pose[1, 0] = 0.2                                     # shift right by 0.2 * 32 = 6.4 px
    frames = render(ident, np.zeros(T), pose, np.zeros(T), size=64)
    assert frames.dtype == np.uint8 and frames.shape == (T, 64, 64, 3)
    assert np.array_equal(frames, render(ident, np.zeros(T), pose, np.zeros(T), size=64))
    assert np.array_equal(frames[0], frames[2])
    # anti-aliasing: the face edge has in-between values, not just the two flat colours
    row = frames[0, 32, :, 0].astype(int)
    assert len(np.unique(row)) > 6
    skin = np.abs(frames.astype(float) - 255 * np.array(ident.skin)).sum(-1) < 20
    xs = [np.nonzero(skin[i])[1].mean() for i in range(2)]
    assert 5.0 < xs[1] - xs[0] < 8.0
    blink = render(ident, [0.0], pose[:1], [1.0], size=64)[0]
    eye_row = int(round((ident.eye_y + 1) * 32))
    assert np.abs(blink[eye_row - 2:eye_row + 3].astype(int) - frames[0, eye_row - 2:eye_row + 3]).max() > 60


def test_mouth_ground_truth_matches_pixels(clip):
    measured = measure_mouth_open(clip.frames, clip.identity, clip.motion.head_pose)
    r = np.corrcoef(measured, clip.motion.mouth_open)[0, 1]
    assert r > 0.9, r
    np.testing.assert_array_equal(clip.motion.mouth_open, np.clip(clip.envelope, 0, 1))


def test_motion_is_smooth_and_blinks():
    m = sample_motion(500, seed=2, envelope=None)
    assert m.head_pose.shape == (500, 3) and np.abs(np.diff(m.head_pose, axis=0)).max() < 0.01
    assert np.abs(m.head_pose[:, :2]).max() < 0.12 and np.abs(m.head_pose[:, 2]).max() < 0.12
    assert m.blink[0] == 0 and 2 <= np.sum(np.diff((m.blink > 0.5).astype(int)) == 1) <= 10
    prefix = sample_motion(100, seed=2, envelope=None)
    assert np.array_equal(prefix.head_pose, m.head_pose[:100])


def test_identity_roundtrip_and_variety():
    idents = [sample_identity(s) for s in range(12)]
    assert len({(i.skin, i.hair, i.background) for i in idents}) == 12
    d = json.loads(json.dumps(idents[0].to_dict()))
    assert Identity.from_dict(d) == idents[0]
    assert "eyes" in idents[0].caption()
    with pytest.raises(AvatarForcingError, match="missing keys"):
        Identity.from_dict({"seed": 1})


def test_clip_determinism_and_reference(clip):
    again = generate_clip(seed=7, seconds=2.0, size=64)
    assert np.array_equal(again.frames, clip.frames[:50])
    assert np.array_equal(sample_reference(7, 64), clip.frames[0])
    assert clip.frames.shape == (150, 64, 64, 3) and clip.wav.shape == (96000,)


def test_user_errors():
    with pytest.raises(AvatarForcingError, match="seconds > 0"):
        synth_speech(0, seed=1)
    with pytest.raises(AvatarForcingError, match="same T"):
        render(sample_identity(0), np.zeros(4), np.zeros((3, 3)), np.zeros(4))
    with pytest.raises(AvatarForcingError, match="one value per frame"):
        sample_motion(10, 0, np.zeros(9))
    with pytest.raises(AvatarForcingError, match="even number"):
        write_world("/nonexistent", 1, 1.0, size=33)


def test_write_world_resumable(tmp_path):
    from avatarforcing.media import load_audio, read_video

    index = write_world(tmp_path, num_clips=2, seconds=1.0, size=32, seed=5)
    rows = list(csv.DictReader(open(index)))
    assert [r["video"] for r in rows] == ["clip_00000.mp4", "clip_00001.mp4"]
    assert rows[1]["audio"] == "clip_00001.wav" and "talking" in rows[1]["caption"]
    frames, fps = read_video(tmp_path / "clip_00001.mp4")
    expected = generate_clip(clip_seed(5, 1), 1.0, 32)
    assert fps == 25 and frames.shape == (25, 32, 32, 3)
    assert np.abs(frames.astype(float) - expected.frames).mean() < 6     # lossy H.264
    wav = load_audio(tmp_path / "clip_00001.wav")
    assert np.abs(wav - expected.wav).max() < 1e-3                       # 16-bit PCM
    ident, motion, env, meta = load_ground_truth(tmp_path / "clip_00001.json")
    assert ident == expected.identity and meta["num_frames"] == 25
    np.testing.assert_allclose(motion.mouth_open, expected.motion.mouth_open, atol=1e-5)
    np.testing.assert_allclose(env, expected.envelope, atol=1e-5)

    # resume: complete clips are kept, an incomplete one (no json) is rewritten
    mtime = (tmp_path / "clip_00000.mp4").stat().st_mtime_ns
    (tmp_path / "clip_00001.json").unlink()
    write_world(tmp_path, num_clips=2, seconds=1.0, size=32, seed=5)
    assert (tmp_path / "clip_00000.mp4").stat().st_mtime_ns == mtime
    assert (tmp_path / "clip_00001.json").is_file()
    with pytest.raises(AvatarForcingError, match="same settings"):
        write_world(tmp_path, num_clips=2, seconds=1.0, size=64, seed=5)

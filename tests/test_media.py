import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from avatarforcing import AvatarForcingError
from avatarforcing.media import VideoWriter, load_audio, load_image, probe_video, read_video, write_wav


def tone(seconds, sr, freq=220.0):
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# ------------------------------------------------------------------ audio

def test_wav_roundtrip(tmp_path):
    x = tone(0.5, 16000)
    write_wav(tmp_path / "a.wav", x)
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() < 1e-3


def test_stereo_44k_is_resampled_and_downmixed(tmp_path):
    x = tone(1.0, 44100)
    sf.write(tmp_path / "s.wav", np.stack([x, x], 1), 44100)
    y = load_audio(tmp_path / "s.wav", 16000)
    assert y.ndim == 1 and abs(len(y) - 16000) <= 1
    ref = tone(1.0, 16000)
    assert np.abs(y[200:-200] - ref[200:-200]).max() < 1e-2


def test_flac_and_mp3(tmp_path):
    x = tone(0.5, 16000)
    sf.write(tmp_path / "a.flac", x, 16000)
    assert np.abs(load_audio(tmp_path / "a.flac") - x).max() < 1e-3
    # mp3 made by the bundled ffmpeg (encoder delay changes the length slightly)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(tmp_path / "a.flac"),
                    str(tmp_path / "a.mp3")], check=True)
    y = load_audio(tmp_path / "a.mp3")
    assert abs(len(y) - len(x)) < 2000 and np.abs(y).max() > 0.3


def test_ffmpeg_fallback_for_m4a(tmp_path):
    sf.write(tmp_path / "a.wav", tone(0.5, 22050), 22050)
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(tmp_path / "a.wav"),
                    "-c:a", "aac", str(tmp_path / "a.m4a")], check=True)
    y = load_audio(tmp_path / "a.m4a")  # soundfile cannot read m4a
    assert abs(len(y) - 8000) < 2000 and np.abs(y).max() > 0.3


def test_audio_errors(tmp_path):
    with pytest.raises(AvatarForcingError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000garbage" * 10)
    with pytest.raises(AvatarForcingError, match="cannot decode"):
        load_audio(tmp_path / "bad.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AvatarForcingError, match="no samples"):
        load_audio(tmp_path / "empty.wav")


# ------------------------------------------------------------------ image

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_load_image_modes(tmp_path, mode):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).convert(mode)
    img.save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png", 32, 48)
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1


def test_load_image_cover_and_center_crop():
    # left half black, right half white, wide image cropped to a square: the split stays centered
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 30:] = 255
    x = load_image(arr, 32, 32)
    assert x.shape == (3, 32, 32)
    assert x[:, :, :14].max() < -0.9 and x[:, :, 18:].min() > 0.9


@pytest.mark.parametrize("image_hw,want_hw", [((1920, 1080), (832, 464)),   # 9:16 portrait: the whole height kept
                                               ((1080, 1920), (464, 832)),   # 16:9 landscape
                                               ((480, 832), (480, 832)),     # already the release size
                                               ((100, 100), (624, 624))])    # small square: upscaled into the area
def test_load_image_keep_aspect_is_the_release_rule(image_hw, want_hw):
    """Release rule: aspect ratio kept within an area of 480*832, both sides floored to multiples of 16."""
    h, w = image_hw
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 10] = 255                                   # a white band at the top survives (nothing cropped)
    x = load_image(arr, 480, 832, "keep_aspect")
    assert tuple(x.shape[1:]) == want_hw
    assert x.shape[1] * x.shape[2] <= 480 * 832 and x.shape[1] % 16 == 0 and x.shape[2] % 16 == 0
    assert abs(x.shape[1] / x.shape[2] - h / w) < 0.05 * h / w
    assert x[:, :2].min() > 0.9                            # the top rows are the white band
    cover = load_image(arr, 480, 832, "cover")
    assert tuple(cover.shape[1:]) == (480, 832)
    with pytest.raises(AvatarForcingError, match="inference.resize is 'fit'; use keep_aspect"):
        load_image(arr, 480, 832, "fit")


def test_load_image_transparent_is_white():
    arr = np.zeros((16, 16, 4), np.uint8)  # fully transparent black
    assert torch.allclose(load_image(arr, 16, 16), torch.ones(3, 16, 16))


def test_load_image_errors(tmp_path):
    with pytest.raises(AvatarForcingError, match="multiple of 16"):
        load_image(np.zeros((32, 32, 3), np.uint8), 30, 32)
    with pytest.raises(AvatarForcingError, match="not found"):
        load_image(tmp_path / "nope.png", 32, 32)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(AvatarForcingError, match="cannot read image"):
        load_image(tmp_path / "bad.png", 32, 32)


# ------------------------------------------------------------------ video

def frames(t, h=34, w=50, start=0):
    out = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        out[i] = (start + i) * 20 % 256
    return out


def test_video_writer_streams_and_muxes(tmp_path):
    write_wav(tmp_path / "a.wav", tone(3.0, 16000))  # longer than the video: cut to it
    out = tmp_path / "sub" / "v.mp4"  # parent folder is created
    with VideoWriter(out, fps=25, audio_path=tmp_path / "a.wav") as w:
        w.write(frames(5))
        w.write(torch.from_numpy(frames(4, start=5)))
        assert not out.exists()  # only published on close
    info = probe_video(out)
    assert info == dict(frames=9, fps=25.0, width=50, height=34, has_audio=True)
    video, fps = read_video(out)
    assert video.shape == (9, 34, 50, 3) and fps == 25.0
    assert np.abs(video.astype(int) - frames(9).astype(int)).mean() < 3
    # audio was cut to the video (-shortest); allow an aac frame of slack
    dur = float(subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)], capture_output=True,
                               text=True).stderr.split("Duration: ")[1].split(",")[0].split(":")[-1])
    assert dur < 0.5
    assert list(tmp_path.joinpath("sub").iterdir()) == [out]  # no temp files left


def test_video_writer_without_audio_and_short_audio(tmp_path):
    with VideoWriter(tmp_path / "n.mp4", fps=25) as w:
        w.write(frames(3))
    assert probe_video(tmp_path / "n.mp4")["has_audio"] is False
    write_wav(tmp_path / "s.wav", tone(0.04, 16000))  # shorter than the video: video keeps its length
    with VideoWriter(tmp_path / "s.mp4", fps=25, audio_path=tmp_path / "s.wav") as w:
        w.write(frames(10))
    info = probe_video(tmp_path / "s.mp4")
    assert info["frames"] == 10 and info["has_audio"]


def test_video_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "v.mp4"
    with pytest.raises(ValueError):
        with VideoWriter(out, fps=25) as w:
            w.write(frames(2))
            raise ValueError("boom")
    with pytest.warns(UserWarning, match="no frames"):
        with VideoWriter(out, fps=25):
            pass
    assert list(tmp_path.iterdir()) == []


def test_video_writer_errors(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AvatarForcingError, match="cannot write to output folder"):
        VideoWriter(blocker / "v.mp4", fps=25)
    with pytest.raises(AvatarForcingError, match="audio file not found"):
        VideoWriter(tmp_path / "v.mp4", fps=25, audio_path=tmp_path / "none.wav")
    with VideoWriter(tmp_path / "v.mp4", fps=25) as w:
        with pytest.raises(AvatarForcingError, match="uint8"):
            w.write(np.zeros((1, 8, 8, 3), np.float32))
        w.write(frames(1, 8, 8))
        with pytest.raises(AvatarForcingError, match="frame size changed"):
            w.write(frames(1, 10, 8))
    with pytest.raises(AvatarForcingError, match="not found"):
        read_video(tmp_path / "none.mp4")
    (tmp_path / "bad.mp4").write_bytes(b"garbage")
    with pytest.raises(AvatarForcingError, match="cannot read video"):
        probe_video(tmp_path / "bad.mp4")


def test_audio_is_read_in_blocks_and_equals_a_whole_read(tmp_path):
    """audio_chunks: soundfile blocks + soxr's streaming resampler give the one-shot result (to 1e-4), and
    load_audio fills one array from them (the header's length)."""
    import soxr

    from avatarforcing.media import audio_chunks, audio_num_samples
    t = np.arange(int(7.3 * 44100)) / 44100
    x = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 330 * t)], 1).astype(np.float32)
    sf.write(tmp_path / "s.wav", x, 44100)
    whole = soxr.resample(x.mean(1), 44100, 16000, quality="HQ")
    chunks = list(audio_chunks(tmp_path / "s.wav", 16000, block_seconds=1.0))
    assert len(chunks) > 5 and max(len(c) for c in chunks) <= 16000 + 400    # the resampler's delay shifts a few
    got = load_audio(tmp_path / "s.wav")
    assert len(got) == len(whole) == audio_num_samples(tmp_path / "s.wav") == sum(map(len, chunks))
    np.testing.assert_allclose(got, whole, atol=1e-4)
    np.testing.assert_array_equal(got, np.concatenate(chunks))


def test_a_file_streams_through_the_feed_when_its_features_stream_exactly(tmp_path):
    """Mel features are causal: a file is read block by block (never whole) and gives the offline rows."""
    from avatarforcing.audio import AudioFeed, LookaheadRows, MelFeatures, OfflineRows
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(16000 * 6)).astype(np.float32)
    write_wav(tmp_path / "a.wav", wav)
    enc = MelFeatures()
    from_file = AudioFeed(enc, tmp_path / "a.wav", 640 * 16)
    from_wave = AudioFeed(enc, load_audio(tmp_path / "a.wav"), 640 * 16)
    assert isinstance(from_file.source, LookaheadRows) and isinstance(from_wave.source, OfflineRows)
    for start in range(0, 30, 4):
        torch.testing.assert_close(from_file.latent(start, start + 16), from_wave.latent(start, start + 16),
                                   atol=0, rtol=0)

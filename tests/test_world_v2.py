"""World v2's data generator (issue 11): espeak-ng speech with visemes, a turning textured lit head, 128x128;
and world v1 left bit-for-bit as it was."""
import hashlib
import json

import numpy as np
import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.world.dataset import generate_clip, ground_truth_v2
from avatarforcing.world.render_v2 import (IdentityV2, render_v2, sample_identity_v2, sample_motion_v2)
from avatarforcing.world.speech_tts import (CLOSED, SHAPE_KEYS, VISEME_SHAPES, VISEMES, espeak_available,
                                            phoneme_viseme, synth_tts)

needs_espeak = pytest.mark.skipif(not espeak_available(),
                                  reason="espeak-ng not installed (apt-get install -y espeak-ng; .ci/run does)")


def _sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# Computed from the code at commit b50be206 (before world v2 existed) with
#   c = generate_clip(seed, seconds, size); _sha(c.frames), _sha(np.round(c.wav * 32767).astype("<i2"))
# (the wav quantized to 16-bit as write_wav stores it). A change to v1's renderer, speech or motion breaks them.
V1_HASHES = {
    (7, 1.0, 64): ("6b196c4f28d03c1cab4050e27eb2d1606fbfdc40a19b7e2cec6e71f055cb59eb",
                   "a78c65f9ea7bb53a34720708d6477475521ab4b504ba70a626890aa027cbcd64"),
    (123, 0.6, 32): ("31bbad28558a47a5137c7039b379517b07a74cb435cb91dcd6f16cc70cfa74ba",
                     "358af93f9e2159a017c64402b115e362673df257bb655eb38d0d309427398c86"),
}


@pytest.mark.parametrize("key", sorted(V1_HASHES))
def test_v1_clips_unchanged(key):
    seed, seconds, size = key
    clip = generate_clip(seed, seconds, size)                       # version 1 is the default
    assert (_sha(clip.frames), _sha(np.round(clip.wav * 32767).astype("<i2"))) == V1_HASHES[key]


def test_unknown_version_is_an_error():
    with pytest.raises(AvatarForcingError, match="version must be 1, 2 or 3"):
        generate_clip(0, 0.2, 64, version=4)


@needs_espeak
def test_v2_clip_is_128_and_deterministic():
    a, b = generate_clip(11, 1.0, 128, version=2), generate_clip(11, 1.0, 128, version=2)
    assert a.frames.shape == (25, 128, 128, 3) and a.frames.dtype == np.uint8
    assert a.wav.shape == (16000,) and a.motion.head_pose.shape == (25, 6) and a.motion.light.shape == (25, 4)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.wav, b.wav)
    assert np.array_equal(a.motion.visemes, b.motion.visemes)
    other = generate_clip(12, 1.0, 128, version=2)
    assert np.abs(other.frames.astype(int) - a.frames).mean() > 5          # another seed: another avatar
    truth = json.loads(json.dumps(ground_truth_v2(a, 128, 1.0, None, None)))
    assert IdentityV2.from_dict(truth["identity"]) == a.identity
    assert len(truth["visemes"]) == 25 and truth["phonemes"] and truth["voice"]["voice"].startswith("en")


@needs_espeak
def test_speech_is_prefix_consistent():
    short, long = synth_tts(3.0, 5), synth_tts(7.0, 5)
    assert np.array_equal(short.wav, long.wav[:len(short.wav)])
    assert np.array_equal(short.visemes, long.visemes[:75])
    assert np.allclose(short.mouth[:-1], long.mouth[:74])                # the last frame sees past the end


@needs_espeak
def test_bilabials_close_the_mouth_on_time():
    clip = synth_tts(30.0, 3)
    T = len(clip.visemes)
    bilabials = [p for p in clip.phonemes if p.name in ("m", "b", "p") and p.end < clip.seconds]
    assert len(bilabials) >= 10
    for p in bilabials:
        mid = int((p.start + p.end) / 2 * clip.fps)
        near = clip.visemes[max(mid - 1, 0):min(mid + 2, T)]
        assert CLOSED in near, (p, near)
        assert clip.mouth_open[max(mid - 1, 0):mid + 2].min() < 0.2
    # espeak-ng's timings match its audio: the closure of a voiceless stop is quiet, the vowel after it loud
    wav = clip.wav.astype(np.float64)
    rms = lambda a, b: np.sqrt((wav[int(a * 16000):int(b * 16000)] ** 2).mean())    # noqa: E731
    ratios = [rms(p.start, p.start + 0.6 * (p.end - p.start)) / rms(q.start, q.end)
              for p, q in zip(clip.phonemes, clip.phonemes[1:])
              if p.name in ("p", "t", "k") and q.name[0] in "aeiouAEIOV03@"]
    assert len(ratios) >= 10 and np.median(ratios) < 0.35
    # every viseme occurs, and silence (lead-in) is rest
    assert set(np.unique(clip.visemes)) == set(range(len(VISEMES))) and clip.visemes[0] == 0


def test_phoneme_mapping():
    assert [VISEMES[phoneme_viseme(p)] for p in ("m", "b", "p", "f", "v", "u:", "w", "i:", "s", "aI", "A:", "_:")] \
        == ["closed"] * 3 + ["fv"] * 2 + ["round"] * 2 + ["wide"] * 2 + ["open"] * 2 + ["rest"]


def _still(T, yaw=0.0, kelvin=6500.0):
    pose = np.tile(np.array([0, 0, 0, yaw, 0, 1.0], np.float32), (T, 1))
    light = np.tile(np.array([0.3, 0.5, 1.0, kelvin], np.float32), (T, 1))
    return pose, light


def test_visemes_draw_distinct_mouths():
    ident = sample_identity_v2(4)
    V = len(VISEMES)
    pose, light = _still(V)
    frames = render_v2(ident, VISEME_SHAPES, pose, light, np.zeros(V), size=128).astype(np.float64)
    I = ident.base
    r0, r1 = int((I.mouth_y - 0.17 + 1) * 64), int((I.mouth_y + 0.17 + 1) * 64)   # face units -> rows at 128 px
    c0, c1 = int((-I.mouth_w * 1.4 + 1) * 64), int((I.mouth_w * 1.4 + 1) * 64)
    mouths = frames[:, r0:r1, c0:c1]
    outside = frames[:, :r0 - 4]
    for i in range(V):
        for j in range(i + 1, V):
            assert np.abs(mouths[i] - mouths[j]).mean() > 1.5, (VISEMES[i], VISEMES[j])
            assert np.array_equal(outside[i], outside[j])                  # only the mouth changes


def test_long_clip_drifts_while_identity_stays():
    T, fps = 180 * 25, 25
    mouth = np.tile(VISEME_SHAPES[0], (T, 1))
    m = sample_motion_v2(T, 9, mouth, np.zeros(T, np.int64), fps)
    first, last = slice(0, 30 * fps), slice(T - 30 * fps, T)            # first and last 30 s
    pose, light = m.head_pose, m.light
    assert np.ptp(pose[:, 3]) > 0.5                                     # head turns (yaw, radians)
    assert np.ptp(pose[:, 5]) > 0.15                                    # zoom
    assert np.ptp(light[:, 3]) > 1000                                   # colour temperature (K)
    # slow drift, not only sways: the 30 s means at the two ends differ
    moved = np.abs(pose[first].mean(0) - pose[last].mean(0))
    assert moved[[0, 1, 5]].max() > 0.05 and abs(light[first, 3].mean() - light[last, 3].mean()) > 200
    assert sample_motion_v2(T // 2, 9, mouth[:T // 2], np.zeros(T // 2, np.int64), fps).head_pose.tolist() \
        == pose[:T // 2].tolist()                                        # prefix-consistent
    ident = sample_identity_v2(9)
    assert ident == sample_identity_v2(9) and ident.base.seed == 9
    idx = [0, T - 1]
    frames = render_v2(ident, mouth[idx], pose[idx], light[idx], m.blink[idx], size=128).astype(float)
    assert np.abs(frames[0] - frames[1]).mean() > 8                     # the reference no longer matches


def test_light_and_yaw_act_on_the_image():
    ident = sample_identity_v2(2)
    shape = np.tile(VISEME_SHAPES[0], (3, 1))
    pose, light = _still(3)
    pose[1, 3] = 0.5                                                    # turned
    light[2, 3] = 3000.0                                                # warm light
    f = render_v2(ident, shape, pose, light, np.zeros(3), size=128).astype(float)
    assert f[2][..., 0].mean() - f[2][..., 2].mean() > f[0][..., 0].mean() - f[0][..., 2].mean() + 10
    assert np.abs(f[1] - f[0]).mean() > 3
    with pytest.raises(AvatarForcingError, match="render_v2 got"):
        render_v2(ident, shape[:, :4], pose, light, np.zeros(3))
    assert len(SHAPE_KEYS) == 5


def test_v2_config():
    from avatarforcing.config import load_config
    cfg = load_config("configs/world/v2.yaml")
    assert (cfg.world.version, cfg.world.size, cfg.data.height, cfg.inference.width) == (2, 64, 64, 64)
    assert load_config("configs/world/pipeline.yaml").world.version == 1
    student = load_config("configs/world/v2_student.yaml")
    assert student.world.version == 2 and student.inference.checkpoint == "assets/world_v2/model.pt"
    anchor = load_config("configs/world/v2_anchor.yaml")                 # identity through attention only
    assert anchor.model.in_dim == 16 and anchor.world.version == 2 and anchor.world.run == "runs/world_v2_anchor"
    assert cfg.model.in_dim == 33 and anchor.cache.reference_in_temporal is False


def test_pipeline_refuses_an_unknown_world_version(tmp_path):
    from avatarforcing import AvatarForcingError
    from avatarforcing.config import load_config
    from avatarforcing.world.pipeline import run_pipeline
    with pytest.raises(AvatarForcingError, match=r"world.version=4 .*must be 1, 2 or 3"):
        run_pipeline(load_config("configs/world/v2.yaml", [f"world.run={tmp_path}", "world.version=4"]))


def _prediction_error(x: np.ndarray, history: int, ahead: int) -> float:
    """RMS error of predicting x[t + ahead - 1] linearly from x[t - history:t] (least squares over the track),
    over the RMS of the change it has to predict, x[t + ahead - 1] - x[t - 1]."""
    n = len(x) - history - ahead + 1
    X = np.stack([x[i:i + n] for i in range(history)] + [np.ones(n)], 1)
    y = x[history + ahead - 1:history + ahead - 1 + n]
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    return float(np.sqrt(np.mean((X @ coef - y) ** 2)) / np.sqrt(np.mean((y - X[:, history - 1]) ** 2)))


def test_v3_sway_is_large_and_follows_from_its_past():
    """World v3's head is always moving, and far more predictable from its last frames than v2's turns."""
    T, fps = 60 * 25, 25
    mouth = np.tile(VISEME_SHAPES[0], (T, 1))
    visemes = np.zeros(T, np.int64)
    v2 = [sample_motion_v2(T, s, mouth, visemes, fps).head_pose for s in range(8)]
    v3 = [sample_motion_v2(T, s, mouth, visemes, fps, sway=True).head_pose for s in range(8)]
    yaw_speed = lambda poses: np.mean([np.abs(np.diff(p[:, 3])).mean() for p in poses])   # noqa: E731
    assert yaw_speed(v3) > 3 * yaw_speed(v2)
    # every 0.64 s block moves the head: the yaw range within each block is never near zero
    for p in v3:
        blocks = p[: T // 16 * 16, 3].reshape(-1, 16)
        assert np.percentile(np.ptp(blocks, 1), 10) > 0.05
    # the yaw at the end of the next block (16 frames) from the 8 frames before (what the 2-latent-frame temporal
    # cache holds): v3's is predictable, v2's (turns to random targets) is not
    err = lambda poses: np.mean([_prediction_error(p[:, 3], 8, 16) for p in poses])    # noqa: E731
    assert err(v3) < 0.05 and err(v2) > 0.5
    same = sample_motion_v2(T // 3, 3, mouth[:T // 3], visemes[:T // 3], fps, sway=True).head_pose
    assert np.array_equal(same, v3[3][:T // 3])                                             # prefix-consistent


@needs_espeak
def test_v3_world_writes_its_own_version(tmp_path):
    from avatarforcing.world.dataset import write_world
    from avatarforcing.world.evaluate import held_out_cases
    a, b = generate_clip(5, 0.6, 32, version=3), generate_clip(5, 0.6, 32, version=2)
    assert np.array_equal(a.wav, b.wav) and a.identity == b.identity                 # same speech and avatar,
    assert not np.array_equal(a.motion.head_pose, b.motion.head_pose)                 # another motion
    assert ground_truth_v2(a, 32, 0.6, None, None)["version"] == 3
    write_world(tmp_path, 1, seconds=0.6, size=32, seed=1, version=3, mux_audio=False)
    assert json.loads((tmp_path / "clip_00000.json").read_text())["version"] == 3
    with pytest.raises(AvatarForcingError, match="was made with"):                     # a v3 folder is not a v2 one
        write_world(tmp_path, 1, seconds=0.6, size=32, seed=1, version=2, mux_audio=False)
    case, = held_out_cases(1, 0.6, size=32, seed=77, version=3)
    assert case.mouth_truth is not None and case.real_frames.shape == (15, 32, 32, 3)
    from avatarforcing.config import load_config
    cfg = load_config("configs/world/sway.yaml")
    assert (cfg.world.version, cfg.model.in_dim, cfg.world.run) == (3, 16, "runs/world_sway")

"""World metrics: each one separates a known-good video from a known-bad one."""
import numpy as np
import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.metrics import (MetricNets, block_seam_excess, evaluate_video, feature_stats, frechet_distance,
                                   sync_scores)
from avatarforcing.world import generate_clip, render, sample_motion, synth_speech


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Quickly trained nets (32 px input, 16 identities, 150 steps each: a few seconds)."""
    path = tmp_path_factory.mktemp("nets") / "metric_nets.pt"
    nets = MetricNets.train(path, num_ids=16, frames_per_id=16, sync_steps=150, id_steps=150,
                            batch_size=32, size=32, threads=1, log=None)
    nets.path = path
    return nets


@pytest.fixture(scope="module")
def clip():
    return generate_clip(seed=11, seconds=6.0, size=64)


def test_sync_scores_on_ground_truth():
    env = synth_speech(8.0, seed=5).envelope.astype(np.float64)
    good = sync_scores(env, env, max_offset=15)
    assert good["conf"] == pytest.approx(1.0) and good["offset"] == 0 and good["dist"] == pytest.approx(0.0)
    late_mouth = np.concatenate([np.zeros(4), env[:-4]])            # video 4 frames behind the audio
    s = sync_scores(late_mouth, env, max_offset=15)
    assert s["lag"] == -4 and s["offset"] == 4 and s["dist"] > 0.3
    with pytest.raises(AvatarForcingError, match="max_offset"):
        sync_scores(env[:20], env[:20], max_offset=15)


def test_sync_detects_shifted_audio(nets, clip):
    good = evaluate_video(clip.frames, clip.wav, clip.frames[0], nets, tail_seconds=3)
    assert good["sync_conf_total"] > 0.8 and good["sync_offset_total"] <= 1
    assert good["sync_dist_total"] < 0.2
    shifted = np.concatenate([np.zeros(10 * 640, np.float32), clip.wav])[:len(clip.wav)]   # audio 10 frames late
    bad = evaluate_video(clip.frames, shifted, clip.frames[0], nets, tail_seconds=3)
    assert bad["sync_dist_total"] > good["sync_dist_total"] + 0.5     # r at offset 0 drops
    assert abs(bad["sync_offset_total"] - 10) <= 1 and abs(bad["sync_lag_total"] - 10) <= 1


def test_colour_drift_shows_in_last(nets, clip):
    good = evaluate_video(clip.frames, None, clip.frames[0], nets, tail_seconds=2)
    drift = clip.frames.astype(np.int16)
    drift[-50:, ..., 0] += 40                                          # red cast over the last 2 s
    drift = np.clip(drift, 0, 255).astype(np.uint8)
    bad = evaluate_video(drift, None, clip.frames[0], nets, tail_seconds=2)
    assert bad["delta_e_last"] > bad["delta_e_total"] > good["delta_e_total"] + 2
    assert bad["delta_e_last"] > good["delta_e_last"] + 5
    assert bad["csim_last"] < good["csim_last"]


def test_flicker_rises_for_shuffled_and_noisy_video(nets, clip):
    good = evaluate_video(clip.frames, None, clip.frames[0], nets)
    shuffled = clip.frames[np.random.default_rng(0).permutation(len(clip.frames))]
    noisy = np.clip(clip.frames + np.random.default_rng(1).normal(0, 12, clip.frames.shape), 0, 255).astype(np.uint8)
    for bad_frames in (shuffled, noisy):
        bad = evaluate_video(bad_frames, None, clip.frames[0], nets)
        assert bad["adj_pixel_total"] > 2 * good["adj_pixel_total"]
        assert bad["adj_feat_total"] > 2 * good["adj_feat_total"]


def test_block_seams_show_in_seam_feat_only_for_seamed_video(nets, clip):
    """A video whose every 16-frame block restarts from another frame (a stream that ignores its history) has a
    large seam excess; the real video has ~none.  The seam index follows the block layout (frame 0 = reference)."""
    good = evaluate_video(clip.frames, None, clip.frames[0], nets, seam_period=16)
    seamed = clip.frames.copy()
    for b in range(1, (len(seamed) - 1) // 16):                         # block b: frames 16b+1 .. 16b+16
        seamed[16 * b + 1:16 * b + 17] = np.roll(seamed[16 * b + 1:16 * b + 17], 8 * (b % 2 * 2 - 1), axis=2)
    bad = evaluate_video(seamed, None, clip.frames[0], nets, seam_period=16)
    assert abs(good["seam_feat_total"]) < 0.2 * bad["seam_feat_total"]
    assert bad["seam_feat_total"] > 0 and bad["seam_feat_last"] > 0
    assert "seam_feat_total" not in evaluate_video(clip.frames, None, clip.frames[0], nets)
    adj = np.ones(40)
    adj[::4] = 2.0                                                      # every latent-frame seam: the decoder
    adj[[16, 32]] = 5.0                                                 # block seams: the stream
    assert block_seam_excess(adj, 16) == pytest.approx(3.0)             # 5 - 2: the within-pair frames do not count
    assert block_seam_excess(np.where(np.arange(40) % 4 == 0, 2.0, 1.0), 16) == 0  # decoder seams alone: none
    assert np.isnan(block_seam_excess(adj, 16, slice(17, 30)))          # no block seam in the span


def test_other_identity_lowers_csim(nets, clip):
    other = generate_clip(seed=12, seconds=2.0, size=64)
    same = evaluate_video(clip.frames[:50], None, clip.frames[0], nets)
    diff = evaluate_video(other.frames, None, clip.frames[0], nets)
    assert same["csim_total"] > 0.9 and diff["csim_total"] < same["csim_total"] - 0.2


def test_csim_curve_follows_identity_over_time(nets, clip):
    """csim_curve: the mean CSIM per segment; a video that becomes another person halfway falls in its later
    segments only, and the segments (weighted by their frames) average to csim_total."""
    other = generate_clip(seed=12, seconds=2.0, size=64)
    swapped = np.concatenate([clip.frames[:50], other.frames[:50]])
    m = evaluate_video(swapped, None, clip.frames[0], nets, curve_seconds=0.4)    # 10 frames per segment
    curve = m["csim_curve"]
    assert len(curve) == 10 and min(curve[:5]) > max(curve[5:]) + 0.2
    assert np.mean(curve) == pytest.approx(m["csim_total"], abs=1e-6)
    odd = evaluate_video(swapped[:95], None, clip.frames[0], nets, curve_seconds=0.4)["csim_curve"]
    assert len(odd) == 10                                               # the last segment holds the 5 left over
    assert "csim_curve" not in evaluate_video(clip.frames, None, clip.frames[0], nets)


def test_fid_lower_for_same_distribution(nets, clip):
    real = nets.features(clip.frames)
    motion = sample_motion(100, seed=99, envelope=synth_speech(4.0, seed=99).envelope)
    same = render(clip.identity, motion.mouth_open, motion.head_pose, motion.blink, size=64)
    other = generate_clip(seed=13, seconds=4.0, size=64).frames
    fid_same = evaluate_video(same, None, same[0], nets, real_feats=real)["fid_total"]
    fid_other = evaluate_video(other, None, other[0], nets, real_feats=feature_stats(real))["fid_total"]
    assert 0 <= fid_same < fid_other / 5


def test_frechet_distance_on_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4))
    assert frechet_distance(a, b) < 0.05
    assert frechet_distance(a, b + 1.0) == pytest.approx(4.0, abs=0.2)          # |mu1 - mu2|^2


def test_report_keys_and_tail(nets, clip):
    r = evaluate_video(clip.frames, clip.wav, clip.frames[0], nets, tail_seconds=100)
    for name in ("sync_conf", "sync_offset", "sync_dist", "csim", "delta_e", "adj_feat", "adj_pixel"):
        assert r[f"{name}_total"] == pytest.approx(r[f"{name}_last"]), name     # tail covers everything
    assert "fid_total" not in r and r["tail_frames"] == r["num_frames"] == 150
    r = evaluate_video(clip.frames, clip.wav, clip.frames[0], nets, tail_seconds=2)
    assert r["tail_frames"] == 50 and r["delta_e_total"] != r["delta_e_last"]


def test_save_load_and_errors(nets, clip, tmp_path):
    loaded = MetricNets.load(nets.path)
    np.testing.assert_allclose(loaded.mouth_open(clip.frames[:8]), nets.mouth_open(clip.frames[:8]))
    np.testing.assert_allclose(loaded.features(clip.frames[:8]), nets.features(clip.frames[:8]))
    assert loaded.info["trained"] and loaded.size == 32
    with pytest.raises(AvatarForcingError, match="MetricNets.train"):
        MetricNets.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AvatarForcingError, match="not a metric-nets checkpoint"):
        MetricNets.load(tmp_path / "junk.pt")
    with pytest.raises(AvatarForcingError, match="uint8 frames"):
        evaluate_video(clip.frames / 255.0, None, clip.frames[0], nets)
    with pytest.raises(AvatarForcingError, match="video's size"):
        evaluate_video(clip.frames, None, clip.frames[0, :32], nets)


def test_random_nets_still_measure_flicker(clip):
    nets = MetricNets.random(seed=0, size=64)
    still = np.repeat(clip.frames[:1], 10, axis=0)
    r = evaluate_video(still, None, clip.frames[0], nets)
    assert r["adj_feat_total"] == 0 and r["adj_pixel_total"] == 0 and r["delta_e_total"] == 0
    assert r["csim_total"] == pytest.approx(1.0)

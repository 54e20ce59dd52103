"""World v2 evaluation: the ``world_v2`` metric backend, v2 held-out cases (cache, workers) and lip sync against
the ground-truth mouth opening."""
import numpy as np
import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.backends import metric_backend
from avatarforcing.metrics import MetricNets
from avatarforcing.world import evaluate as E
from avatarforcing.world.dataset import clip_seed, generate_clip
from avatarforcing.world.metric_nets import (ID_SEED_BASE, ID_SEED_BASE_V2, METRIC_BACKEND_V2, mouth_shapes_v2,
                                             training_frames_v2)


def test_training_frames_v2_shapes_deterministic_and_disjoint():
    frames, mouth, labels = training_frames_v2(2, 3, 32, 0)
    assert frames.shape == (6, 32, 32, 3) and frames.dtype == np.uint8
    assert mouth.shape == (6,) and mouth.dtype == np.float32 and ((0 <= mouth) & (mouth <= 1)).all()
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    again = training_frames_v2(2, 3, 32, 0)
    assert np.array_equal(frames, again[0]) and np.array_equal(mouth, again[1])
    assert not np.array_equal(frames, training_frames_v2(2, 3, 32, 1)[0])
    assert metric_backend("world_v2") is METRIC_BACKEND_V2
    shapes = mouth_shapes_v2(np.random.default_rng(0), 500)
    assert shapes.shape == (500, 5) and shapes[:, 0].min() < 0.05 and shapes[:, 0].max() > 0.9
    # identity seeds: disjoint from v1's, from the held-out and the training clips
    ids = {ID_SEED_BASE_V2 + 100_000 * s + i for s in range(8) for i in range(1000)}
    assert min(ids) > ID_SEED_BASE + 100_000 * 299 + 99_999
    assert not ids & {clip_seed(E.HELD_OUT_WORLD_SEED, i) for i in range(1000)}
    assert not ids & E.training_clip_seeds(20_000)


def test_held_out_cases_v2_truth_and_cache(tmp_path, monkeypatch):
    a = E.held_out_cases(2, 0.4, size=32, version=2, cache_dir=tmp_path)
    b = E.held_out_cases(2, 0.4, size=32, version=2)
    clip = generate_clip(clip_seed(E.HELD_OUT_WORLD_SEED, 0), 0.4, 32, version=2)
    assert np.array_equal(a[0].mouth_truth, clip.motion.mouth[:, 0])
    for x, y in zip(a, b):
        assert x.real_frames.shape == (10, 32, 32, 3) and x.mouth_truth.shape == (10,)
        assert x.mouth_truth.dtype == np.float32 and x.wav.dtype == np.float32
        assert np.array_equal(x.real_frames, y.real_frames) and np.array_equal(x.mouth_truth, y.mouth_truth)
        assert np.array_equal(x.wav, y.wav) and x.seed == y.seed and np.array_equal(x.reference, x.real_frames[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        E.case_cache_path(tmp_path, E.HELD_OUT_WORLD_SEED, i, 0.4, 32, 2).name for i in range(2))

    def fail(*args, **kwargs):
        raise AssertionError("a cached case was rendered again")

    monkeypatch.setattr(E, "generate_clip", fail)
    c = E.held_out_cases(2, 0.4, size=32, version=2, cache_dir=tmp_path)
    for x, y in zip(a, c):
        assert (x.seed, x.index, x.world_seed) == (y.seed, y.index, y.world_seed)
        for k in ("real_frames", "wav", "mouth_truth", "reference"):
            assert np.array_equal(getattr(x, k), getattr(y, k)) and getattr(x, k).dtype == getattr(y, k).dtype
    with pytest.raises(AvatarForcingError, match="version must be 1, 2 or 3"):
        E.held_out_cases(1, 0.4, version=4)


def test_held_out_cases_v1_unchanged_and_workers(tmp_path):
    plain = E.held_out_cases(2, 0.4)
    clip = generate_clip(clip_seed(E.HELD_OUT_WORLD_SEED, 1), 0.4, 64)
    assert plain[1].mouth_truth is None and np.array_equal(plain[1].real_frames, clip.frames)
    assert np.array_equal(plain[1].wav, clip.wav)
    for cases in (E.held_out_cases(2, 0.4, cache_dir=tmp_path), E.held_out_cases(2, 0.4, cache_dir=tmp_path),
                  E.held_out_cases(2, 0.4, workers=2)):
        for x, y in zip(plain, cases):
            assert y.mouth_truth is None and x.seed == y.seed
            assert np.array_equal(x.real_frames, y.real_frames) and np.array_equal(x.wav, y.wav)


def _case_with_truth(T=50, seed=0):
    """A v1 clip's frames with a smooth random ground-truth mouth opening and white-noise audio."""
    rng = np.random.default_rng(seed)
    case = E.held_out_cases(1, T / 25)[0]
    truth = np.convolve(rng.uniform(0, 1, T + 4), np.ones(5) / 5, mode="valid").astype(np.float32)
    case.mouth_truth, case.wav = truth, rng.normal(0, 0.3, len(case.wav)).astype(np.float32)
    return case


def test_scorer_syncs_against_mouth_truth(monkeypatch):
    case = _case_with_truth()
    truth = case.mouth_truth
    nets = MetricNets.random(size=32)
    feats = E.real_feature_stats([case], nets)
    scorer = E.WorldScorer(nets, feats, tail_seconds=1.0)
    late = np.concatenate([np.full(12, truth[0]), truth[:-12]])           # the mouth 12 frames behind the truth
    monkeypatch.setattr(nets, "mouth_open", lambda frames: truth[:len(frames)].astype(np.float64))
    aligned = E.evaluate_variant(case.real_frames, case, nets, feats, tail_seconds=1.0)
    assert aligned["sync_lag_total"] == 0 and aligned["sync_conf_total"] > 0.999
    assert scorer.score(case.real_frames, E.case_item(case))["sync_conf_total"] == aligned["sync_conf_total"]
    monkeypatch.setattr(nets, "mouth_open", lambda frames: late[:len(frames)].astype(np.float64))
    shifted = scorer.score(case.real_frames, E.case_item(case))
    assert shifted["sync_lag_total"] == -12 and shifted["sync_offset_total"] == 12
    assert shifted["sync_dist_total"] > aligned["sync_dist_total"] + 0.2
    # without a truth the speech loudness is used (here noise: no sync)
    monkeypatch.setattr(nets, "mouth_open", lambda frames: truth[:len(frames)].astype(np.float64))
    case.mouth_truth = None
    assert E.evaluate_variant(case.real_frames, case, nets, feats, tail_seconds=1.0)["sync_conf_total"] < 0.9


def test_truth_envelope_cuts_and_pads():
    truth = np.arange(5, dtype=np.float32)
    assert E._truth_envelope(truth, None, 16000, 25, 7).tolist() == [0, 1, 2, 3, 4, 4, 4]
    assert E._truth_envelope(truth, None, 16000, 25, 3).tolist() == [0, 1, 2]


def test_metric_nets_train_world_v2(tmp_path):
    path = tmp_path / "nets.pt"
    nets = MetricNets.train(path, num_ids=2, frames_per_id=4, sync_steps=2, id_steps=2, batch_size=4, size=32,
                            backend="world_v2", log=None)
    assert nets.backend == "world_v2" and nets.info["num_ids"] == 2 and "val_mouth_corr" in nets.info
    loaded = MetricNets.load(path)
    assert loaded.backend == "world_v2" and loaded.size == 32
    assert MetricNets.random().backend == "world"

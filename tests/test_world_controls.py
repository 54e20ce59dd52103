"""Positive controls (avatarforcing/world/controls.py) and the paired per-case runner (avatarforcing/world/bench.py),
on the shipped demo model and very short held-out clips."""
import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avatarforcing import AvatarForcingError, pipeline, sampler
from avatarforcing.attention import KV
from avatarforcing.metrics import MetricNets
from avatarforcing.stream_state import CacheConfig, NoiseSource, StreamCache
from avatarforcing.world import bench
from avatarforcing.world.bench import Arm, build_pipe, evaluate_arms, rollout_arm
from avatarforcing.world.controls import (FrozenNoise, controls, foreign_anchor, other_case, shift_wav,
                                          temporal_rope_offset)
from avatarforcing.world.evaluate import held_out_cases
from avatarforcing.world.speech_tts import espeak_available
from avatarforcing.config import load_config
from avatarforcing.stats import verdict

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
CKPT = ROOT / "assets" / "demo" / "model.pt"
pytestmark = [pytest.mark.skipif(not CKPT.is_file(), reason="the demo model is not shipped in this checkout"),
              pytest.mark.skipif(int(load_config(DEMO).world.version) == 2 and not espeak_available(),
                                 reason="the demo is world v2, whose held-out speech needs espeak-ng "
                                        "(apt-get install -y espeak-ng; .ci/run does)")]


@pytest.fixture(scope="module")
def cases():
    from avatarforcing.config import load_config
    cfg = load_config(DEMO)                 # the demo's world (version, size); 50 frames: 4 blocks, so the
    return held_out_cases(2, 2.0, size=int(cfg.inference.height), version=int(cfg.world.version))  # cache is read


@pytest.fixture(scope="module")
def pipe():
    return build_pipe(DEMO, CKPT)


@pytest.fixture(scope="module")
def clean(pipe, cases):
    return rollout_arm(Arm("clean"), pipe, cases[0], cases)[0]


def test_each_control_changes_the_stream_and_is_undone(pipe, cases, clean):
    originals = (StreamCache.context, sampler.prefill_anchor, pipeline.NoiseSource)
    for control in controls():
        p = build_pipe(DEMO, CKPT, control.overrides) if control.overrides else pipe
        broken = rollout_arm(control, p, cases[0], cases)[0]
        assert broken.shape == clean.shape
        assert np.abs(broken.astype(int) - clean).mean() > 0.05, control.name
        assert (StreamCache.context, sampler.prefill_anchor, pipeline.NoiseSource) == originals, control.name
        assert np.array_equal(rollout_arm(Arm("clean"), pipe, cases[0], cases)[0], clean), control.name
    names = [c.name for c in controls()]
    assert len(names) == 5 and len({c.key for c in controls()}) == 5
    assert all(c.metric and c.rationale for c in controls())


def test_injections_are_undone_on_error():
    original = StreamCache.context
    with pytest.raises(RuntimeError), temporal_rope_offset(7):
        assert StreamCache.context is not original
        raise RuntimeError("boom")
    assert StreamCache.context is original


def test_temporal_rope_offset_moves_only_the_temporal_frames():
    kv = lambda frames: KV([torch.zeros(1, 4 * frames, 1, 2)], [torch.zeros(1, 4 * frames, 1, 2)], frames)  # noqa
    cache = StreamCache(CacheConfig(), tokens_per_frame=4, grid=(2, 2), anchor=kv(1), temporal=kv(2), next_frame=41)
    _, clean_pos = cache.context()
    with temporal_rope_offset(64):
        _, pos = cache.context()
        window = cache.window_positions(16)
    assert clean_pos.tolist() == [-1, 0, 1]
    assert pos.tolist() == [-1, 64, 65]
    assert window.tolist() == list(range(2, 18))
    assert cache.context()[1].tolist() == [-1, 0, 1]


def test_frozen_noise_ignores_block_and_level():
    frozen, normal = FrozenNoise(3), NoiseSource(3)
    a, b = frozen(0, 0, (1, 2, 3)), frozen(5, 2, (1, 2, 3))
    assert torch.equal(a, b) and torch.equal(a, normal(0, 0, (1, 2, 3)))
    assert not torch.equal(normal(5, 2, (1, 2, 3)), a)


def test_foreign_anchor_uses_the_given_latent(pipe, cases):
    seen = []
    original = sampler.prefill_anchor
    latent = torch.full((1, 16, 1, 8, 8), 0.5)
    from unittest import mock
    with mock.patch.object(sampler, "prefill_anchor", lambda m, c, ref, audio=None: seen.append(ref)):
        with foreign_anchor(latent):
            sampler.prefill_anchor(None, None, torch.zeros(1, 16, 1, 8, 8))
    assert torch.equal(seen[0], latent) and sampler.prefill_anchor is original
    assert other_case(cases[0], cases) is cases[1] and other_case(cases[1], cases) is cases[0]
    with pytest.raises(AvatarForcingError, match="at least 2 cases"):
        other_case(cases[0], cases[:1])


def test_shift_wav():
    wav = np.arange(1, 16_001, dtype=np.float32)
    out = shift_wav(wav, 0.5)
    assert out.shape == wav.shape and out.dtype == wav.dtype
    assert not out[:8000].any() and np.array_equal(out[8000:], wav[:8000])
    with pytest.raises(AvatarForcingError, match="longer than the shift"):
        shift_wav(wav[:100], 0.5)


def test_arm_needs_a_tag_for_injections():
    with pytest.raises(AvatarForcingError, match="no tag"):
        Arm("x", drive=lambda c: c)
    assert Arm("a", ("cache.style_anchor=false",)).key == Arm("b", ("cache.style_anchor=false",)).key
    assert Arm("a").key != Arm("a", tag="t", drive=lambda c: c).key


def test_evaluate_arms_caches_and_resumes(tmp_path, cases, monkeypatch):
    nets = MetricNets.random()
    arms = [Arm("clean"), controls()[3]]
    first = evaluate_arms(DEMO, CKPT, arms, cases, nets, cache_dir=tmp_path, baseline="clean", log=None)
    assert set(first) == {"clean", arms[1].name} and set(first["clean"]) == {0, 1}
    assert first["clean"][0]["pixel_change"] == 0 and first[arms[1].name][0]["pixel_change"] > 0.5
    assert first["clean"][0]["sync_dist_total"] != first[arms[1].name][0]["sync_dist_total"]
    stored = json.loads((tmp_path / arms[1].key / "case1.json").read_text())
    assert stored["tag"] == arms[1].tag and stored["metrics"]["csim_total"] == first[arms[1].name][1]["csim_total"]
    (tmp_path / arms[1].key / "case1.json").unlink()             # an interrupted run: one case missing
    calls = []
    real = bench.rollout_arm
    monkeypatch.setattr(bench, "rollout_arm", lambda *a, **k: calls.append(a[0].name) or real(*a, **k))
    again = evaluate_arms(DEMO, CKPT, arms, cases, nets, cache_dir=tmp_path, baseline="clean", log=None)
    assert calls == [arms[1].name, "clean"]             # the baseline's frames are rolled out again, not re-scored
    for key in ("csim_total", "pixel_change"):
        assert again[arms[1].name][1][key] == pytest.approx(first[arms[1].name][1][key])
    with pytest.raises(AvatarForcingError, match="distinct"):
        evaluate_arms(DEMO, CKPT, [Arm("a"), Arm("a")], cases, nets, log=None)
    with pytest.raises(AvatarForcingError, match="baseline"):
        evaluate_arms(DEMO, CKPT, arms, cases, nets, baseline="nope", log=None)


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_export(dest: Path) -> Path:
    """A world run's export (train/checkpointing.py): the demo's weights as 'generator_ema' and other raw weights
    as 'generator', so an arm that read the raw weights would not match the demo."""
    ema = torch.load(CKPT)["generator"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": {k: v + 0.05 if v.is_floating_point() else v for k, v in ema.items()},
                "generator_ema": ema}, dest)
    return dest


def test_trained_arm_reads_the_exports_ema_weights(tmp_path):
    export = _run_export(tmp_path / "dmd" / "export" / "model.pt")
    arm = Arm.trained("B_{2,2} trained", export, ("schedule.window_blocks=2", "schedule.passes=2"))
    assert arm.overrides[-1] == "inference.use_ema=true" and arm.checkpoint == str(export)
    shipped = build_pipe(DEMO, CKPT).model.state_dict()
    loaded = build_pipe(DEMO, arm.checkpoint, arm.overrides).model.state_dict()
    assert all(torch.equal(loaded[k], shipped[k]) for k in shipped)
    raw = build_pipe(DEMO, export).model.state_dict()                  # what a plain Arm(checkpoint=...) read
    assert not all(torch.equal(raw[k], shipped[k]) for k in shipped)
    # world_ablations.py and the pipeline's evaluation read a run's exports through run_overrides: the EMA as well
    from avatarforcing.config import apply_overrides
    from avatarforcing.world.evaluate import run_overrides
    cfg = apply_overrides(load_config(DEMO), run_overrides(tmp_path), "run")
    via_run = build_pipe(cfg, export).model.state_dict()
    assert all(torch.equal(via_run[k], shipped[k]) for k in shipped)


def test_scripts_write_controls_and_claims(tmp_path):
    nets = tmp_path / "nets.pt"
    MetricNets.random().save(nets)
    args = ["--cases", "2", "--seconds", "1.5", "--metric-nets", str(nets), "--run", str(tmp_path / "run"),
            "--out", str(tmp_path / "out"), "--resamples", "2000"]
    assert _script("world_controls").main(args) == 0
    entries = json.loads((tmp_path / "out" / "controls.json").read_text())
    assert [e["control"] for e in entries] == [c.name for c in controls()]
    for e in entries:
        assert {"control", "metric", "effect", "ci_low", "ci_high", "detected", "n_cases"} <= set(e)
        assert e["n_cases"] == 2 and e["detected"] == (e["ci_low"] > 0) and e["ci_low"] <= e["effect"] <= e["ci_high"]
        assert e["video_change"] > 0 and "(world seed 10000)" in e["bench"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "controls_per_case.csv")))
    assert len(rows) == 6 * 2 and "fid_total" in rows[0]
    assert "| control | metric |" in (tmp_path / "out" / "controls.md").read_text()

    claims_script = _script("world_claims")
    assert claims_script.main(args) == 0
    claims = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert len(claims) == len(claims_script.CLAIMS)
    for c in claims:
        assert {"claim", "verdict", "effect", "ci_low", "ci_high", "n_cases"} <= set(c)
        assert c["verdict"] == verdict(c["ci_low"], c["ci_high"]) and c["n_cases"] == 2
    # one cache folder per distinct arm: the claims' full method is the controls' clean arm, computed once
    cache = next((tmp_path / "run" / "cache").iterdir())
    assert len(list(cache.iterdir())) == 1 + len(controls()) + len(claims_script.claim_arms(CKPT)) - 2
    assert _script("world_controls").main(args + ["--cases", "1"]) == 1          # a one-line error
    assert _script("world_controls").main(args + ["--case-seed", "0"]) == 1      # the training world's seed
    # --dmd-window adds the item-3 claim: a second trained student (here an export whose EMA is the demo) against
    # the shipped one; the arm reads the export's EMA weights, as the shipped student is its run's EMA
    window = _run_export(tmp_path / "dmd_window" / "export" / "model.pt")
    assert claims_script.main(args + ["--dmd-window", str(window)]) == 0
    last = json.loads((tmp_path / "out" / "claims.json").read_text())[-1]
    assert last["claim"] == claims_script.WINDOW_CLAIM[0]
    assert last["winner_overrides"] == f"inference.use_ema=true weights={window}"
    assert last["effect"] == pytest.approx(0.0, abs=1e-9) and last["verdict"] == "inconclusive"   # same weights
    assert claims_script.main(args + ["--dmd-window", str(tmp_path / "missing.pt")]) == 1
    # --grid-run adds Table 3's claims with each cell trained, against the B_{4,1} trained in the same run (here
    # the demo's weights stand in for both)
    grid = tmp_path / "grid"
    assert claims_script.main(args + ["--grid-run", str(grid)]) == 1               # no run: one line
    _run_export(grid / "dmd" / "export" / "model.pt")
    from omegaconf import OmegaConf
    cfg = load_config(DEMO, ["schedule.window_blocks=null"])              # as a run saves it: L = len(steps) / N
    OmegaConf.save(cfg, grid / "dmd" / "config.yaml")
    assert claims_script.main(args + ["--grid-run", str(grid)]) == 1               # no trained cell: one line
    _run_export(grid / "dmd_2x2" / "export" / "model.pt")
    assert claims_script.main(args + ["--grid-run", str(grid)]) == 0
    last = json.loads((tmp_path / "out" / "claims.json").read_text())[-1]
    assert last["claim"].endswith("each cell trained: B_{4,1} beats B_{2,2}")
    assert (last["winner"], last["other"]) == ("B_{4,1} trained", "B_{2,2} trained")
    assert last["winner_overrides"] == ("schedule.window_blocks=4 schedule.passes=1 inference.use_ema=true "
                                        f"weights={grid}/dmd/export/model.pt")
    assert last["other_overrides"] == ("schedule.window_blocks=2 schedule.passes=2 inference.use_ema=true "
                                       f"weights={grid}/dmd_2x2/export/model.pt")
    assert last["video_change"] > 0                                     # another schedule: another video
    # a pair of another budget (B_{2,1}, B_{1,2}: L·N = 2) is compared within itself, on its own 2 evenly spaced levels
    _run_export(grid / "dmd_2x1" / "export" / "model.pt")
    _run_export(grid / "dmd_1x2" / "export" / "model.pt")
    assert claims_script.main(args + ["--grid-run", str(grid)]) == 0
    claims = json.loads((tmp_path / "out" / "claims.json").read_text())
    assert [c["claim"].split(": ")[-1] for c in claims if "each cell trained" in c["claim"]] == [
        "B_{4,1} beats B_{2,2}", "B_{2,1} beats B_{1,2}"]
    assert claims[-1]["other_overrides"] == ("schedule.window_blocks=1 schedule.passes=2 schedule.steps=null "
                                             f"schedule.warp=true inference.use_ema=true weights={grid}/dmd_1x2/export/"
                                             "model.pt")


def test_drift_is_the_models_loss_beyond_the_real_videos():
    """scripts/world_drift.py's measure: (Total - Last) of the rollout minus that of the real video, per case."""
    drift = _script("world_drift")
    real = {i: {"csim_total": 0.9, "csim_last": 0.88 + 0.001 * i} for i in range(8)}      # the video itself changes
    same = {i: dict(r) for i, r in real.items()}
    worse = {i: {"csim_total": 0.9, "csim_last": 0.80 + 0.002 * i} for i in range(8)}
    assert drift.drift_entry("same", same, real, 2000)["drift"] == pytest.approx(0.0, abs=1e-12)
    assert not drift.drift_entry("same", same, real, 2000)["drifts"]
    e = drift.drift_entry("worse", worse, real, 2000)
    assert e["drifts"] and e["ci_low"] > 0 and e["drift"] == pytest.approx(np.mean(
        [(0.9 - (0.80 + 0.002 * i)) - (0.9 - (0.88 + 0.001 * i)) for i in range(8)]))
    # lower-is-better metrics count a rise as a loss
    dist = {i: {"csim_total": 0.9, "csim_last": 0.9, "delta_e_total": 2.0, "delta_e_last": 3.0} for i in range(8)}
    flat = {i: {"csim_total": 0.9, "csim_last": 0.9, "delta_e_total": 2.0, "delta_e_last": 2.0} for i in range(8)}
    assert drift.drift_entry("d", dist, flat, 2000)["all_metrics"]["delta_e"]["drift"] == pytest.approx(1.0)


def test_drift_script_runs_a_trained_baseline_arm(tmp_path):
    nets = tmp_path / "nets.pt"
    MetricNets.random().save(nets)
    args = ["--cases", "2", "--seconds", "1.5", "--metric-nets", str(nets), "--run", str(tmp_path / "run"),
            "--out", str(tmp_path / "out"), "--resamples", "2000", "--curve-seconds", "0.6", "--baseline",
            str(_run_export(tmp_path / "self_forcing" / "export" / "model.pt")), "--anchor-free-baseline",
            str(_run_export(tmp_path / "self_forcing_anchor_free" / "export" / "model.pt"))]
    assert _script("world_drift").main(args) == 0
    entries = json.loads((tmp_path / "out" / "drift.json").read_text())
    arms = _script("world_drift").drift_arms(args[-3], args[-1])
    assert [e["arm"] for e in entries] == [a.name for a in arms] and len(arms) == 5
    assert all("inference.use_ema=true" in a.overrides for a in arms if a.checkpoint)     # the baselines' EMA
    free = set(arms[-1].overrides)                               # run as trained: L = 1, no anchor, ref in the cache
    assert {"cache.style_anchor=false", "cache.reference_in_temporal=true", "schedule.steps=[1000]"} <= free
    for e in entries:
        assert e["n_cases"] == 2 and e["ci_low"] <= e["drift"] <= e["ci_high"] and e["drifts"] == (e["ci_low"] > 0)
        assert len(e["csim_curve"]) == 3 and all(-1 <= v <= 1 for v in e["csim_curve"])   # 1.5 s: 15, 15, the rest
        assert e["csim_curve_seconds"] == 0.6
    assert (tmp_path / "out" / "drift_curve.png").stat().st_size > 0
    assert _script("world_drift").main(args[:-1] + [str(tmp_path / "missing.pt")]) == 1
    assert _script("world_drift").main(args[:-3] + [str(tmp_path / "missing.pt")] + args[-2:]) == 1
    assert _script("world_drift").main(args + ["--curve-seconds", "0"]) == 1
    assert _script("world_drift").main(args + ["--case-seed", "0"]) == 1            # the training world's seed


def test_rope_probe_shifts_the_cache_as_the_control_does(cases):
    """scripts/world_rope_probe.py: rotating already-rotated keys by a frame offset (h = w = 0 angles) equals
    rotating them at the shifted positions, as the wrong-RoPE control does; offset 0 changes nothing, and the
    probe leaves the model's attention as it was."""
    from avatarforcing import model as model_module
    from avatarforcing.attention import RotaryEmbedding, apply_rope
    rope, k = RotaryEmbedding(32), torch.randn(1, 2 * 4 * 4, 4, 32)
    pos = torch.tensor([0, 1])
    cos, sin = rope(torch.tensor([64]), 1, 1)
    twice = apply_rope(apply_rope(k, *rope(pos, 4, 4)), cos.expand(len(k[0]), -1), sin.expand(len(k[0]), -1))
    assert torch.allclose(twice, apply_rope(k, *rope(pos + 64, 4, 4)), atol=1e-5)

    attention, context, forward = model_module.attention, StreamCache.context, model_module.WanSelfAttention.forward
    r = _script("world_rope_probe").probe_student(str(DEMO), CKPT, cases[:1], [0, 64])
    assert (model_module.attention, StreamCache.context, model_module.WanSelfAttention.forward) == (
        attention, context, forward)
    zero, far = r["offsets"]["0"], r["offsets"]["64"]
    assert r["calls"] > 0 and zero["tv"] < 1e-5
    assert zero["cache_share_offset"] == pytest.approx(zero["cache_share"], abs=1e-5) and 0 < zero["cache_share"] < 1
    assert far["tv"] > 1e-3 and 0 < far["cache_share_offset"] < 1

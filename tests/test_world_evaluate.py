"""World evaluation: held-out cases, student / teacher rollouts, and the ablation script on a fake run."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from avatarforcing import AvatarForcingError
from avatarforcing.checkpoint import export_released
from avatarforcing.config import load_config
from avatarforcing.metrics import MetricNets
from avatarforcing.model import build_model
from avatarforcing.world.codec import WorldCodec
from avatarforcing.ablations import resolve_config, rollout_student, rollout_teacher, tile_videos
from avatarforcing.world.evaluate import (CODEC_HELD_OUT_WORLD_SEED, evaluate_run, evaluate_variant, held_out_cases,
                                          real_feature_stats, training_clip_seeds)
from avatarforcing.profiling import steady_state_seconds_per_frame

ROOT = Path(__file__).resolve().parent.parent
TINY = ["vae.kind=world"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs" / "tiny.yaml", TINY)


def test_held_out_cases_deterministic_and_disjoint():
    a, b = held_out_cases(3, 0.4), held_out_cases(3, 0.4)
    for x, y in zip(a, b):
        assert x.seed == y.seed
        assert np.array_equal(x.real_frames, y.real_frames) and np.array_equal(x.wav, y.wav)
        assert np.array_equal(x.reference, x.real_frames[0])
        assert x.real_frames.shape == (10, 64, 64, 3) and x.wav.dtype == np.float32
    seeds = {c.seed for c in a}
    assert len(seeds) == 3
    assert not seeds & training_clip_seeds(20_000)                       # world seed 0: every training stage
    assert not seeds & training_clip_seeds(64, CODEC_HELD_OUT_WORLD_SEED)  # the codec's held-out PSNR clips
    # the same clip whatever the length (the world is prefix-consistent up to its last frames)
    long = held_out_cases(1, 0.8)[0]
    assert long.seed == a[0].seed and np.array_equal(long.reference, a[0].reference)
    assert np.array_equal(long.wav[:len(a[0].wav)], a[0].wav)
    with pytest.raises(AvatarForcingError):
        held_out_cases(1, 1.0, seed=0)


def test_steady_state_drops_warmup_and_drain():
    recs = [{"step": s, "vae": 0.0, "total": s} for s in (9.0, 1.0, 1.0, 1.0, 5.0, 5.0)]
    spf, info = steady_state_seconds_per_frame(recs, frames_per_step=2, drain_steps=2, warmup=1)
    assert spf == pytest.approx(0.5) and info["steps_timed"] == 3
    spf, info = steady_state_seconds_per_frame(recs[:2], frames_per_step=2, drain_steps=3, warmup=1)
    assert spf == pytest.approx(0.5) and info["used"] == "all_emitting"


@pytest.mark.parametrize("seconds", [1.0, 1.52])
def test_student_rollout_matches_audio_length(cfg, seconds):
    case = held_out_cases(1, seconds)[0]
    timing = {}
    frames, spf = rollout_student(cfg, None, case, ["schedule.window_blocks=2", "schedule.steps=null"], timing=timing)
    assert frames.dtype == np.uint8 and frames.shape == case.real_frames.shape
    assert np.isfinite(spf) and spf > 0 and timing["L"] == 2 and timing["steps_timed"] >= 1
    nets = MetricNets.random()
    m = evaluate_variant(frames, case, nets, real_feature_stats([case], nets), tail_seconds=0.5, latency=spf)
    assert m["num_frames"] == len(frames) and m["latency_s_per_frame"] == spf
    assert {"csim_total", "csim_last", "delta_e_last", "adj_feat_last", "fid_total", "sync_conf_total"} <= set(m)


def test_teacher_rollout_whole_clip(cfg):
    case = held_out_cases(1, 1.0)[0]
    timing = {}
    frames, spf = rollout_teacher(cfg, None, case, steps=2, guidance=(1.0, 2.0), timing=timing)
    assert frames.shape == case.real_frames.shape and spf > 0
    assert timing["latent_frames"] == 1 + (25 - 1 + 3) // 4 and timing["cfg_passes"] == 3


def test_resolve_config_and_tiles(cfg):
    c = resolve_config(cfg, ["cache.rope_reindex=false", "schedule.steps=[1000]", "schedule.window_blocks=1"])
    assert c.cache.rope_reindex is False and list(c.schedule.steps) == [1000] and cfg.cache.rope_reindex is True
    with pytest.raises(AvatarForcingError):
        resolve_config(cfg, ["cache.no_such_key=1"])
    a = np.full((3, 4, 4, 3), 10, np.uint8)
    b = np.full((2, 4, 4, 3), 20, np.uint8)
    t = tile_videos([a, b], gap=2)
    assert t.shape == (3, 4, 10, 3) and t[2, 0, 6, 0] == 20 and t[0, 0, 4, 0] == 0


def _fake_run(run: Path, cfg) -> None:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sd = model.state_dict()
    for stage in ("teacher", "ode_student", "dmd"):
        export_released(sd, run / stage / "export" / "model.pt", ema_state=sd)
    WorldCodec(z_dim=16).save(run / "codec.pt")
    MetricNets.random(size=64).save(run / "metric_nets.pt")


def _script():
    spec = importlib.util.spec_from_file_location("world_ablations_under_test", ROOT / "scripts" / "world_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_run_as_the_pipeline_calls_it(tmp_path, cfg):
    """avatarforcing/world/pipeline.py's evaluate stage: a loaded config, Path checkpoints, output = first argument."""
    from avatarforcing.config import apply_overrides
    from avatarforcing.world.evaluate import load_metric_nets

    run = tmp_path / "run"
    _fake_run(run, cfg)
    stage_cfg = apply_overrides(cfg, [f"vae.path={run / 'codec.pt'}"])
    cases = held_out_cases(1, 1.2)
    variants = {"Teacher": ("teacher", run / "teacher" / "export" / "model.pt", []),
                "AvatarForcing (DMD)": ("student", run / "dmd" / "export" / "model.pt", [])}
    rows = evaluate_run(run / "eval", stage_cfg, variants, cases, load_metric_nets(run / "metric_nets.pt"),
                        teacher_steps=2, log_fn=None)
    assert [r["variant"] for r in rows] == list(variants) and all(r["cases"] == 1 for r in rows)
    assert all(np.isfinite(r["csim_last"]) and r["latency_s_per_frame"] > 0 for r in rows)
    md = (run / "eval" / "table.md").read_text()
    assert "AvatarForcing (DMD)" in md and "CSIM" in md
    assert (run / "eval" / "table.csv").is_file() and (run / "eval" / "samples" / "table_side_by_side.mp4").is_file()
    json.dumps(rows)


def test_world_ablations_script_on_fake_run(tmp_path, cfg):
    from avatarforcing.media import probe_video

    run, out = tmp_path / "run", tmp_path / "results"
    _fake_run(run, cfg)
    script = _script()
    argv = ["--run", str(run), "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), "--tables", "3,4,5",
            "--cases", "1", "--seconds", "2", "--fast", "--teacher-steps", "2"]
    assert script.main(argv) == 0
    for t in (3, 4, 5):
        assert (out / f"table{t}.csv").is_file() and (out / f"table{t}.md").is_file()
        assert (out / f"table{t}_per_case.csv").is_file()
        video = out / "samples" / f"table{t}_side_by_side.mp4"
        info = probe_video(video)
        n_tiles = {3: 6, 4: 5, 5: 3}[t] + 1
        assert info["width"] == 64 * n_tiles + 2 * (n_tiles - 1) and info["height"] == 64
    assert (out / "fig4_latency.png").is_file() and (out / "fig5_stability.png").is_file()
    md = (out / "tables.md").read_text()
    assert "Table 4" in md and "Table 5" in md and "B_{4,1}-trained" in md and "Paper claims" in md
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tables"]) == {"3", "4", "5"}
    names = [r["variant"] for r in summary["tables"]["4"]["rows"]]
    assert names == ["Teacher", "Student", "AvatarForcing", "w/o style anchor", "w/o temporal anchor"]
    verdicts = {c["claim"]: c["verdict"] for c in summary["claims"]}
    assert len(verdicts) >= 6 and set(verdicts.values()) <= {"holds", "does not hold", "inconclusive", "not evaluated"}
    assert all(r["latency_s_per_frame"] > 0 for t in ("3", "4", "5") for r in summary["tables"][t]["rows"])
    # Table 6 without trained baselines falls back to the L = 1 students and says so; missing files are errors
    argv6 = argv[:7] + ["6"] + argv[8:] + ["--reuse", "--no-videos"]
    assert script.main(argv6) == 0
    md = (out / "tables.md").read_text()
    assert "no trained Self-Forcing baseline" in md and "Table 6" in md and "Table 4" in md   # 3-5 reused
    assert set(json.loads((out / "summary.json").read_text())["tables"]) == {"3", "4", "5", "6"}
    (run / "dmd" / "export" / "model.pt").unlink()
    assert script.main(argv) == 1

"""The one-command world pipeline: a few steps of every stage, resumable."""
import json

import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.config import load_config
from avatarforcing.world.pipeline import (ANCHOR_FREE_STAGES, BASELINE_STAGES, COMPARISON_STAGES, STAGES, grid_cells,
                                          grid_stages, run_pipeline)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("world_fast")
    cfg = load_config("configs/world/fast.yaml", [f"world.run={run}"])
    messages = []
    state = run_pipeline(cfg, progress=messages.append)
    return run, cfg, state, messages


def test_every_stage_runs_and_exports(fast_run):
    run, cfg, state, messages = fast_run
    grid = ("ode_2x2", "dmd_2x2", "backfill_ln2", "ode_1x2", "dmd_1x2")         # fast.yaml: world.grid=[2x2, 1x2]
    every = STAGES + BASELINE_STAGES + ANCHOR_FREE_STAGES + COMPARISON_STAGES + grid
    assert [s for s in every if state.get(s, {}).get("done")] == list(every)
    for stage in ("teacher", "ode_student", "dmd", "causal_ode", "self_forcing", "dmd_window", "ode_2x2", "dmd_2x2",
                  "ode_1x2", "dmd_1x2", *ANCHOR_FREE_STAGES):
        assert (run / stage / "export" / "model.pt").is_file()
    assert (run / "codec.pt").is_file() and (run / "metric_nets.pt").is_file()
    assert json.loads((run / "state.json").read_text())["dmd"]["done"] is True
    assert state["codec"]["result"]["psnr"] > 10
    from omegaconf import OmegaConf
    cell = OmegaConf.load(run / "dmd_2x2" / "config.yaml")                    # Table 3's cell, its own schedule
    assert (cell.schedule.window_blocks, cell.schedule.passes, cell.dmd.generator) == (
        2, 2, str(run / "ode_2x2" / "export" / "model.pt"))
    assert OmegaConf.load(run / "ode_2x2" / "config.yaml").schedule.passes == 2
    assert cell.data.ode == str(run / "ode")                                  # L*N = 4: the world's levels
    # B_{1,2}: another budget, so 2 evenly spaced levels from its own backfill (run/ode_ln2), as the inference-only
    # Table 3 cell B_{1,2} runs
    for stage in ("ode_1x2", "dmd_1x2"):
        c = OmegaConf.load(run / stage / "config.yaml")
        assert (c.schedule.window_blocks, c.schedule.passes, c.schedule.steps, c.schedule.warp, c.data.ode) == (
            1, 2, None, True, str(run / "ode_ln2"))
    from avatarforcing.schedule import WindowSchedule
    from avatarforcing.train.data import list_samples, read_sample
    stored = read_sample(list_samples(run / "ode_ln2")[0], ["timesteps"])["timesteps"].tolist()
    assert len(stored) == 2 and stored == pytest.approx(WindowSchedule.from_config(c.schedule).timesteps, abs=1e-4)
    grad_blocks = {s: OmegaConf.load(run / s / "config.yaml").dmd.grad_blocks for s in ("dmd", "dmd_window")}
    assert grad_blocks == {"dmd": "emitted", "dmd_window": "window"}
    # the anchor-free baselines: L = 1 on the causal store, neither anchor, the reference as first temporal frame
    for stage, anchored in (("causal_ode", True), ("self_forcing", True), ("causal_ode_anchor_free", False),
                            ("self_forcing_anchor_free", False)):
        c = OmegaConf.load(run / stage / "config.yaml")
        assert (c.schedule.steps, c.data.ode, c.cache.style_anchor, c.cache.reference_in_temporal) == (
            [1000], str(run / "ode_causal"), anchored, not anchored), stage
    assert OmegaConf.load(run / "self_forcing_anchor_free" / "config.yaml").dmd.generator == str(
        run / "causal_ode_anchor_free" / "export" / "model.pt")


def test_second_call_resumes_without_redoing_work(fast_run):
    run, cfg, state, _ = fast_run
    messages = []
    again = run_pipeline(cfg, progress=messages.append)
    assert all("skipped" in m for m in messages if m.startswith("[world] ") and "all stages" not in m)
    assert again == state


def test_unknown_stage_is_an_error(fast_run):
    _, cfg, _, _ = fast_run
    with pytest.raises(AvatarForcingError, match="unknown stage"):
        run_pipeline(cfg, ["teachr"])


def test_world_v2_runs_every_stage(tmp_path):
    """World v2 (espeak-ng speech, viseme mouths, 4x4 patches) through every stage, its own metric backend."""
    from avatarforcing.world.speech_tts import espeak_available
    if not espeak_available():
        pytest.skip("espeak-ng not installed (apt-get install -y espeak-ng; .ci/run does)")
    cfg = load_config("configs/world/fast.yaml", [f"world.run={tmp_path}", "world.version=2", "world.baselines=false",
                                                  "world.grid=[]",
                                                  "model.patch_size=[1,4,4]", "world.size=32", "data.height=32",
                                                  "data.width=32", "inference.height=32", "inference.width=32",
                                                  "world.metric_size=32"])
    state = run_pipeline(cfg, progress=lambda *_: None)
    assert [s for s in STAGES if state.get(s, {}).get("done")] == list(STAGES)
    clip = json.loads((tmp_path / "data" / "clip_00000.json").read_text())
    assert clip["version"] == 2 and clip["size"] == 32 and clip["phonemes"]
    from avatarforcing.metrics import MetricNets
    assert MetricNets.load(tmp_path / "metric_nets.pt").backend == "world_v2"
    assert state["evaluate"]["result"]["rows"]


def test_grid_cells_are_checked_before_training():
    cfg = load_config("configs/world/fast.yaml", ["world.grid=[4x1,2x2,1x4]"])
    assert grid_cells(cfg) == [(4, 1), (2, 2), (1, 4)]
    for bad in ("[2by2]", "[1x0]", "[2x]"):
        with pytest.raises(AvatarForcingError, match=r"world.grid cell .*: write LxN with L, N >= 1, .*world.grid=\[2x2,1x4\]"):
            grid_cells(load_config("configs/world/fast.yaml", [f"world.grid={bad}"]))
    # a cell of another budget than the world's 4 levels gets its own backfill, once per budget, before its first cell
    assert grid_stages([(2, 2), (2, 1), (1, 2), (1, 4)], 4) == (
        "ode_2x2", "dmd_2x2", "backfill_ln2", "ode_2x1", "dmd_2x1", "ode_1x2", "dmd_1x2", "ode_1x4", "dmd_1x4")


def test_codec_from_copies_a_trained_codec(fast_run, tmp_path):
    """world.codec_from: the codec stage stops on a wall clock, so rebuilding a shipped run starts from its codec."""
    run, _, _, _ = fast_run
    cfg = load_config("configs/world/fast.yaml", [f"world.run={tmp_path / 'again'}", f"world.codec_from={run / 'codec.pt'}"])
    state = run_pipeline(cfg, ["codec"], progress=lambda *_: None)
    assert (tmp_path / "again" / "codec.pt").read_bytes() == (run / "codec.pt").read_bytes()
    assert state["codec"]["result"] == {"copied_from": str(run / "codec.pt")}
    (tmp_path / "notes.txt").write_text("not a codec")
    for source, extra, message in ((tmp_path / "missing.pt", [], "not found"),
                                   (tmp_path / "notes.txt", [], "cannot read world codec file"),
                                   (run / "codec.pt", ["vae.z_dim=8"], "latent channels but vae.z_dim=8")):
        bad = load_config("configs/world/fast.yaml", [f"world.run={tmp_path / 'bad'}", f"world.codec_from={source}",
                                                      *extra])
        with pytest.raises(AvatarForcingError, match=message):
            run_pipeline(bad, ["codec"], progress=lambda *_: None)
        assert not (tmp_path / "bad" / "codec.pt").exists()


def test_scale_bench_variants_are_the_configs_they_name():
    """scripts/bench_world_scale.py times the world pipeline at 128x128: each variant must load (with every stage's
    overrides) and build the DiT its name describes, or the bench would time something else."""
    import importlib.util
    import re
    from pathlib import Path
    from avatarforcing.model import build_model
    from avatarforcing.train.synthetic import clip_shape
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("bench_world_scale", root / "scripts" / "bench_world_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert not list(bench.VARIANTS.values())[0]                  # the first one is the trained world, as it is
    for name, overrides in bench.VARIANTS.items():
        size, ch, patch, dim, tokens = map(int, re.match(
            r"(\d+)x\d+, (\d+) ch, (\d)x\d patches, dim (\d+)(?: \((\d+) tokens/frame\))?", name).groups(
            default="16"))
        for stage in bench.STAGES:
            cfg = load_config(str(root / bench.CONFIG), overrides + bench.stage_overrides(stage))
            assert clip_shape(cfg) == (ch, 21, size // 8, size // 8)
        model = build_model(cfg.model)
        assert model.patch_embedding.in_channels == 2 * ch + 1 and model.head.head.out_features == ch * patch ** 2
        assert model.patch_embedding.out_channels == dim and (size // 8 // patch) ** 2 == tokens
    assert bench.pipeline_steps("teacher") == 1500 and bench.pipeline_steps("dmd") == 200

"""The one-command world pipeline: a few steps of every stage, resumable."""
import json

import pytest

from avatarforcing import AvatarForcingError
from avatarforcing.config import load_config
from avatarforcing.world.pipeline import BASELINE_STAGES, STAGES, run_pipeline


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("world_fast")
    cfg = load_config("configs/world/fast.yaml", [f"world.run={run}"])
    messages = []
    state = run_pipeline(cfg, progress=messages.append)
    return run, cfg, state, messages


def test_every_stage_runs_and_exports(fast_run):
    run, cfg, state, messages = fast_run
    every = STAGES + BASELINE_STAGES
    assert [s for s in every if state.get(s, {}).get("done")] == list(every)
    for stage in ("teacher", "ode_student", "dmd", "causal_ode", "self_forcing"):
        assert (run / stage / "export" / "model.pt").is_file()
    assert (run / "codec.pt").is_file() and (run / "metric_nets.pt").is_file()
    assert json.loads((run / "state.json").read_text())["dmd"]["done"] is True
    assert state["codec"]["result"]["psnr"] > 10


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

"""Two processes (torchrun, gloo on CPU): data parallel DMD and FSDP2 DMD with kill-free stop/resume.

On CPU, ``accelerate launch --num_processes 2 --cpu`` starts a single process (accelerate expects mpirun for
multi-CPU), so the test uses torchrun, which accelerate's Accelerator picks up (MULTI_CPU, gloo).  One launch
runs four trainings in the same two processes to keep the test short."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from avatarforcing.config import load_config
from avatarforcing.train.synthetic import random_dit, write_checkpoint, write_clip_samples
from avatarforcing.train.checkpointing import complete_checkpoints

DRIVER = """
import sys
from avatarforcing.config import load_config
from avatarforcing.train.dmd import DMDStage
from avatarforcing.train.loop import run_stage
root = sys.argv[1]
def cfg(out, *extra):
    return load_config("configs/train_dmd_tiny.yaml", [f"dmd.data={root}/shards", f"dmd.teacher={root}/teacher.pt",
        f"train.output_dir={root}/{out}", "train.steps=3", "train.save_every=0", "train.progress=false",
        "dmd.critic_updates=1", *extra])
run_stage(DMDStage, cfg("ddp", "train.trace=true"))
fsdp = ["train.fsdp=true", "model.gradient_checkpointing=true"]
run_stage(DMDStage, cfg("fsdp_a", *fsdp))
run_stage(DMDStage, cfg("fsdp_b", *fsdp, "train.stop_after=2"))
run_stage(DMDStage, cfg("fsdp_b", *fsdp))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    cfg = load_config("configs/train_dmd_tiny.yaml", [f"data.shards={root / 'shards'}"])
    write_clip_samples(cfg, root / "shards", 4)
    write_checkpoint(random_dit(cfg, 2, head_std=0.05), root / "teacher.pt")
    (root / "driver.py").write_text(textwrap.dedent(DRIVER))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(root / "driver.py"), str(root)], capture_output=True, text=True, timeout=400, env=env, cwd=repo)
    assert r.returncode == 0, r.stderr[-4000:]
    return root


def metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_two_processes_agree_on_windows_and_parameters(runs):
    out = runs / "ddp"
    traces = [[json.loads(line) for line in open(out / f"trace_rank{k}.jsonl")] for k in (0, 1)]
    assert len(traces[0]) == len(traces[1]) == 3
    for a, b in zip(*traces):
        assert a["step"] == b["step"] and a["backprop_steps"] == b["backprop_steps"]   # same gradient windows
        assert a["generator"] == b["generator"] and a["critic"] == b["critic"]         # same parameters
        assert a["gen_loss"] != b["gen_loss"]                                          # on different data
    assert complete_checkpoints(out / "checkpoints")[-1].name == "step_00000003"
    state = torch.load(complete_checkpoints(out / "checkpoints")[-1] / "state.pt", weights_only=False)
    assert state["world"] == 2 and state["data"]["data"]["position"] == 3 * 2         # 2 micro-batches per step


def test_fsdp_matches_data_parallel_and_resumes_bit_exact(runs):
    ddp, fa = metrics(runs / "ddp"), metrics(runs / "fsdp_a")
    for a, b in zip(ddp, fa):                      # same losses (the FSDP rollout's prompt K/V get no gradient,
        for k in ("critic_loss", "gen_loss"):      # so the generators drift apart slowly)
            assert a[k] == pytest.approx(b[k], rel=2e-3), (a["step"], k)
    sa = torch.load(complete_checkpoints(runs / "fsdp_a" / "checkpoints")[-1] / "state.pt", weights_only=False)
    sb = torch.load(complete_checkpoints(runs / "fsdp_b" / "checkpoints")[-1] / "state.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 3 and sb["fsdp"]
    for role in ("generator", "critic"):
        for k, v in sa["models"][role].items():
            assert torch.equal(v, sb["models"][role][k]), (role, k)
    for k, v in sa["ema"]["generator"].items():
        assert torch.equal(v, sb["ema"]["generator"][k])
    assert (runs / "fsdp_b" / "export" / "model.pt").is_file()

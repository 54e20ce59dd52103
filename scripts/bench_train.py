"""Training benchmark: step time and peak memory per stage of the tiny CPU configs, and the analytic
per-GPU memory of the 1.3B DMD stage (one GPU, FSDP over 8).  Writes JSON and prints a summary.

    python scripts/bench_train.py --out results/bench_train.json [--steps 5] [--threads 1]

Each stage runs in its own process on synthetic samples (avatarforcing/train/synthetic.py), so the peak
resident memory (ru_maxrss) is per stage; the baseline (imports, before the stage is built) is reported too.
"""
import argparse
import json
import multiprocessing as mp
import queue
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = {"teacher": "configs/train_teacher_tiny.yaml", "ode": "configs/train_ode_tiny.yaml",
           "dmd": "configs/train_dmd_tiny.yaml"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_stage(stage: str, config: str, overrides: list, steps: int, warmup: int, threads: int, queue) -> None:
    """Time ``steps`` training steps (after ``warmup``) of ``stage`` ("teacher" | "ode" | "dmd") of ``config`` +
    ``overrides`` on synthetic samples, with a random teacher; put the figures on ``queue``.  Run it in a fresh
    process (:func:`run_stage`) so that the peak RSS is the stage's own."""
    import torch
    torch.set_num_threads(threads)
    from avatarforcing.config import load_config
    from avatarforcing.train.dmd import DMDStage
    from avatarforcing.train.ode import ODEStage, backfill
    from avatarforcing.train.synthetic import random_dit, write_checkpoint, write_clip_samples
    from avatarforcing.train.teacher import TeacherStage
    from avatarforcing.train.loop import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        over = [f"data.shards={tmp / 'shards'}", f"data.ode={tmp / 'ode'}", f"ode.teacher={tmp / 'teacher.pt'}",
                f"dmd.teacher={tmp / 'teacher.pt'}", f"train.output_dir={tmp / 'run'}", "train.progress=false"]
        cfg = load_config(str(ROOT / config), list(overrides) + over)
        write_clip_samples(cfg, tmp / "shards", 4)
        write_checkpoint(random_dit(cfg, 0), tmp / "teacher.pt")
        extra = {}
        if stage in ("ode", "dmd"):
            t0 = time.perf_counter()
            backfill(cfg, progress=False)
            extra["backfill_s_per_sample"] = (time.perf_counter() - t0) / 4
            extra["backfill_teacher_steps"] = int(cfg.ode.teacher_steps)
        base = _rss_mb()
        tr = Trainer(cfg, stage)
        st = {"teacher": TeacherStage, "ode": ODEStage, "dmd": DMDStage}[stage](cfg, tr)
        times = []
        for step in range(1, warmup + steps + 1):
            t0 = time.perf_counter()
            st.train_step(step)
            if step > warmup:
                times.append(time.perf_counter() - t0)
        queue.put({"stage": stage, "config": config, "threads": threads, "steps": steps,
                   "step_s_median": statistics.median(times), "step_s_min": min(times),
                   "peak_rss_mb": _rss_mb(), "baseline_rss_mb": base,
                   "batch_size": int(cfg.train.batch_size), "latent": [int(cfg.vae.z_dim), 1 + int(cfg.data.clip_blocks) * int(cfg.schedule.block_frames),
                                                                        int(cfg.data.height) // 8, int(cfg.data.width) // 8],
                   **({"critic_updates": int(cfg.dmd.critic_updates)} if stage == "dmd" else {}), **extra})


def run_stage(stage: str, config: str, overrides: list, steps: int, warmup: int, threads: int) -> dict:
    """:func:`bench_stage` in a spawned process; its figures."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=bench_stage, args=(stage, config, list(overrides), steps, warmup, threads, q))
    p.start()
    while True:                                       # a stage that dies (e.g. out of memory) must not hang the bench
        try:
            res = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise SystemExit(f"error: the {stage} stage of {config} exited with code {p.exitcode} before "
                                 "reporting; its traceback is above")
    p.join()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench_train.json")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per stage process")
    ap.add_argument("--stages", default="teacher,ode,dmd")
    args = ap.parse_args(argv)
    from avatarforcing.model import PRESETS
    from avatarforcing.train.memory import dmd_memory

    results = {"cpu_stages": [], "dmd_1.3b_memory": {}}
    for stage in args.stages.split(","):
        results["cpu_stages"].append(run_stage(stage, CONFIGS[stage], [], args.steps, args.warmup, args.threads))
    cfg = PRESETS["wan2.1-1.3b"]
    results["dmd_1.3b_memory"]["1_gpu"] = dmd_memory(cfg, world=1, fsdp=False)
    results["dmd_1.3b_memory"]["fsdp_8_gpus"] = dmd_memory(cfg, world=8, fsdp=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))

    print(f"tiny CPU stages ({args.threads} thread(s), median of {args.steps} steps):")
    for r in results["cpu_stages"]:
        bf = f", backfill {r['backfill_s_per_sample'] * 1000:.0f} ms/sample" if "backfill_s_per_sample" in r else ""
        print(f"  {r['stage']:8s} {r['step_s_median'] * 1000:8.1f} ms/step  peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(baseline {r['baseline_rss_mb']:.0f} MB){bf}")
    print("DMD stage, Wan2.1-1.3B, 480x832, B=4, L=4, clip 21 latent frames, bf16 + checkpointing (GiB per GPU):")
    for name, m in results["dmd_1.3b_memory"].items():
        parts = ", ".join(f"{k} {m[k]:.1f}" for k in ("generator_states", "critic_states", "generator_ema", "teacher_bf16",
                                                      "fsdp_working_set", "activations_peak", "kv_cache"))
        print(f"  {name:12s} total {m['total']:.1f}  ({parts})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

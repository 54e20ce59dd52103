"""What a 128x128 world would cost: the world pipeline's DiT stages timed at 64x64 and at 128x128, extrapolated to
the pipeline's step counts on this machine.  Writes JSON and prints a table.

    python scripts/bench_world_scale.py --out results/bench_world_scale.json [--threads 2] [--steps 3]

Each variant is configs/world/pipeline.yaml (world v1, the default demo's world) with the overrides below; each of
its training stages (teacher, ODE regression, DMD, with the pipeline's own stage overrides) runs ``--steps`` steps
on synthetic samples of its latent shape in a fresh process (scripts/bench_train.py), and the teacher ODE backfill
is timed per clip.  Predicted minutes = step time x the pipeline's steps (+ backfill x ``--backfill-clips``).

The 64x64 variant is the one that was trained: its prediction is checked against the measured stage times of two
pipeline runs of it (MEASURED: the demo's, and world v1 attention-only's, which differs only in model.in_dim).  The 128x128 variants use the codec that
reaches >= 33 dB there (48 latent channels at 8x; docs/world.md), so the DiT either keeps v1's 16 tokens per latent
frame with 4x4 patches (768 numbers per token from its hidden state) or keeps 2x2 patches (64 tokens per frame), or
widens its hidden state to 768.  Data, codec, shards and metric-net stages are left out: at 128x128 they only add.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import run_stage  # noqa: E402

CONFIG = "configs/world/pipeline.yaml"
MEASURED = {"demo run (results/world/pipeline_state_run2.json)": "results/world/pipeline_state_run2.json",
            "attention-only run (results/world_anchor/pipeline_state.json)": "results/world_anchor/pipeline_state.json"}
DIT_STAGES = ("teacher", "backfill", "ode", "dmd")
SIZE_128 = ["data.height=128", "data.width=128", "inference.height=128", "inference.width=128",
            "world.size=128", "vae.z_dim=48", "model.in_dim=97", "model.out_dim=48"]   # 48 noisy + 48 reference + mask
VARIANTS = {
    "64x64, 16 ch, 2x2 patches, dim 128 (world v1, trained)": [],
    "128x128, 48 ch, 4x4 patches, dim 128 (16 tokens/frame)": SIZE_128 + ["model.patch_size=[1,4,4]"],
    "128x128, 48 ch, 2x2 patches, dim 128 (64 tokens/frame)": SIZE_128,
    "128x128, 48 ch, 4x4 patches, dim 768 (16 tokens/frame)": SIZE_128 + [
        "model.patch_size=[1,4,4]", "model.dim=768", "model.ffn_dim=2304", "model.num_heads=12"],
}
STAGES = {"teacher": ["teacher_overrides"], "ode": ["backfill_overrides", "ode_overrides"], "dmd": ["dmd_overrides"]}
BUDGET_MIN = 60.0


def stage_overrides(stage: str) -> list[str]:
    """The world pipeline's overrides of ``stage`` (the ODE stage's include the backfill's: it times both)."""
    from avatarforcing.config import load_config
    cfg = load_config(str(ROOT / CONFIG))
    return [o for key in STAGES[stage] for o in cfg.world[key]]


def pipeline_steps(stage: str) -> int:
    from avatarforcing.config import load_config
    return int(load_config(str(ROOT / CONFIG), stage_overrides(stage)).train.steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench_world_scale.json")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per stage (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the pipeline uses 2 cores)")
    ap.add_argument("--backfill-clips", type=int, default=96, help="clips the backfill stage runs the teacher on "
                    "(world v1: 48 videos x 2 clips)")
    ap.add_argument("--variants", default=None, help="comma-separated indices into the variant list (default: all)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.threads < 1 or args.backfill_clips < 1:
        print("error: --steps, --threads and --backfill-clips must be >= 1", file=sys.stderr)
        return 1
    names = list(VARIANTS)
    if args.variants:
        try:
            names = [names[int(i)] for i in args.variants.split(",")]
        except (ValueError, IndexError):
            print(f"error: --variants takes indices 0-{len(VARIANTS) - 1}, comma-separated; got '{args.variants}'",
                  file=sys.stderr)
            return 1

    measured = {name: json.loads((ROOT / path).read_text()) for name, path in MEASURED.items()}
    results = {"config": CONFIG, "threads": args.threads, "steps_timed": args.steps,
               "backfill_clips": args.backfill_clips, "budget_min": BUDGET_MIN, "variants": []}
    for name in names:
        row = {"variant": name, "overrides": VARIANTS[name], "stages": {}}
        for stage in STAGES:
            r = run_stage(stage, CONFIG, VARIANTS[name] + stage_overrides(stage), args.steps, 1, args.threads)
            steps = pipeline_steps(stage)
            row["stages"][stage] = {"step_s": r["step_s_median"], "pipeline_steps": steps,
                                    "predicted_min": r["step_s_median"] * steps / 60, "peak_rss_mb": r["peak_rss_mb"],
                                    "latent": r["latent"]}
            if stage == "ode":                       # the backfill stage runs the teacher's ODE on every clip
                row["stages"]["backfill"] = {"s_per_clip": r["backfill_s_per_sample"], "clips": args.backfill_clips,
                                             "predicted_min": r["backfill_s_per_sample"] * args.backfill_clips / 60}
            print(f"  {name}: {stage} {r['step_s_median']:.3f} s/step x {steps} = "
                  f"{row['stages'][stage]['predicted_min']:.1f} min", flush=True)
        row["predicted_dit_stages_min"] = sum(s["predicted_min"] for s in row["stages"].values())
        if not VARIANTS[name]:                       # the trained variant: prediction against the measured run
            row["measured_min"] = {run: {s: state[s]["seconds"] / 60 for s in DIT_STAGES}
                                   for run, state in measured.items()}
        results["variants"].append(row)

    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nDiT stages of the world pipeline ({args.threads} threads, median of {args.steps} steps), minutes:")
    print(f"{'variant':58s} {'teacher':>8s} {'backfill':>8s} {'ODE':>6s} {'DMD':>7s} {'total':>7s}")
    for row in results["variants"]:
        st = row["stages"]
        print(f"{row['variant']:58s} {st['teacher']['predicted_min']:8.1f} {st['backfill']['predicted_min']:8.1f} "
              f"{st['ode']['predicted_min']:6.1f} {st['dmd']['predicted_min']:7.1f} "
              f"{row['predicted_dit_stages_min']:7.1f}")
        for run, m in row.get("measured_min", {}).items():
            print(f"{'  measured, ' + run.split(' (')[0]:58s} " + " ".join(
                f"{m[s]:{w}.1f}" for s, w in zip(DIT_STAGES, (8, 8, 6, 7))) + f" {sum(m.values()):7.1f}")
    print(f"budget of the whole pipeline: {BUDGET_MIN:.0f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

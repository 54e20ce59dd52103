"""The paper's claims that the shipped student alone can test, with paired-bootstrap verdicts.

    python scripts/world_claims.py [--config configs/demo.yaml] [--checkpoint PATH] [--run runs/controls]
        [--out results/world] [--cases 10] [--seconds 20] [--seed 0] [--case-seed 10000] [--resamples 10000]
        [--metric-nets PATH] [--dmd-window PATH] [--grid-run RUN]

One model, at inference: the shipped B_{4,1}-trained DMD student (assets/demo/model.pt).  Every ablated arm is
that same student run with a cache switch or another window schedule, with the overrides of
scripts/world_ablations.py's variants (Tables 3, 4, 5): nothing is retrained per arm, so the L x N claims measure
how inference compute is allocated with a student trained for B_{4,1}, not the paper's per-cell training.
Claims that need other models (teacher, ODE-only student, trained causal baselines) are out of scope here:
scripts/world_ablations.py evaluates them on a full world run.

Each claim names, before the run, the one metric it is judged on (CLAIMS); the paired bootstrap over --cases
held-out identities gives the effect (> 0 = the claimed winner is better) and its 95 % CI; the verdict is holds
(CI above 0), does not hold (CI below 0) or inconclusive (CI contains 0).  The bench, the cache and the metric nets
are those of scripts/world_controls.py (same --run: the clean arm is computed once for both).

With --grid-run (a world run whose pipeline trained Table 3's cells, world.grid=[2x2,1x4,2x1,1x2]) the matched-L·N
claims are also judged with every cell trained for its own schedule (grid_claims), as the paper trains them: each
L·N = 4 cell against the run's own main student (RUN/dmd, B_{4,1}), B_{2,1} against B_{1,2}, so every model compared
comes from one teacher.

With --dmd-window (the world pipeline's RUN/dmd_window/export/model.pt: the same DMD stage with the loss on every
block of the chosen window, dmd.grad_blocks=window) one more claim compares the two trained students: that DMD
gradient on every window position beats DMD on the emitted block only (WINDOW_CLAIM).

Writes to --out: claims.json (one entry per claim: claim, verdict, effect, ci_low, ci_high, n_cases, ...),
claims_per_case.csv and claims.md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.world.bench import Arm, comparison_entry, mean_pixel_change  # noqa: E402
from avatarforcing.world.layout import MODEL_DIRS, RunLayout  # noqa: E402
from avatarforcing.world.pipeline import GRID_CELL, cell_overrides  # noqa: E402
from avatarforcing.ablations import grid_name, table_variants  # noqa: E402
from avatarforcing.schedule import WindowSchedule  # noqa: E402
from world_controls import cli, describe, open_from_args, report, require_trained, write_results  # noqa: E402

GRID = ((1, 2, 4), (1, 2, 4))
FULL = "AvatarForcing"      # the shipped student as shipped (scripts/world_ablations.py's Table 4 name)
STABLE = ("adj_feat_last: the paper's stability claims are about flicker late in the rollout (Adj-LPIPS, Last); "
          "this world's analogue is the identity net's adjacent-frame feature distance over the final 10 s")
# (claim, claimed winner, other arm, metric, why this metric); arm names are scripts/world_ablations.py's variants
CLAIMS = (
    ("The style anchor preserves identity (w/o it, identity drifts)", FULL, "w/o style anchor",
     "csim_last", "the style anchor is the identity reference: its claimed role is identity over long rollouts, "
     "so CSIM over the final 10 s"),
    ("The temporal anchor keeps frames coherent (w/o it, more flicker)", FULL, "w/o temporal anchor",
     "adj_feat_last", STABLE),
    ("Anchor-audio zero padding helps lip sync", "Full", "w/o anchor-audio zero padding", "sync_conf_total",
     "without zero padding the anchor carries the window's audio; the claimed harm is to the audio-mouth "
     "alignment, so Sync-C over the whole rollout"),
    ("RoPE re-indexing prevents late identity drift", "Full", "w/o RoPE re-indexing", "csim_last",
     "without re-indexing the anchor's relative position grows with the stream; the claimed harm is that the "
     "anchor loses its hold late in the rollout, so CSIM over the final 10 s"),
    ("A larger window is more stable: B_{4,1} beats B_{1,1}", grid_name(4, 1), grid_name(1, 1), "adj_feat_last",
     STABLE),
    ("A larger window is more stable: B_{4,1} beats B_{2,1}", grid_name(4, 1), grid_name(2, 1), "adj_feat_last",
     STABLE),
    ("Look-ahead beats passes at matched L·N = 4: B_{4,1} beats B_{2,2}", grid_name(4, 1), grid_name(2, 2),
     "adj_feat_last", STABLE),
    ("Look-ahead beats passes at matched L·N = 4: B_{4,1} beats B_{1,4}", grid_name(4, 1), grid_name(1, 4),
     "adj_feat_last", STABLE),
)


WINDOW = "DMD loss on every window block"
# the paper: DMD "adapts the denoiser to heterogeneous-noise windows"; its claimed payoff is the quality of what is
# emitted, so the identity-feature FID over the whole rollout (fixed before the run)
WINDOW_CLAIM = ("DMD gradient on every window block beats the emitted block only (dmd.grad_blocks window vs emitted)",
                WINDOW, FULL, "fid_total", "the window loss trains the denoiser at every noise level of the window, "
                "which the paper credits for the quality of the emitted frames: FID over the whole rollout")


def grid_claims(grid_run) -> tuple[dict[str, Arm], tuple]:
    """Table 3 with each cell trained (the world pipeline's world.grid: RUN/dmd_LxN/export/model.pt).  A cell of the
    run's own budget (L·N = its noise levels) is compared with the run's main student (RUN/dmd, B_{L,N} of the run's
    schedule: the shipped B_{4,1}'s recipe); the cells of another budget (e.g. B_{2,1}, B_{1,2}, trained on their own
    evenly spaced levels) with each other.  All come from one teacher, and each runs the schedule it was trained for,
    with its EMA weights.  The larger window is the claimed winner."""
    from omegaconf import OmegaConf
    run = RunLayout(grid_run)
    if not run.export("dmd").is_file() or not (run.stage_dir("dmd") / "config.yaml").is_file():
        raise AvatarForcingError(f"--grid-run {grid_run} has no main DMD student (dmd/export/model.pt); the trained "
                                 "cells are compared with the B_{4,1} of their own run: run its pipeline's dmd stage")
    sched = WindowSchedule.from_config(OmegaConf.load(run.stage_dir("dmd") / "config.yaml").schedule)
    main_cell, levels = (sched.L, sched.N), len(sched.timesteps)
    main = f"{grid_name(*main_cell)} trained"
    arms = {main: Arm.trained(main, run.export("dmd"), cell_overrides(*main_cell))}
    cells = {main_cell: main}
    for path in sorted(run.dir.glob("dmd_*x*/export/model.pt")):
        cell = GRID_CELL.match(path.parent.parent.name[len("dmd_"):])
        if cell is None or (int(cell[1]), int(cell[2])) == main_cell:
            continue
        L, N = int(cell[1]), int(cell[2])
        cells[(L, N)] = name = f"{grid_name(L, N)} trained"
        arms[name] = Arm.trained(name, path, cell_overrides(L, N, levels))
    claims = [(f"Look-ahead beats passes at matched L·N = {L * N}, each cell trained: "
               f"{big.removesuffix(' trained')} beats {small.removesuffix(' trained')}", big, small,
               "adj_feat_last", STABLE)
              for (L, N), big in cells.items() for (l, n), small in cells.items()
              if L * N == l * n and L > l and (L * N != levels or main in (big, small))]
    if not claims:
        raise AvatarForcingError(f"--grid-run {grid_run} has no trained Table 3 cell to compare (dmd_LxN/export/"
                                 "model.pt); train them with the world pipeline (world.grid=[2x2,1x4] or [2x1,1x2]) "
                                 "or leave --grid-run out")
    return {n: a for n, a in arms.items() if any(n in c[1:3] for c in claims)}, tuple(claims)


def claim_arms(checkpoint) -> dict[str, Arm]:
    """The arms of CLAIMS with scripts/world_ablations.py's overrides (only its overrides are used: every arm runs
    the shipped student, whatever checkpoint the ablation table would name)."""
    paths = {name: Path(checkpoint) for name in MODEL_DIRS}
    variants = {}
    for table in (3, 4, 5):
        variants.update(table_variants(table, paths, GRID)[0])
    names = dict.fromkeys(n for _, a, b, _, _ in CLAIMS for n in (a, b))
    return {n: Arm(n, tuple(variants[n][2])) for n in names}


def main(argv=None) -> int:
    def options(p):
        p.add_argument("--dmd-window", default=None,
                       help="the DMD student trained with dmd.grad_blocks=window (adds WINDOW_CLAIM)")
        p.add_argument("--grid-run", default=None,
                       help="a world run with trained Table 3 cells (world.grid): adds their matched-L·N claims")
    return cli(_main, __doc__, argv, options)


def _main(args) -> int:
    t0 = time.perf_counter()
    require_trained(args.dmd_window, "--dmd-window", "world.dmd_window=true")
    grid_arms, grid = grid_claims(args.grid_run) if args.grid_run else ({}, ())
    bench = open_from_args(args)
    arms = claim_arms(bench.checkpoint)
    claims = CLAIMS
    if args.dmd_window:
        arms[WINDOW] = Arm.trained(WINDOW, args.dmd_window)
        claims = CLAIMS + (WINDOW_CLAIM,)
    arms.update(grid_arms)
    claims = claims + grid
    results = bench.evaluate(list(arms.values()), baseline=FULL)
    about = describe(bench, args.resamples)
    entries = []
    for claim, a, b, metric, why in claims:
        e = comparison_entry(results, a, b, metric, args.resamples)
        entries.append({"claim": claim, "verdict": e["verdict"], "effect": e["effect"], "ci_low": e["ci_low"],
                        "ci_high": e["ci_high"], "n_cases": e["n_cases"], "metric": metric,
                        "higher_is_better": e["higher_is_better"], "winner": a, "other": b,
                        "winner_overrides": _setting(arms[a]), "other_overrides": _setting(arms[b]),
                        "mean_winner": e["mean_a"], "mean_other": e["mean_b"],
                        "video_change": mean_pixel_change(results, b if b != FULL else a),
                        "effect_means": "mean per-case advantage of the claimed winner on the metric (> 0 = as "
                                        "claimed)", "why_this_metric": why, "bench": about,
                        "all_metrics": e["all_metrics"]})
    write_results(Path(args.out), "claims", entries, results, bench, about, t0, markdown, lambda e: e["verdict"])
    return 0


def _setting(arm: Arm) -> str:
    """An arm's overrides, and its weights when they are not the shipped student's."""
    return " ".join(arm.overrides + ((f"weights={arm.checkpoint}",) if arm.checkpoint else ()))


def markdown(entries, about: str, times: str) -> str:
    arms = dict.fromkeys((e[k], e[f"{k}_overrides"]) for e in entries for k in ("winner", "other"))
    return report(entries, "claim", "The paper's claims on the shipped student", about, times,
                  "Effect = mean per-case advantage of the claimed winner on the claim's metric (chosen before the "
                  "run; > 0 = as claimed); holds = 95 % CI above 0, does not hold = below 0, inconclusive = "
                  "contains 0.  Video change = mean absolute pixel difference between the other arm's videos and "
                  "the shipped student's as shipped (0-255, mean over cases).",
                  (("winner", "mean_winner"), ("other", "mean_other"), "verdict"), lambda e: e["verdict"],
                  ["", "Arms (overrides of the shipped student's config):", ""]
                  + [f"- {name}: `{ov or '(none)'}`" for name, ov in arms],
                  all_note="> 0 = the claimed winner is better")


if __name__ == "__main__":
    sys.exit(main())

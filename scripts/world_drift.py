"""Long-horizon drift: does a strictly causal rollout without anchors degrade from Total to Last, and the student not?

    python scripts/world_drift.py --config configs/world/v2_student.yaml --metric-nets runs/world_v2/metric_nets.pt
        [--baseline runs/world_v2/self_forcing/export/model.pt]
        [--anchor-free-baseline runs/world_anchor/self_forcing_anchor_free/export/model.pt]
        [--run runs/bench_v2] [--out results/world_v2]
        [--cases 8] [--seconds 180] [--tail SECONDS] [--curve-seconds 10] [--case-seed 10000] [--seed 0]
        [--resamples 10000]

Arms (every one on the same --cases held-out identities of --seconds, same noise seed):
  * the shipped student (B_{4,1}, both anchors), and the same student without its anchors;
  * the trained one-step causal baseline (Self-Forcing 1-step, L = 1, the world pipeline's ``self_forcing`` stage,
    --baseline), with and without anchors: "strictly causal, no anchors" is the failure the paper fixes;
  * the causal baseline trained without the style anchor, keeping only its cache of recent frames
    (--anchor-free-baseline, the pipeline's ``self_forcing_anchor_free`` stage, world.anchor_free_baselines=true), run
    as it was trained: the reference is its first temporal frame, and
    from then on identity lives only in its own recent frames.  The baseline above was trained with the style anchor,
    so without it at inference it runs outside its training; this one is a plain causal model.

Drift of a metric on one case = how much worse its last --tail seconds are than the whole rollout
(Total - Last in the metric's good direction, > 0 = worse late), minus the same on the case's real frames: world v2's
real videos change over minutes too (light, zoom, head turns), and that change is not the model's.  The mean over
cases with its 95 % bootstrap CI (avatarforcing/stats.py) is the drift; it exceeds the noise floor when the CI lies
above 0.  Judged on CSIM (identity against the reference), chosen before the run; the other metrics are reported.

Writes --out/drift.json (one entry per arm: arm, metric, drift, ci_low, ci_high, drifts, n_cases, all_metrics,
csim_curve: the mean CSIM per --curve-seconds), drift.md and drift_curve.png (CSIM against time, every arm and the real video); the per-case rollouts are cached like scripts/world_controls.py's (same --run shares them).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.ablations import NO_STYLE_ANCHOR as ABLATION_NO_STYLE_ANCHOR, write_csv, write_json  # noqa: E402
from avatarforcing.stats import bootstrap_mean_ci, higher_is_better, verdict  # noqa: E402
from avatarforcing.world.bench import Arm, per_case_rows  # noqa: E402
from avatarforcing.world.evaluate import (CURVE_SECONDS, evaluate_variant,  # noqa: E402
                                          real_feature_stats)
from avatarforcing.world.pipeline import CAUSAL  # noqa: E402
from world_controls import check_args, cli, describe, open_from_args, require_trained  # noqa: E402

METRIC = "csim"                                   # judged on identity: the style anchor's claimed role
METRICS = ("csim", "delta_e", "fid", "adj_feat", "sync_conf")
# Without the style anchor the reference is the first frame of the temporal cache and leaves it with the budget:
# identity then lives only in the generated history, as in a plain causal rollout (the failure the anchor fixes).
NO_STYLE_ANCHOR = tuple(ABLATION_NO_STYLE_ANCHOR)
ANCHOR_FREE = "causal L=1 trained without anchors"


def drift_arms(baseline: str | None, anchor_free: str | None = None) -> list[Arm]:
    arms = [Arm("AvatarForcing (shipped)"), Arm("AvatarForcing w/o style anchor", NO_STYLE_ANCHOR)]
    if baseline:
        arms += [Arm.trained("causal L=1 (Self-Forcing 1-step)", baseline, CAUSAL),
                 Arm.trained("causal L=1 w/o style anchor", baseline, CAUSAL + NO_STYLE_ANCHOR)]
    if anchor_free:
        arms.append(Arm.trained(ANCHOR_FREE, anchor_free, CAUSAL + NO_STYLE_ANCHOR))
    return arms


def degradation(row: dict, metric: str) -> float:
    """Total - Last in the metric's good direction (> 0 = the last seconds are worse than the whole)."""
    sign = 1.0 if higher_is_better(f"{metric}_total") else -1.0
    return sign * (float(row[f"{metric}_total"]) - float(row[f"{metric}_last"]))


def drift_entry(name: str, rows: dict, real: dict, resamples: int) -> dict:
    out = {"arm": name, "metric": f"{METRIC}: Total - Last, minus the real frames' Total - Last"}
    per_metric = {}
    for m in METRICS:
        if f"{m}_total" not in real[next(iter(real))]:
            continue
        d = [degradation(rows[c], m) - degradation(real[c], m) for c in sorted(real)]
        mean, lo, hi = bootstrap_mean_ci(d, resamples)
        per_metric[m] = {"drift": mean, "ci_low": lo, "ci_high": hi, "verdict": verdict(lo, hi),
                         "model_total": float(sum(rows[c][f"{m}_total"] for c in real) / len(real)),
                         "model_last": float(sum(rows[c][f"{m}_last"] for c in real) / len(real)),
                         "per_case": d}
    main = per_metric[METRIC]
    out.update(drift=main["drift"], ci_low=main["ci_low"], ci_high=main["ci_high"], drifts=main["ci_low"] > 0,
               n_cases=len(real), all_metrics=per_metric, csim_curve=mean_curve(rows, real))
    return out


def mean_curve(rows: dict, cases) -> list[float] | None:
    """The mean over ``cases`` of their ``csim_curve`` (CSIM per --curve-seconds), or None if a case has none
    (a result cached before the curve was recorded)."""
    curves = [rows[c].get("csim_curve") for c in sorted(cases)]
    if any(not c for c in curves) or len({len(c) for c in curves}) != 1:
        return None
    return [float(v) for v in np.mean(np.asarray(curves, dtype=np.float64), axis=0)]


def plot_curves(entries: list[dict], real_curve: list[float] | None, path: Path,
                span: float = CURVE_SECONDS) -> Path | None:
    """drift_curve.png: each arm's mean CSIM per ``span`` seconds against time, with the real video's."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib not installed: no drift_curve.png; pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve, style in ([(e["arm"], e["csim_curve"], "-") for e in entries]
                               + [("real video", real_curve, "k--")]):
        if curve:
            t = (np.arange(len(curve)) + 0.5) * span
            ax.plot(t, curve, style, label=name, marker=".")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"CSIM to the reference (mean per {span:g} s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    def extra(p):
        p.add_argument("--baseline", default=None,
                       help="the trained causal L=1 baseline (the world pipeline's RUN/self_forcing/export/model.pt)")
        p.add_argument("--anchor-free-baseline", default=None,
                       help="the causal L=1 baseline trained without anchors (RUN/self_forcing_anchor_free/export/model.pt)")
        p.add_argument("--curve-seconds", type=float, default=CURVE_SECONDS,
                       help="the span of each point of the CSIM curve (csim_curve, drift_curve.png)")
        p.add_argument("--tail", type=float, default=None, help="'Last' seconds (default: a sixth of --seconds)")
    return cli(_main, __doc__, argv, extra)


def _main(args) -> int:
    t0 = time.perf_counter()
    require_trained(args.baseline, "--baseline", "world.baselines=true")
    require_trained(args.anchor_free_baseline, "--anchor-free-baseline", "world.anchor_free_baselines=true")
    check_args(args)
    if not 0 < args.curve_seconds <= args.seconds:
        raise AvatarForcingError(f"--curve-seconds must be > 0 and at most --seconds ({args.seconds:g}); "
                                 f"got {args.curve_seconds:g}")
    bench = open_from_args(args, tail_seconds=float(args.tail or args.seconds / 6), curve_seconds=args.curve_seconds)
    results = bench.evaluate(drift_arms(args.baseline, args.anchor_free_baseline))
    real_feats = real_feature_stats(bench.cases, bench.nets)
    real = {c.index: evaluate_variant(c.real_frames, c, bench.nets, real_feats, bench.settings["tail_seconds"],
                                      curve_seconds=bench.curve_seconds) for c in bench.cases}
    entries = [{**drift_entry(name, rows, real, args.resamples), "csim_curve_seconds": bench.curve_seconds}
               for name, rows in results.items()]
    about = describe(bench, args.resamples)
    out = Path(args.out)
    write_json(out / "drift.json", entries)
    plot_curves(entries, mean_curve(real, real), out / "drift_curve.png", bench.curve_seconds)
    write_csv(out / "drift_per_case.csv", per_case_rows(dict(results, real=real), bench.cases))
    (out / "drift.md").write_text(markdown(entries, about, time.perf_counter() - t0) + "\n")
    for e in entries:
        print(f"  [{'drifts' if e['drifts'] else 'no drift beyond the real video'}] {e['arm']}: "
              f"{e['drift']:+.4g} [{e['ci_low']:+.4g}, {e['ci_high']:+.4g}]")
    return 0


def markdown(entries, about: str, wall: float) -> str:
    lines = ["# Long-horizon drift", "", f"Bench: {about}.  Wall time: {wall / 60:.1f} min.", "",
             "Drift = (Total - Last) of the rollout minus (Total - Last) of the real video, in the metric's good "
             "direction (> 0 = the model loses more over time than the real video changes); mean over cases "
             "[95 % CI].  Judged on CSIM.", "",
             "| arm | " + " | ".join(f"{m} drift [95 % CI]" for m in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for e in entries:
        cells = []
        for m in METRICS:
            c = e["all_metrics"].get(m)
            cells.append("n/a" if c is None else f"{c['drift']:+.3g} [{c['ci_low']:+.3g}, {c['ci_high']:+.3g}]")
        lines.append(f"| {e['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

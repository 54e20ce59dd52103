"""Positive controls: can the synthetic world's bench see defects planted on purpose in the shipped student?

    python scripts/world_controls.py [--config configs/demo.yaml] [--checkpoint PATH] [--run runs/controls]
        [--out results/world] [--cases 10] [--seconds 20] [--seed 0] [--case-seed 10000] [--resamples 10000]
        [--metric-nets PATH]

The shipped student (configs/demo.yaml, assets/demo/model.pt) is rolled out clean and under each control of
avatarforcing/world/controls.py (wrong RoPE positions of the temporal cache, context noise at t = 1000, a style
anchor from another identity, audio shifted by 0.5 s, the same noise at every re-noising) on --cases held-out
identities (world seed 10_000, never used in training; --case-seed gives others) of --seconds each, with the same noise seed.  Each control
names a-priori the metric it should hurt; the paired bootstrap (avatarforcing/stats.py) gives the mean
per-case harm on it with a 95 % CI, and the control is detected when the CI lies above 0.

The metric nets are RUN/metric_nets.pt, trained by the world pipeline's metric_nets stage if absent (~2-4 min).
Every (arm, case) result is cached under RUN/cache/<settings hash>/ as soon as it is done: rerun the command
after an interruption and it continues.

Writes to --out: controls.json (one entry per control: control, metric, effect, ci_low, ci_high, detected,
n_cases, ...; effect > 0 means the control is worse than the clean student), controls_per_case.csv (every
metric of every arm and case) and controls.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.world.bench import (Arm, comparison_entry, effects_table, mean_pixel_change,  # noqa: E402
                                       open_bench, per_case_rows)
from avatarforcing.world.controls import controls  # noqa: E402
from avatarforcing.world.evaluate import HELD_OUT_WORLD_SEED  # noqa: E402
from avatarforcing.ablations import write_csv, write_json  # noqa: E402
from avatarforcing.stats import RESAMPLES  # noqa: E402

CLEAN = "clean (shipped student)"


def bench_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every bench script takes (scripts/world_claims.py too)."""
    p.add_argument("--config", default="configs/demo.yaml", help="the student's config")
    p.add_argument("--checkpoint", default=None, help="the student's weights (default: inference.checkpoint)")
    p.add_argument("--run", default="runs/controls", help="metric nets and the per-case cache")
    p.add_argument("--out", default="results/world")
    p.add_argument("--cases", type=int, default=10, help="held-out identities (>= 8 for the results)")
    p.add_argument("--seconds", type=float, default=20.0, help="rollout length per case")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every rollout")
    p.add_argument("--case-seed", type=int, default=HELD_OUT_WORLD_SEED,
                   help="world seed of the held-out cases (another one gives other identities: a replication)")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples (>= 2000)")
    p.add_argument("--metric-nets", default=None, help="default: RUN/metric_nets.pt (trained if absent)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p


def check_args(args) -> None:
    """The bench arguments' one-line errors, before any work."""
    if args.cases < 2 or args.seconds <= 0:
        raise AvatarForcingError("--cases must be >= 2 (the statistics are paired over cases) and --seconds > 0")


def require_trained(path, option: str, switch: str) -> None:
    """A one-line error when the trained model passed as ``option`` is missing (``switch``: the world pipeline's
    setting that trains it)."""
    if path and not Path(path).is_file():
        raise AvatarForcingError(f"{option} {path} not found; train it with the world pipeline ({switch}) or leave "
                                 f"{option} out")


def open_from_args(args, **settings):
    """The bench of the parsed arguments (``settings``: more of open_bench's keywords, e.g. tail_seconds)."""
    check_args(args)
    torch.set_num_threads(args.threads)
    if args.cases < 8:
        print(f"note: {args.cases} cases; the published results use >= 8", file=sys.stderr)
    return open_bench(args.config, args.checkpoint, args.run, args.cases, args.seconds, args.seed,
                      case_seed=args.case_seed, metric_nets=args.metric_nets, threads=args.threads, **settings)


def describe(bench, resamples: int) -> str:
    s = bench.settings
    return (f"shipped student {s['checkpoint']} ({s['config']}), one model at inference (not retrained); "
            f"{s['cases']} held-out identities (world seed {s['case_world_seed']}) x {s['seconds']:g} s "
            f"({s['frames']} frames), noise seed {s['seed']}, 'last' = final {s['tail_seconds']:g} s; paired "
            f"bootstrap over cases, {resamples} resamples, expanded-percentile 95 % CI")


def run_times(results, wall: float) -> str:
    cpu = sum(m.get("rollout_seconds", 0) + m.get("eval_seconds", 0)
              for rows in results.values() for m in rows.values())
    return f"{wall / 60:.1f} min wall this call; {cpu / 60:.1f} min of rollout + metric time in the results"


def cli(run, doc: str, argv=None, extra=None) -> int:
    """Parse the bench arguments (plus ``extra(parser)``'s), call ``run(args)``, print AvatarForcingErrors."""
    p = bench_args(argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc))
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")     # the metric nets' training progress
    try:
        return run(args)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def write_results(out: Path, name: str, entries: list, results: dict, bench, about: str, started: float,
                  markdown, outcome) -> None:
    """NAME.json (the entries), NAME_per_case.csv (every metric of every arm and case) and NAME.md; prints each
    entry's ``outcome(entry)``, its metric and effect."""
    write_json(out / f"{name}.json", entries)
    write_csv(out / f"{name}_per_case.csv", per_case_rows(results, bench.cases))
    times = run_times(results, time.perf_counter() - started)
    (out / f"{name}.md").write_text(markdown(entries, about, times) + "\n")
    print(f"done: {times}; wrote {out / name}.json")
    for e in entries:                                   # an entry's name: e["control"] / e["claim"]
        print(f"  [{outcome(e)}] {e[name[:-1]]}: {e['metric']} {e['effect']:+.4g} [{e['ci_low']:+.4g}, "
              f"{e['ci_high']:+.4g}]")


def main(argv=None) -> int:
    return cli(_main, __doc__, argv, lambda p: p.add_argument(
        "--rope-offset", type=int, default=None, help="latent frames the temporal cache is moved by"))


def _main(args) -> int:
    t0 = time.perf_counter()
    bench = open_from_args(args)
    ctrls = controls(**({"rope_offset": args.rope_offset} if args.rope_offset is not None else {}))
    results = bench.evaluate([Arm(CLEAN)] + ctrls, baseline=CLEAN)
    about = describe(bench, args.resamples)
    entries = []
    for c in ctrls:
        e = comparison_entry(results, CLEAN, c.name, c.metric, args.resamples)
        entries.append({"control": c.name, "metric": c.metric, "effect": e["effect"], "ci_low": e["ci_low"],
                        "ci_high": e["ci_high"], "detected": e["ci_low"] > 0, "n_cases": e["n_cases"],
                        "higher_is_better": e["higher_is_better"], "mean_clean": e["mean_a"],
                        "mean_control": e["mean_b"], "effect_means": "mean per-case harm on the metric: > 0 = the "
                        "control is worse than the clean student", "why_this_metric": c.rationale,
                        "injection": c.tag or " ".join(c.overrides),
                        "video_change": mean_pixel_change(results, c.name), "bench": about,
                        "all_metrics": e["all_metrics"]})
    write_results(Path(args.out), "controls", entries, results, bench, about, t0, markdown,
                  lambda e: "detected" if e["detected"] else "NOT detected")
    return 0


def report(entries, key: str, title: str, about: str, times: str, legend: str, columns: tuple, outcome,
           extra=(), all_note: str = "") -> str:
    """A results page: the settings, one row per entry (``columns`` = (label, entry key) of the two arms' means and
    of the outcome column, ``outcome(entry)`` its cell), ``extra`` lines, why each metric, every metric's effect."""
    (a_label, a_key), (b_label, b_key), out_label = columns
    lines = [f"# {title}", "", f"Bench: {about}.  Run time: {times}.", "", legend, "",
             f"| {key} | metric | {a_label} | {b_label} | effect [95 % CI] | {out_label} | video change (0-255) |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        arrow = "↑" if e["higher_is_better"] else "↓"
        lines.append(f"| {e[key]} | {e['metric']} {arrow} | {e[a_key]:.4g} | {e[b_key]:.4g} | "
                     f"{e['effect']:+.3g} [{e['ci_low']:+.3g}, {e['ci_high']:+.3g}] | {outcome(e)} | "
                     f"{e['video_change']:.3f} |")
    lines += list(extra)
    lines += ["", "Why each metric:", ""]
    lines += [f"- **{e[key]}** ({e['metric']}): {e['why_this_metric']}." for e in entries]
    lines += ["", f"Every metric ({all_note}; the pre-chosen metric in bold; not used for the verdicts, and not "
              "corrected for multiple comparisons):", "", effects_table(entries, key)]
    return "\n".join(lines)


def markdown(entries, about: str, times: str) -> str:
    return report(entries, "control", "Positive controls on the shipped student", about, times,
                  "Effect = mean per-case harm on the control's metric (chosen before the run; > 0 = the broken "
                  "student is worse); detected = its 95 % CI lies above 0.  Video change = mean absolute pixel "
                  "difference between the broken and the clean student's videos (0-255, mean over cases): how much "
                  "the defect changes the video at all.",
                  (("clean", "mean_clean"), ("broken", "mean_control"), "detected"),
                  lambda e: "yes" if e["detected"] else "**no**", all_note="harm > 0 = worse under the control")


if __name__ == "__main__":
    sys.exit(main())

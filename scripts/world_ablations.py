"""The paper's ablations (Tables 3-6, Figures 4-5) in the synthetic world, on the models of a world run.

    python scripts/world_ablations.py --run runs/world --config configs/world/base.yaml --out results/world \
        [--tables 3,4,5,6] [--cases 2] [--seconds 60] [--fast] [--teacher-steps K] [key=value ...]

Reads (written by avatarforcing/world/pipeline.py; layout: avatarforcing/world/layout.py): RUN/codec.pt,
RUN/metric_nets.pt, RUN/teacher/export/model.pt, RUN/ode_student/export/model.pt, RUN/dmd/export/model.pt and, if present, the one-step causal baselines
RUN/causal_ode/export/model.pt and RUN/self_forcing/export/model.pt.

Every variant is rolled out on the same held-out clips (avatarforcing/world/evaluate.py: world seed 10_000, never
used in training) for --seconds, evaluated as Total / Last (final 10 s) and averaged over the cases.

  Table 3  L x N grid (L in 1,2,4,8; N in 1,2,4,8; --fast: L in 1,2,4, N in 1,2) with the final (DMD) student at
           inference: schedule.window_blocks=L, passes=N, steps=null (evenly spaced levels, warped);
           CSIM / Adj flicker / latency; fig4_latency.png, fig5_stability.png.  The grid reuses the
           B_{4,1}-trained student (the paper trains each cell): it measures inference-time allocation only.
  Table 4  Teacher (offline, whole clip) / Student (ODE regression only) / AvatarForcing (DMD), and the DMD student
           without the style anchor / the temporal anchor (cache switches at inference).
  Table 5  w/o anchor-audio zero padding (cache.zero_anchor_audio=false), w/o RoPE re-indexing
           (cache.rope_reindex=false), full.
  Table 6  one-step causal baselines at L = 1 (schedule.window_blocks=1, steps=[1000]): Self-Forcing (1-step) and
           Causal ODE -- the trained baselines if the run has them, else the DMD / ODE students run with L = 1.

Writes to --out: tableN.csv / tableN_per_case.csv / tableN.md, tables.md (all tables and an auto-generated
claims section; results/README.md embeds it), summary.json, the PNGs, and samples/tableN_side_by_side.mp4 (case 0, the
real clip then the variants left to right, audio muxed; order in the .txt next to it).  tables.md and
summary.json are rewritten after every table, so a partial run leaves the tables done so far; --reuse skips
tables whose results in summary.json were made with the same settings.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import json  # noqa: E402

import torch  # noqa: E402

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.world.evaluate import (HELD_OUT_WORLD_SEED, evaluate_run, evaluate_variant,  # noqa: E402
                                          fmt, held_out_cases, markdown_table, mean_rows, real_feature_stats,
                                          resolve_config, run_overrides, write_json)
from avatarforcing.world.layout import RunLayout  # noqa: E402

FULL_GRID = ((1, 2, 4, 8), (1, 2, 4, 8))
FAST_GRID = ((1, 2, 4), (1, 2))
ONE_STEP = ["schedule.window_blocks=1", "schedule.passes=1", "schedule.steps=[1000]"]
TAIL_SECONDS = 10.0

# claim criteria: (metric key, higher is better)
STABILITY = (("csim_last", True), ("delta_e_last", False), ("adj_feat_last", False))
QUALITY = STABILITY + (("fid_total", False), ("sync_conf_total", True))
METRIC_NAMES = {"csim_last": "CSIM last", "delta_e_last": "ΔE last", "adj_feat_last": "Adj-feat last",
                "fid_total": "FID", "sync_conf_total": "Sync-C"}


# ----------------------------------------------------------------------------------------------
# run layout


def run_paths(run: Path) -> dict[str, Path]:
    """The run's codec, metric nets and model exports (avatarforcing/world/layout.py)."""
    layout = RunLayout(run)
    return {"codec": layout.codec, "metric_nets": layout.metric_nets, **layout.models()}


NEEDS = {3: ("dmd",), 4: ("teacher", "ode", "dmd"), 5: ("dmd",), 6: ("dmd", "ode")}


def grid_name(L: int, N: int) -> str:
    return f"B_{{{L},{N}}}"


def table_variants(table: int, paths: dict[str, Path], grid) -> tuple[dict, dict]:
    """-> (variants for evaluate_run, notes)."""
    dmd, ode = str(paths["dmd"]), str(paths["ode"])
    notes: dict = {}
    if table == 3:
        Ls, Ns = grid
        return {grid_name(L, N): ("student", dmd, [f"schedule.window_blocks={L}", f"schedule.passes={N}",
                                                   "schedule.steps=null", "schedule.warp=true"])
                for N in Ns for L in Ls}, notes
    if table == 4:
        return {"Teacher": ("teacher", str(paths["teacher"]), []),
                "Student": ("student", ode, []),
                "AvatarForcing": ("student", dmd, []),
                "w/o style anchor": ("student", dmd, ["cache.style_anchor=false"]),
                "w/o temporal anchor": ("student", dmd, ["cache.temporal_anchor=false"])}, notes
    if table == 5:
        return {"w/o anchor-audio zero padding": ("student", dmd, ["cache.zero_anchor_audio=false"]),
                "w/o RoPE re-indexing": ("student", dmd, ["cache.rope_reindex=false"]),
                "Full": ("student", dmd, [])}, notes
    if table == 6:
        sf = paths["self_forcing"] if paths["self_forcing"].is_file() else None
        co = paths["causal_ode"] if paths["causal_ode"].is_file() else None
        notes["self_forcing"] = (f"trained baseline {sf}" if sf else
                                 "no trained Self-Forcing baseline in the run: the DMD student run with L = 1")
        notes["causal_ode"] = (f"trained baseline {co}" if co else
                               "no trained causal-ODE baseline in the run: the ODE student run with L = 1")
        return {"Self-Forcing (1-step)": ("student", str(sf or dmd), ONE_STEP),
                "Causal ODE": ("student", str(co or ode), ONE_STEP),
                "AvatarForcing": ("student", dmd, [])}, notes
    raise AvatarForcingError(f"unknown table {table}; choose among 3, 4, 5, 6")


TITLES = {3: "Table 3. Window length L x passes N (inference-time allocation, final student)",
          4: "Table 4. Teacher / Student / AvatarForcing, and the dual-anchor cache",
          5: "Table 5. Anchor-audio zero padding and RoPE re-indexing",
          6: "Table 6. One-step causal baselines"}


# ----------------------------------------------------------------------------------------------
# claims


# differences within max(abs, 1% relative) count as ties
TIE_ABS = {"csim_last": 0.002, "delta_e_last": 0.05, "adj_feat_last": 1e-4, "fid_total": 0.0, "sync_conf_total": 0.005}
TIE_REL = 0.01


def compare(a: dict, b: dict, metrics) -> tuple[int, int, int, list[str]]:
    """Row a vs row b on ``metrics`` -> (wins, losses, compared, per-metric strings); near-equal values tie."""
    wins = losses = n = 0
    parts = []
    for key, higher in metrics:
        x, y = a.get(key), b.get(key)
        if x is None or y is None or math.isnan(float(x)) or math.isnan(float(y)):
            continue
        n += 1
        digits = 4 if key.startswith("adj") else 3
        if abs(x - y) <= max(TIE_ABS.get(key, 0.0), TIE_REL * max(abs(x), abs(y))):
            mark = " ="
        elif (x > y) == higher:
            wins, mark = wins + 1, " ✓"
        else:
            losses, mark = losses + 1, " ✗"
        parts.append(f"{METRIC_NAMES.get(key, key)} {fmt(x, digits)} vs {fmt(y, digits)}{mark}")
    return wins, losses, n, parts


def claim_better(claim: str, a_name: str, a: dict | None, b_name: str, b: dict | None, metrics) -> dict:
    if a is None or b is None:
        return {"claim": claim, "verdict": "not evaluated", "detail": f"{a_name} or {b_name} missing"}
    wins, losses, n, parts = compare(a, b, metrics)
    holds = wins > losses
    return {"claim": claim, "verdict": "holds" if holds else "does not hold",
            "detail": f"{a_name} vs {b_name}: better on {wins}, worse on {losses}, tied on {n - wins - losses} of {n} "
                      "(" + "; ".join(parts) + ")", "wins": wins, "losses": losses, "compared": n}


def rows_by_name(rows) -> dict:
    return {r["variant"]: r for r in rows or []}


def make_claims(results: dict) -> list[dict]:
    claims = []
    t3 = rows_by_name(results.get(3))
    if 3 in results:
        claims.append(claim_better("B_{4,1} beats B_{2,2} at matched L·N = 4 (more look-ahead beats more passes)",
                                   "B_{4,1}", t3.get(grid_name(4, 1)), "B_{2,2}", t3.get(grid_name(2, 2)), STABILITY))
        pairs, won, lines = 0, 0, []
        cells = {(int(r["L"]), int(r["N"])): r for r in results[3] if "L" in r}
        for (L1, N1), r1 in cells.items():
            for (L2, N2), r2 in cells.items():
                if L1 * N1 == L2 * N2 and L1 > L2:
                    w, lo, n, _ = compare(r1, r2, STABILITY)
                    pairs += 1
                    won += w > lo
                    lines.append(f"{grid_name(L1, N1)} vs {grid_name(L2, N2)}: +{w}/-{lo} of {n}")
        if pairs:
            claims.append({"claim": "At matched L·N, the larger window is more stable (all matched pairs of the grid)",
                           "verdict": "holds" if won > pairs / 2 else "does not hold",
                           "detail": f"larger L wins {won}/{pairs} matched pairs (" + "; ".join(lines) + ")"})
    t4 = rows_by_name(results.get(4))
    if 4 in results:
        full = t4.get("AvatarForcing")
        style = claim_better("Both anchors help: w/o style anchor is worse", "AvatarForcing", full,
                             "w/o style anchor", t4.get("w/o style anchor"), STABILITY)
        temporal = claim_better("Both anchors help: w/o temporal anchor is worse", "AvatarForcing", full,
                                "w/o temporal anchor", t4.get("w/o temporal anchor"), STABILITY)
        both = "holds" if style["verdict"] == temporal["verdict"] == "holds" else "does not hold"
        claims.append({"claim": "Both anchors help (removing either one degrades stability)", "verdict": both,
                       "detail": f"style anchor: {style['verdict']} ({style['detail']}); temporal anchor: "
                                 f"{temporal['verdict']} ({temporal['detail']})"})
        claims.append(claim_better("DMD improves over the ODE-only student", "AvatarForcing", full, "Student",
                                   t4.get("Student"), STABILITY))
        teacher = t4.get("Teacher")
        if full is not None and teacher is not None and full["latency_s_per_frame"] > 0:
            ratio = teacher["latency_s_per_frame"] / full["latency_s_per_frame"]
            claims.append({"claim": "The student is orders of magnitude faster than the teacher",
                           "verdict": "holds" if ratio >= 100 else "does not hold",
                           "detail": f"teacher {teacher['latency_s_per_frame']:.4f} s/frame vs AvatarForcing "
                                     f"{full['latency_s_per_frame']:.4f} s/frame: {ratio:.0f}x (criterion >= 100x; "
                                     "paper 16 / 0.034 = 470x)", "ratio": ratio})
    t5 = rows_by_name(results.get(5))
    if 5 in results:
        claims.append(claim_better("Anchor-audio zero padding helps", "Full", t5.get("Full"),
                                   "w/o anchor-audio zero padding", t5.get("w/o anchor-audio zero padding"), QUALITY))
        claims.append(claim_better("RoPE re-indexing helps", "Full", t5.get("Full"),
                                   "w/o RoPE re-indexing", t5.get("w/o RoPE re-indexing"), QUALITY))
    t6 = rows_by_name(results.get(6))
    if 6 in results:
        full = t6.get("AvatarForcing")
        sf = claim_better("AvatarForcing beats Self-Forcing (1-step)", "AvatarForcing", full,
                          "Self-Forcing (1-step)", t6.get("Self-Forcing (1-step)"), QUALITY)
        co = claim_better("AvatarForcing beats Causal ODE", "AvatarForcing", full, "Causal ODE",
                          t6.get("Causal ODE"), QUALITY)
        both = "holds" if sf["verdict"] == co["verdict"] == "holds" else "does not hold"
        claims.append({"claim": "AvatarForcing beats the one-step causal baselines", "verdict": both,
                       "detail": f"vs Self-Forcing (1-step): {sf['verdict']} ({sf['detail']}); vs Causal ODE: "
                                 f"{co['verdict']} ({co['detail']})"})
    return claims


# ----------------------------------------------------------------------------------------------
# Table 3 extras: grids and figures


def grid_markdown(rows, Ls, Ns, part: str) -> str:
    cells = {(int(r["L"]), int(r["N"])): r for r in rows if "L" in r}
    head = "| N \\ L | " + " | ".join(str(L) for L in Ls) + " |"
    lines = [head, "|" + "|".join(["---"] * (len(Ls) + 1)) + "|"]
    for N in Ns:
        vals = []
        for L in Ls:
            r = cells.get((L, N))
            if r is None:
                vals.append("-")
                continue
            vals.append(f"{fmt(r.get(f'csim_{part}'), 2)} / {fmt(100 * r.get(f'adj_feat_{part}', float('nan')), 2)}"
                        f" / {fmt(1e3 * r.get('latency_s_per_frame', float('nan')), 2)}")
        lines.append(f"| {N} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_grid(rows, Ls, Ns, out: Path, B: int) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    cells = {(int(r["L"]), int(r["N"])): r for r in rows if "L" in r}
    written = []
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for N in Ns:
        pts = [(L * B, 1e3 * cells[(L, N)]["latency_s_per_frame"]) for L in Ls if (L, N) in cells]
        ax.plot(*zip(*pts), marker="o", label=f"N = {N}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([L * B for L in Ls])
    ax.set_xticklabels([str(L * B) for L in Ls])
    ax.set_xlabel(f"window length (latent frames, L x B, B = {B})")
    ax.set_ylabel("steady-state latency (ms / frame)")
    ax.set_title("Latency vs. window length (Fig. 4)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig4_latency.png", dpi=120)
    plt.close(fig)
    written.append(str(out / "fig4_latency.png"))

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, (("csim_last", "CSIM, last 10 s ↑"), ("delta_e_last", "ΔE2000, last 10 s ↓"),
                                       ("adj_feat_last", "Adj-feat flicker, last 10 s ↓"))):
        for N in Ns:
            pts = [(L, cells[(L, N)][key]) for L in Ls if (L, N) in cells]
            ax.plot(*zip(*pts), marker="o", label=f"N = {N}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(Ls))
        ax.set_xticklabels([str(L) for L in Ls])
        ax.set_xlabel("window length L (blocks)")
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle("Window length L vs. denoising passes N (Fig. 5; B_{4,1}-trained student at inference)")
    fig.tight_layout()
    fig.savefig(out / "fig5_stability.png", dpi=120)
    plt.close(fig)
    written.append(str(out / "fig5_stability.png"))
    return written


# ----------------------------------------------------------------------------------------------
# tables.md


METRIC_LEGEND = (
    "Metrics (avatarforcing/metrics.py, the world's analogues of the paper's): CSIM = cosine similarity of the "
    "identity net's embeddings to the reference; ΔE2000 = colour drift of the centre face crop vs. the reference; "
    "Adj-feat = LPIPS-style feature distance of adjacent frames (flicker, shown x1e-2), Adj-pixel = mean absolute "
    "difference of adjacent frames (0-255); Sync-C = correlation of the sync expert's mouth opening with the speech "
    "envelope at the best offset, Sync offset = |best offset| in frames; FID = Fréchet distance of identity-net "
    "features to the real held-out frames.  Each cell is Total / Last (whole rollout / final 10 s), mean over cases.  "
    "Latency = steady-state s/frame (Table 2 protocol: sampler step incl. audio encoding, DiT window, KV update, and "
    "VAE decode, excluding start-up, the first emitting step and the drain), on this machine's CPU; the teacher's "
    "is its whole-clip wall time (encode + Euler ODE sample + decode) over the frames.")


def write_tables_md(out: Path, settings: dict, results: dict, markdowns: dict, claims: list[dict],
                    figures: list[str], notes: dict, real_row: dict | None) -> Path:
    lines = ["# AvatarForcing ablations in the synthetic world", "",
             f"Run `{settings['run']}`, config `{settings['config']}`; {settings['cases']} held-out case(s) "
             f"(world seed {settings['case_world_seed']}, clip indices 0..{settings['cases'] - 1}; never used in "
             f"training), {settings['seconds']:g}-second rollouts ({settings['frames']} frames at 25 fps), "
             f"teacher: {settings['teacher_steps']} Euler steps with CFG over the whole clip.  "
             f"Device: {settings['device']}.  Generated {settings['date']} by `scripts/world_ablations.py`"
             f"{' --fast' if settings['fast'] else ''}.", "", METRIC_LEGEND, ""]
    if real_row is not None:
        lines += ["**Ground truth (the real held-out clips, for scale)**", "", markdown_table([real_row]), ""]
    for t in sorted(markdowns):
        lines += [f"## {TITLES[t]}", ""]
        if t == 3:
            Ls, Ns = settings["grid"]
            lines += ["The grid reuses the B_{4,1}-trained final student (the paper trains each cell), so it measures "
                      "inference-time allocation of compute between look-ahead L and passes N only; every cell uses "
                      "L·N evenly spaced (shift-warped) levels, schedule.steps=null.", "",
                      "Entries: CSIM ↑ / Adj-feat (1e-2) ↓ / latency (ms/frame) ↓, **Total**:", "",
                      grid_markdown(results[3], Ls, Ns, "total"), "", "Same, **Last** 10 s:", "",
                      grid_markdown(results[3], Ls, Ns, "last"), ""]
            lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + ["", "All metrics:", ""]
        if t == 6:
            lines += [f"- Self-Forcing (1-step): {notes.get('self_forcing', '')}",
                      f"- Causal ODE: {notes.get('causal_ode', '')}",
                      "- Both run at L = 1 (schedule.window_blocks=1, steps=[1000]): one denoising step per block "
                      "from pure noise, no look-ahead.", ""]
        lines += [markdowns[t], "", f"Side-by-side sample (case 0): `samples/table{t}_side_by_side.mp4`.", ""]
    lines += ["## Paper claims in this world", "",
              "Verdicts are computed from the tables above: 'holds' = the claimed winner is better on more of the "
              "compared metrics than it is worse on (stability claims: CSIM, ΔE2000 and Adj-feat over the last 10 s; "
              "Tables 5/6 also FID and Sync-C over the whole rollout); differences within 1% (or a small absolute "
              "tolerance) count as ties (=).  With few cases, small differences are within noise.", ""]
    for c in claims:
        lines.append(f"- **{c['claim']}**: {c['verdict']}. {c['detail']}")
    path = out / "tables.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run", default="runs/world", help="run folder of avatarforcing/world/pipeline.py")
    p.add_argument("--config", default="configs/world/base.yaml")
    p.add_argument("--out", default="results/world")
    p.add_argument("--tables", default="3,4,5,6", help="comma-separated subset of 3,4,5,6")
    p.add_argument("--cases", type=int, default=2, help="held-out clips")
    p.add_argument("--seconds", type=float, default=60.0, help="rollout length")
    p.add_argument("--fast", action="store_true", help="smaller L x N grid (L 1,2,4; N 1,2) and 4 teacher steps")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher Euler steps (default ode.teacher_steps)")
    p.add_argument("--metric-nets", default=None, help="default RUN/metric_nets.pt")
    p.add_argument("--case-seed", type=int, default=HELD_OUT_WORLD_SEED, help="world seed of the held-out clips")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every rollout")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (latencies depend on it)")
    p.add_argument("--no-videos", action="store_true", help="skip the side-by-side sample videos")
    p.add_argument("--variant-videos", action="store_true", help="also write one mp4 per variant")
    p.add_argument("--reuse", action="store_true",
                   help="keep the tables already in summary.json if made with the same settings (and skip them)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every variant")
    return p.parse_args(argv)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return _main(args)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main(args) -> int:
    from avatarforcing.world.evaluate import load_metric_nets

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tables = sorted({int(t) for t in args.tables.split(",") if t.strip()})
    except ValueError:
        raise AvatarForcingError(f"--tables must be a comma-separated list of 3,4,5,6, got '{args.tables}'") from None
    bad = [t for t in tables if t not in NEEDS]
    if bad or not tables:
        raise AvatarForcingError(f"--tables must be a comma-separated subset of 3,4,5,6, got '{args.tables}'")
    if args.cases < 1 or args.seconds <= 0:
        raise AvatarForcingError("--cases must be >= 1 and --seconds > 0")
    run, out = Path(args.run), Path(args.out)
    paths = run_paths(run)
    missing = sorted({str(paths[k]) for t in tables for k in NEEDS[t] if not paths[k].is_file()})
    nets_path = Path(args.metric_nets) if args.metric_nets else paths["metric_nets"]
    if not nets_path.is_file():
        missing.append(str(nets_path))
    if missing:
        raise AvatarForcingError("missing run files for tables " + ",".join(map(str, tables)) + ": "
                                 + ", ".join(missing) + "; run avatarforcing/world/pipeline.py first "
                                 "(or choose other --tables)")
    if not paths["codec"].is_file():
        print(f"warning: {paths['codec']} not found: the config's vae is used as is", file=sys.stderr)
    cfg = resolve_config(args.config, run_overrides(run) + list(args.overrides))
    size = int(cfg.inference.height)
    if int(cfg.inference.width) != size:
        raise AvatarForcingError("the world is square: set inference.height == inference.width")
    grid = FAST_GRID if args.fast else FULL_GRID
    teacher_steps = args.teacher_steps or (4 if args.fast else int(cfg.ode.teacher_steps))
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    nets = load_metric_nets(nets_path)
    cases = held_out_cases(args.cases, args.seconds, size=size, seed=args.case_seed)
    real_feats = real_feature_stats(cases, nets)
    dev = str(cfg.inference.device)
    device = (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)"
              if dev == "cpu" or not torch.cuda.is_available() else dev)
    settings = {"run": str(run), "config": str(args.config), "overrides": list(args.overrides), "cases": args.cases,
                "seconds": args.seconds, "frames": cases[0].num_frames, "case_world_seed": args.case_seed,
                "case_clip_seeds": [c.seed for c in cases], "seed": args.seed, "fast": bool(args.fast),
                "grid": [list(grid[0]), list(grid[1])], "teacher_steps": teacher_steps, "tail_seconds": TAIL_SECONDS,
                "device": device, "threads": torch.get_num_threads(), "git": _git_commit(),
                "date": datetime.date.today().isoformat(),
                "checkpoints": {k: (str(p), os.path.getmtime(p)) for k, p in paths.items() if p.is_file()}}

    previous = {}
    summary_path = out / "summary.json"
    if args.reuse and summary_path.is_file():
        old = json.loads(summary_path.read_text())
        same = {k: v for k, v in settings.items() if k not in ("date", "git", "device")}
        if {k: old.get("settings", {}).get(k) for k in same} == json.loads(json.dumps(same)):
            previous = {int(k): v for k, v in old.get("tables", {}).items()}
        else:
            print("--reuse: summary.json was made with other settings; recomputing everything", flush=True)

    real_rows = [{"variant": "Real clips", "kind": "real", "cases": len(cases),
                  **mean_rows([evaluate_variant(c.real_frames, c, nets, real_feats, TAIL_SECONDS) for c in cases])}]
    results, markdowns, notes, figures, timings = {}, {}, {}, [], {}
    summary = {"settings": settings, "tables": {}, "claims": [], "real": real_rows[0], "notes": notes,
               "timings_s": timings}
    for k, v in previous.items():                      # --reuse: keep every table made with the same settings
        results[k] = v["rows"]
        markdowns[k] = v["markdown"]
        notes.update(v.get("notes", {}))
    for t in tables:
        variants, tnotes = table_variants(t, paths, grid)
        notes.update(tnotes)
        if t in results:
            print(f"table {t}: reused from {summary_path}", flush=True)
        else:
            t0 = time.perf_counter()
            print(f"table {t}: {len(variants)} variants x {len(cases)} case(s) of {args.seconds:g} s", flush=True)
            rows = evaluate_run(run, args.config, variants, cases, nets, out_dir=out, name=f"table{t}",
                                real_feats=real_feats, overrides=args.overrides, tail_seconds=TAIL_SECONDS,
                                teacher_steps=teacher_steps, seed=args.seed, videos=not args.no_videos,
                                variant_videos=args.variant_videos, title=TITLES[t])
            if t == 3:
                for r in rows:
                    L, N = r["variant"].strip("B_{}").split(",")
                    r["L"], r["N"] = int(L), int(N)
            results[t] = rows
            markdowns[t] = markdown_table(rows)
            timings[t] = time.perf_counter() - t0
        if 3 in results:
            figures = plot_grid(results[3], *grid, out, int(cfg.schedule.block_frames))
        claims = make_claims(results)
        summary["tables"] = {k: {"rows": results[k], "markdown": markdowns[k],
                                 "notes": {n: notes[n] for n in ("self_forcing", "causal_ode")
                                           if k == 6 and n in notes}}
                             for k in results}
        summary["claims"] = claims
        summary["figures"] = figures
        timings["total"] = time.perf_counter() - t_start
        write_json(summary_path, summary)
        write_tables_md(out, settings, results, markdowns, claims, figures, notes, real_rows[0])
    print(f"done in {time.perf_counter() - t_start:.0f} s; wrote {out / 'tables.md'} and {summary_path}")
    for c in summary["claims"]:
        print(f"  [{c['verdict']}] {c['claim']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the markdown tables of the world benches from their JSON results.

    python scripts/world_report.py results/README.md            # rewrite every block, print the ones that changed
    python scripts/world_report.py results/README.md --check    # write nothing; exit 1 if a block is stale

A block is a table between two markers; the first names what the table shows:

    <!-- world_report: KIND FOLDER [FOLDER ...] [label="A|B"] [rows=I-J] [means=true] -->
    (the generated table)
    <!-- /world_report -->

KIND is controls, claims or drift: the table is FOLDER/controls.json (scripts/world_controls.py),
FOLDER/claims.json (scripts/world_claims.py) or FOLDER/drift.json (scripts/world_drift.py); folders are relative to
the repository root.  One folder: one row per entry, with its pre-chosen metric, effect [95 % CI], outcome (detected
/ verdict / drifts) and video change; a drift row has every metric's drift instead.  Several folders (e.g. two
students): one row per entry name and one "effect [95 % CI] outcome" column per folder (then one video change column
per folder), headed by the folder names or by label="A|B" (one label per folder).  rows=I-J keeps entries I to J
(from 1) of a single folder; means=true adds the two arms' means (clean / broken, winner / other) to a single-folder
controls or claims table.

Every block is generated before anything is written, so an error (a missing JSON file, an unknown kind) leaves the
file as it was; the file is replaced atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from avatarforcing import AvatarForcingError  # noqa: E402
from avatarforcing.stats import HIGHER_IS_BETTER, HOLDS  # noqa: E402

BLOCK = re.compile(r"<!-- world_report: (?P<spec>.*?) -->[ \t]*\n(?P<body>.*?)<!-- /world_report -->", re.S)
START = "<!-- world_report:"
METRIC_NAMES = {"csim": "CSIM", "delta_e": "ΔE", "adj_feat": "Adj-feat", "adj_pixel": "Adj-pixel",
                "seam_feat": "seam-feat", "sync_conf": "Sync-C", "sync_dist": "Sync-dist", "sync_offset": "Sync offset",
                "fid": "FID"}
OPTIONS = ("label", "rows", "means")


@dataclass(frozen=True)
class Kind:
    """What one bench's JSON entries look like, and how its table names them."""
    name: str                       # controls / claims / drift: also the JSON file's stem
    key: str                        # the entry field that names a row
    outcome_head: str
    outcome: Callable[[dict], str]
    effect_head: str | None = None  # a single-folder table's effect column (a drift table has one per metric)
    means: tuple[tuple[str, str], tuple[str, str]] | None = None   # (header, entry field) of the two arms' means


KINDS = {k.name: k for k in (
    Kind("controls", "control", "detected", lambda e: "yes" if e["detected"] else "**no**", "harm [95 % CI]",
         (("clean", "mean_clean"), ("broken", "mean_control"))),
    Kind("claims", "claim", "verdict", lambda e: f"**{e['verdict']}**" if e["verdict"] == HOLDS else e["verdict"],
         "effect [95 % CI]", (("winner", "mean_winner"), ("other", "mean_other"))),
    Kind("drift", "arm", "drifts", lambda e: "yes" if e["drifts"] else "no"),
)}


@dataclass(frozen=True)
class Spec:
    """A block's first marker, parsed."""
    kind: Kind
    folders: tuple[str, ...]
    labels: tuple[str, ...]
    rows: tuple[int, int] | None = None
    means: bool = False


# ---------------------------------------------------------------------------------------------------------------
# numbers


def decimals(x: float, digits: int) -> int:
    """How many decimals show ``|x|`` to ``digits`` significant digits."""
    if x == 0 or not math.isfinite(x):
        return digits - 1
    return max(0, digits - 1 - math.floor(math.log10(abs(x))))


def fixed(values: Sequence[float], digits: int) -> list[str]:
    """``values`` with one number of decimals: the largest to ``digits`` significant digits."""
    d = decimals(max(abs(v) for v in values), digits)
    return [f"{v:.{d}f}" for v in values]


def ci_cell(effect: float, low: float, high: float) -> str:
    """``+0.0093 [+0.0024, +0.0160]``: signed, to 2 significant digits of the CI's half-width (the precision the
    CI supports; of the largest value if the CI has no width)."""
    d = decimals((high - low) / 2 or max(abs(effect), abs(low), abs(high)), 2)
    return f"{effect:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}]"


def grey_levels(change: float) -> str:
    """A video change (mean absolute pixel difference, 0-255): 3 significant digits, at most 2 decimals."""
    return f"{change:.{min(2, decimals(change, 3))}f}"


def metric_label(metric: str, drift: bool = False) -> str:
    """``adj_feat_last`` -> ``Adj-feat last ↓``; a drift's ``csim`` -> ``CSIM drift`` (> 0 = worse late: no arrow)."""
    base = metric.removesuffix("_total").removesuffix("_last")
    name = METRIC_NAMES.get(base, base)
    if drift:
        return f"{name} drift"
    last = " last" if metric.endswith("_last") else ""
    arrow = {True: " ↑", False: " ↓"}.get(HIGHER_IS_BETTER.get(base), "")
    return f"{name}{last}{arrow}"


# ---------------------------------------------------------------------------------------------------------------
# entries -> tables


def judged(kind: Kind, e: dict) -> tuple[str, str]:
    """An entry's pre-chosen metric (a drift entry's ``metric`` starts with its key) and its effect [95 % CI]."""
    if kind.name == "drift":
        return e["metric"].split(":")[0], ci_cell(e["drift"], e["ci_low"], e["ci_high"])
    return e["metric"], ci_cell(e["effect"], e["ci_low"], e["ci_high"])


def single_table(spec: Spec, entries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One folder: the header and one row per entry."""
    kind = spec.kind
    if kind.name == "drift":
        metrics = list(entries[0]["all_metrics"])
        main = judged(kind, entries[0])[0]
        head = [kind.key] + [metric_label(m, drift=True) + (" (judged)" if m == main else "") for m in metrics]
        rows = [[e[kind.key]] + [ci_cell(e["all_metrics"][m]["drift"], e["all_metrics"][m]["ci_low"],
                                         e["all_metrics"][m]["ci_high"]) for m in metrics] + [kind.outcome(e)]
                for e in entries]
        return head + [kind.outcome_head], rows
    means = kind.means if spec.means else ()
    head = [kind.key, "metric", *(h for h, _ in means), kind.effect_head, kind.outcome_head, "video change"]
    rows = []
    for e in entries:
        metric, cell = judged(kind, e)
        arms = fixed([e[k] for _, k in means], 4) if means else []
        rows.append([e[kind.key], metric_label(metric), *arms, cell, kind.outcome(e),
                     grey_levels(e["video_change"])])
    return head, rows


def multi_table(spec: Spec, folders: list[list[dict]]) -> tuple[list[str], list[list[str]]]:
    """Several folders: one row per entry name (in order of first appearance) and one column per folder."""
    kind = spec.kind
    by_name = [{e[kind.key]: e for e in entries} for entries in folders]
    names = list(dict.fromkeys(n for entries in by_name for n in entries))
    drift = kind.name == "drift"                  # a drift entry has no video change
    head = [kind.key, "metric", *spec.labels, *(f"video change ({lab})" for lab in spec.labels if not drift)]
    rows = []
    for name in names:
        found = [(judged(kind, es[name]), es[name]) if name in es else None for es in by_name]
        metrics = {f[0][0] for f in found if f}
        if len(metrics) > 1:
            raise AvatarForcingError(f"'{name}' is judged on {' and '.join(sorted(metrics))} in the folders of block "
                                     f"'{kind.name} {' '.join(spec.folders)}'; one column compares one metric")
        cells = [f"{f[0][1]} {kind.outcome(f[1])}" if f else "-" for f in found]
        changes = [] if drift else [grey_levels(f[1]["video_change"]) if f else "-" for f in found]
        rows.append([name, metric_label(metrics.pop(), drift), *cells, *changes])
    return head, rows


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---------------------------------------------------------------------------------------------------------------
# markers -> blocks


def parse_spec(text: str) -> Spec:
    """``KIND FOLDER [FOLDER ...] [label="A|B"] [rows=I-J] [means=true]`` -> Spec."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise AvatarForcingError(f"block '{text}': {exc}") from None
    if not words or words[0] not in KINDS:
        raise AvatarForcingError(f"block '{text}': unknown kind '{words[0] if words else ''}'; use one of "
                                 + ", ".join(KINDS))
    options = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    folders = tuple(w for w in words[1:] if "=" not in w)
    labels = tuple(options["label"].split("|")) if "label" in options else tuple(Path(f).name for f in folders)
    rows = re.fullmatch(r"([1-9][0-9]*)-([1-9][0-9]*)", options.get("rows", ""))
    several = len(folders) > 1
    problems = [f"unknown option '{k}' (options: {', '.join(OPTIONS)})" for k in options if k not in OPTIONS]
    if not folders:
        problems.append("no folder")
    if len(labels) != len(folders):
        problems.append(f"label= has {len(labels)} labels for {len(folders)} folders")
    if "rows" in options and rows is None:
        problems.append("rows= takes I-J (entries I to J, from 1)")
    if options.get("means", "false") not in ("true", "false"):
        problems.append("means= takes true or false")
    if several and ("rows" in options or options.get("means") == "true"):
        problems.append("rows= and means=true take one folder")
    if not several and "label" in options:
        problems.append("label= takes several folders")
    if options.get("means") == "true" and words[0] == "drift":
        problems.append("means=true takes a controls or claims block")
    if problems:
        raise AvatarForcingError(f"block '{text}': " + "; ".join(problems))
    return Spec(KINDS[words[0]], folders, labels if several else (),
                (int(rows[1]), int(rows[2])) if rows else None, options.get("means") == "true")


def load(folder: str, kind: Kind) -> list[dict]:
    path = ROOT / folder / f"{kind.name}.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AvatarForcingError(f"{path} not found; run scripts/world_{kind.name}.py --out {folder} first, or fix "
                                 "the block's folder") from None
    except (OSError, ValueError) as exc:
        raise AvatarForcingError(f"cannot read {path}: {exc}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise AvatarForcingError(f"{path} is not a list of {kind.name} entries")
    return entries


def render(text: str) -> str:
    """The table of the block whose first marker holds ``text``."""
    spec = parse_spec(text)
    folders = [load(f, spec.kind) for f in spec.folders]
    if spec.rows:
        first, last = spec.rows
        if not first <= last <= len(folders[0]):
            raise AvatarForcingError(f"block '{text}': rows={first}-{last}, but {spec.folders[0]}/{spec.kind.name}"
                                     f".json has {len(folders[0])} entries")
        folders[0] = folders[0][first - 1:last]
    try:
        head, rows = single_table(spec, folders[0]) if len(folders) == 1 else multi_table(spec, folders)
    except KeyError as exc:
        raise AvatarForcingError(f"block '{text}': an entry has no field {exc}; is it {spec.kind.name}.json as "
                                 f"scripts/world_{spec.kind.name}.py writes it?") from None
    return f"\n{markdown_table(head, rows)}\n\n"


def regenerate(text: str, name: str) -> tuple[str, list[tuple[int, str]]]:
    """``text`` with every block regenerated, and the (line, spec) of the blocks that changed."""
    blocks = list(BLOCK.finditer(text))
    if text.count(START) != len(blocks) or any(START in b["body"] for b in blocks):
        raise AvatarForcingError(f"{name}: a '{START} ... -->' marker has no '<!-- /world_report -->' after it")
    if not blocks:
        raise AvatarForcingError(f"{name} has no '{START} ... -->' block")
    out, changed, pos = [], [], 0
    for b in blocks:
        body = render(b["spec"])
        if body != b["body"]:
            changed.append((text.count("\n", 0, b.start()) + 1, b["spec"]))
        out += [text[pos:b.start("body")], body]
        pos = b.end("body")
    return "".join(out + [text[pos:]]), changed


def run(path: Path, check: bool) -> int:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AvatarForcingError(f"cannot read {path}: {exc.strerror}") from None
    new, changed = regenerate(text, str(path))
    fix = f"python scripts/world_report.py {path}"
    for line, spec in changed:
        print(f"{path}:{line}: block '{spec}' " + (f"is stale; run: {fix}" if check else "regenerated"),
              file=sys.stderr if check else sys.stdout)
    if check:
        return 1 if changed else 0
    if changed:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, path)
    else:
        print(f"{path}: every block is current")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("markdown", type=Path, help="the markdown file whose blocks are regenerated")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is not current")
    args = p.parse_args(argv)
    try:
        return run(args.markdown, args.check)
    except AvatarForcingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

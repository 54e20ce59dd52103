"""The generic ablation runner (avatarforcing/ablations.py) and its command line (scripts/ablations.py)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avatarforcing import AvatarForcingError
from avatarforcing.ablations import (FAST_GRID, EvalItem, Scorer, judge, parse_tables, read_eval_list, run_tables,
                                     table_variants, total_last)
from avatarforcing.checkpoint import export_released
from avatarforcing.config import load_config
from avatarforcing.model import build_model

ROOT = Path(__file__).resolve().parent.parent
TINY = ["vae.kind=world"]


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs" / "tiny.yaml", TINY)


@pytest.fixture(scope="module")
def files(tmp_path_factory, cfg):
    """A tiny student checkpoint, two reference images, an eval list of 2 items (1 s each)."""
    d = tmp_path_factory.mktemp("abl")
    torch.manual_seed(0)
    sd = build_model(cfg.model).state_dict()
    export_released(sd, d / "model.pt", ema_state=sd)
    Image.open(ROOT / "assets" / "example.png").transpose(Image.FLIP_LEFT_RIGHT).save(d / "flipped.png")
    (d / "eval.txt").write_text(f"# image audio\n{ROOT / 'assets' / 'example.png'} {ROOT / 'assets' / 'example.wav'}\n"
                                f"flipped.png '{ROOT / 'assets' / 'example.wav'}'\n")
    return d


class ToyScorer(Scorer):
    """csim: a per-item level (items differ a lot: the pairing must remove it), + 0.1 for the variants whose run
    order is in ``better`` (a planted effect); flicker ignores the variant (identical arms)."""
    columns = (("CSIM ↑", lambda r: total_last(r, "csim")), ("Flicker ↓", lambda r: total_last(r, "flicker")))
    roles = {"identity": ("csim", "CSIM ↑", 1.0), "stability": ("flicker", "Flicker ↓", 1.0)}
    legend = "toy metrics"

    def __init__(self, better=()):
        self.better, self.variant = set(better), 0

    def score(self, frames, item):
        assert frames.dtype == np.uint8 and frames.shape[1:] == (64, 64, 3) and len(frames) == item.num_frames
        csim = {"example": 0.3, "flipped": 0.8}[item.name] + (0.1 if self.variant in self.better else 0.0)
        flicker = {"example": 1.0, "flipped": 2.0}[item.name]
        return {"csim_total": csim, "csim_last": csim, "flicker_total": flicker, "flicker_last": flicker}

    def variant_metrics(self):
        self.variant += 1
        return {"set_metric": float(self.variant)}


def test_tables_files_rows_and_paired_verdicts(tmp_path, cfg, files):
    items = read_eval_list(files / "eval.txt", seconds=1.0)
    assert [i.name for i in items] == ["example", "flipped"] and items[1].num_frames == 25
    models = {"dmd": files / "model.pt", "ode": None, "teacher": None}
    summary = run_tables([3, 4, 5], models, items, ToyScorer(better={2}), cfg, tmp_path, grid=((1, 2), (1,)), videos=True,
                         log=None)
    for t, n in ((3, 2), (4, 3), (5, 3)):
        rows = summary["tables"][t]["rows"]
        assert len(rows) == n and all(r["cases"] == 2 and r["latency_s_per_frame"] > 0 for r in rows)
        assert (tmp_path / f"table{t}.csv").is_file() and (tmp_path / f"table{t}.md").is_file()
        assert len((tmp_path / f"table{t}_per_case.csv").read_text().splitlines()) == 1 + 2 * n
        assert (tmp_path / "samples" / f"table{t}_side_by_side.mp4").is_file()
    assert [r["set_metric"] for r in summary["tables"][3]["rows"]] == [1.0, 2.0]     # set-level, per variant
    assert [r["variant"] for r in summary["tables"][4]["rows"]] == ["AvatarForcing", "w/o style anchor",
                                                                   "w/o temporal anchor"]
    notes = summary["tables"][4]["notes"]
    assert "no teacher checkpoint" in notes["Teacher"] and "no ode checkpoint" in notes["Student"]
    assert (tmp_path / "fig4_latency.png").is_file() and (tmp_path / "fig5_stability.png").is_file()
    md = (tmp_path / "tables.md").read_text()
    assert "Table 3" in md and "| N \\ L | 1 | 2 |" in md and "toy metrics" in md and "Paper claims" in md
    claims = {c["claim"]: c for c in json.loads((tmp_path / "summary.json").read_text())["claims"]}
    # run order: table 3's 2 cells, then table 4's AvatarForcing (2, planted +0.1 CSIM on every item), ...
    style = claims["The style anchor preserves identity"]
    assert style["verdict"] == "holds" and style["pairs"][0]["effect"] == pytest.approx(0.1)
    # identical arms on every item: the paired bootstrap says inconclusive
    anchor = claims["The temporal anchor keeps frames coherent"]
    assert anchor["verdict"] == "inconclusive" and anchor["pairs"][0]["n_cases"] == 2
    assert claims["DMD improves over the ODE-only student"]["verdict"] == "not evaluated"


def test_verdict_is_a_paired_bootstrap():
    """A planted per-item advantage holds despite a large spread between items; its reverse does not hold."""
    rng = np.random.default_rng(0)
    level = 5 * rng.normal(size=8)
    per_case = [{"variant": "A", "item": i, "csim_last": level[i] + 0.1} for i in range(8)] + \
               [{"variant": "B", "item": i, "csim_last": level[i]} for i in range(8)]
    assert judge("A beats B", [("A", "B")], "csim_last", per_case)["verdict"] == "holds"
    assert judge("B beats A", [("B", "A")], "csim_last", per_case)["verdict"] == "does not hold"
    both = judge("A beats B and A", [("A", "B"), ("A", "A")], "csim_last", per_case)
    assert both["verdict"] == "inconclusive" and len(both["pairs"]) == 2
    assert judge("one item", [("A", "B")], "csim_last", per_case[:1] + per_case[8:9])["verdict"] == "not evaluated"


def test_table_variants_report_missing_models(tmp_path):
    (tmp_path / "dmd.pt").write_bytes(b"x")
    variants, notes = table_variants(6, {"dmd": tmp_path / "dmd.pt"}, FAST_GRID)
    assert list(variants) == ["Self-Forcing (1-step)", "AvatarForcing"]
    assert "no trained Self-Forcing baseline" in notes["Self-Forcing (1-step)"]
    assert "not evaluated" in notes["Causal ODE"]
    assert variants["Self-Forcing (1-step)"].overrides[0] == "schedule.window_blocks=1"
    assert len(table_variants(3, {"dmd": tmp_path / "dmd.pt"}, FAST_GRID)[0]) == 6
    with pytest.raises(AvatarForcingError):
        parse_tables("3,7")


def _script():
    spec = importlib.util.spec_from_file_location("ablations_under_test", ROOT / "scripts" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_weight_free_metrics_end_to_end(tmp_path, files, capsys):
    out = tmp_path / "out"
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--checkpoint", str(files / "model.pt"),
            "--eval-list", str(files / "eval.txt"), "--tables", "5", "--seconds", "1", "--out", str(out),
            "--no-videos", *TINY]
    assert _script().main(argv) == 0
    rows = json.loads((out / "summary.json").read_text())["tables"]["5"]["rows"]
    assert len(rows) == 3 and all(np.isfinite(r["delta_e_last"]) and np.isfinite(r["flicker_total"]) for r in rows)
    assert "ΔE2000" in (out / "table5.md").read_text()
    verdicts = {c["claim"]: c["verdict"] for c in json.loads((out / "summary.json").read_text())["claims"]}
    assert verdicts["Anchor-audio zero padding helps lip sync"] == "not evaluated"     # no sync without weights
    assert verdicts["RoPE re-indexing prevents late identity drift"] == "not evaluated"  # no csim without weights


@pytest.mark.parametrize("change, message", [
    (["--tables", "3,9"], "--tables must be"),
    (["--teacher-checkpoint", "nope.pt"], "--teacher-checkpoint nope.pt not found"),
    (["--eval-list", "missing.txt"], "eval list missing.txt not found"),
    (["--metrics", "csim"], "needs model weights"),
    (["--seconds", "0"], "--seconds must be > 0"),
])
def test_cli_one_line_errors(tmp_path, files, capsys, change, message):
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--checkpoint", str(files / "model.pt"),
            "--eval-list", str(files / "eval.txt"), "--out", str(tmp_path), *TINY]
    flag = change[0]
    if flag in argv:
        argv[argv.index(flag) + 1] = change[1]
    else:
        argv = change + argv
    assert _script().main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "summary.json").exists()


def test_eval_list_errors(tmp_path):
    (tmp_path / "bad.txt").write_text("a.png\n")
    with pytest.raises(AvatarForcingError, match="bad.txt:1: expected"):
        read_eval_list(tmp_path / "bad.txt")
    (tmp_path / "missing.txt").write_text("a.png b.wav\n")
    with pytest.raises(AvatarForcingError, match="missing.txt:1: .*a.png not found"):
        read_eval_list(tmp_path / "missing.txt")
    item = EvalItem("x", np.zeros((4, 4, 3), np.uint8), np.zeros(16000, np.float32), seconds=0.5)
    assert len(item.wav) == 8000 and item.num_frames == 12 and item.ground_truth_frames is None

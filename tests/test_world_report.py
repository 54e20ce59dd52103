"""scripts/world_report.py: the tables of results/README.md are regenerated from the benches' JSON, and stay current."""
import json
from pathlib import Path

import pytest

from helpers import load_script

ROOT = Path(__file__).resolve().parent.parent


def _load_main():
    return load_script("world_report").main


@pytest.fixture
def run(capsys):
    """world_report.py's main() in this process -> (exit status, stdout, stderr)."""
    main = _load_main()

    def call(*args):
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err
    return call


def control(name: str, effect: float, low: float, high: float, video_change: float = 1.5) -> dict:
    """A controls.json entry as scripts/world_controls.py writes it (the fields the tables read)."""
    return {"control": name, "metric": "seam_feat_total", "effect": effect, "ci_low": low, "ci_high": high,
            "detected": low > 0, "mean_clean": 0.01, "mean_control": 0.01 + effect, "video_change": video_change}


def bench(folder: Path, *entries: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "controls.json").write_text(json.dumps(list(entries)))
    return folder


def page(path: Path, *specs: str) -> Path:
    """A markdown file with one empty block per spec, between prose lines."""
    blocks = [f"<!-- world_report: {s} -->\nstale table\n<!-- /world_report -->\n" for s in specs]
    path.write_text("# Results\n\nprose before\n" + "\nprose between\n".join(blocks) + "\nprose after\n")
    return path


def test_committed_results_readme_is_current(run):
    """The stale-table guard: every generated table of results/README.md matches its JSON."""
    rc, _, err = run(ROOT / "results" / "README.md", "--check")
    assert rc == 0, f"results/README.md has stale tables:\n{err}"


def test_block_is_regenerated_once_and_check_names_a_stale_one(tmp_path, run):
    folder = bench(tmp_path / "shipped", control("context noise at t = 1000", 0.02574, 0.02011, 0.03189, 13.402),
                   control("temporal cache at wrong RoPE positions", 0.00142, -0.0011, 0.00418))
    md = page(tmp_path / "README.md", f"controls {folder}")

    rc, out, _ = run(md)
    text = md.read_text()
    assert rc == 0 and f"block 'controls {folder}' regenerated" in out
    assert "stale table" not in text and text.startswith("# Results\n\nprose before\n") and "prose after" in text
    assert ("| control | metric | harm [95 % CI] | detected | video change |\n|---|---|---|---|---|\n"
            "| context noise at t = 1000 | seam-feat ↓ | +0.0257 [+0.0201, +0.0319] | yes | 13.4 |\n"
            "| temporal cache at wrong RoPE positions | seam-feat ↓ | +0.0014 [-0.0011, +0.0042] | **no** | 1.50 |\n"
            ) in text
    assert run(md, "--check")[0] == 0

    rc, out, _ = run(md)                                        # a second run changes nothing
    assert rc == 0 and md.read_text() == text and "every block is current" in out

    bench(folder, control("context noise at t = 1000", -0.001, -0.002, 0.0005))
    rc, out, err = run(md, "--check")
    assert rc == 1 and md.read_text() == text                   # --check writes nothing
    assert err.strip().splitlines() == [
        f"{md}:4: block 'controls {folder}' is stale; run: python scripts/world_report.py {md}"]


@pytest.mark.parametrize("spec, message", [
    ("controls {tmp}/nowhere", "nowhere/controls.json not found; run scripts/world_controls.py"),
    ("tables {tmp}/shipped", "unknown kind 'tables'; use one of controls, claims, drift"),
    ("controls {tmp}/shipped rows=3-4", "rows=3-4, but"),
])
def test_errors_are_one_line_and_leave_the_file_as_it_was(tmp_path, run, spec, message):
    bench(tmp_path / "shipped", control("context noise at t = 1000", 0.026, 0.020, 0.032))
    md = page(tmp_path / "README.md", f"controls {tmp_path / 'shipped'}", spec.format(tmp=tmp_path))
    before = md.read_bytes()
    rc, out, err = run(md)
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err
    assert md.read_bytes() == before                           # the valid first block was not written either
    assert not list(tmp_path.glob(".*.tmp"))


def test_several_folders_get_one_column_each(tmp_path, run):
    old = bench(tmp_path / "teacher1500", control("context noise at t = 1000", 0.0268, 0.0215, 0.0324, 11.19),
                control("reused noise", 0.117, 0.037, 0.190, 30.8))
    new = bench(tmp_path / "shipped", control("context noise at t = 1000", 0.0257, 0.0201, 0.0319, 13.4))
    md = page(tmp_path / "README.md", f'controls {old} {new} label="old student|shipped student"',
              f"controls {old} {new}")
    assert run(md)[0] == 0
    text = md.read_text()
    assert ("| control | metric | old student | shipped student | video change (old student) | "
            "video change (shipped student) |\n|---|---|---|---|---|---|\n"
            "| context noise at t = 1000 | seam-feat ↓ | +0.0268 [+0.0215, +0.0324] yes | "
            "+0.0257 [+0.0201, +0.0319] yes | 11.2 | 13.4 |\n"
            "| reused noise | seam-feat ↓ | +0.117 [+0.037, +0.190] yes | - | 30.8 | - |\n") in text
    assert "| control | metric | teacher1500 | shipped | video change (teacher1500) | video change (shipped) |" in text

    md = page(tmp_path / "bad.md", f'controls {old} {new} label="only one"')
    rc, _, err = run(md)
    assert rc == 1 and "label= has 1 labels for 2 folders" in err


def test_drift_table_has_every_metric_and_marks_the_judged_one(tmp_path, run):
    def metric(drift):
        return {"drift": drift, "ci_low": drift - 0.01, "ci_high": drift + 0.01}
    entry = {"arm": "causal L=1", "metric": "csim: Total - Last, minus the real frames' Total - Last", "drift": -0.007,
             "ci_low": -0.017, "ci_high": 0.003, "drifts": False,
             "all_metrics": {"csim": metric(-0.007), "fid": metric(-0.062)}}
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "drift.json").write_text(json.dumps([entry]))
    md = page(tmp_path / "README.md", f"drift {tmp_path / 'v2'}")
    assert run(md)[0] == 0
    assert ("| arm | CSIM drift (judged) | FID drift | drifts |\n|---|---|---|---|\n"
            "| causal L=1 | -0.007 [-0.017, +0.003] | -0.062 [-0.072, -0.052] | no |\n") in md.read_text()

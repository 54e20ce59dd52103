"""scripts/world_strip.py: real / student / broken-student frames of one held-out case as one PNG."""
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "world_strip.py"


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_strip_rows_are_real_clean_and_each_control(tmp_path):
    out = tmp_path / "strip.png"
    r = _run("--config", "configs/demo.yaml", "--out", str(out), "--seconds", "1.0", "--every", "5",
             "--controls", "context noise at t = 1000")
    assert r.returncode == 0, r.stderr
    strip = np.asarray(Image.open(out))
    assert strip.shape == (3 * 64, 5 * 64, 3)                      # rows real, clean, control; 25 frames / 5
    rows = strip.reshape(3, 64, -1, 3).astype(int)
    from avatarforcing.world.evaluate import held_out_cases
    real = held_out_cases(1, 1.0)[0].real_frames[::5]
    assert np.array_equal(rows[0], np.concatenate(list(real), axis=1))          # the top row is the real video
    assert np.abs(rows[1] - rows[0]).mean() > 0 and np.abs(rows[2] - rows[1]).mean() > 0.05  # the control acts


def test_unknown_control_is_one_line(tmp_path):
    r = _run("--config", "configs/demo.yaml", "--out", str(tmp_path / "x.png"), "--controls", "wrong thing")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0
    assert "unknown control(s) ['wrong thing']" in r.stderr and "context noise at t = 1000" in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_missing_student_is_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("defaults: [" + str(ROOT / "configs/demo.yaml") + "]\ninference:\n  checkpoint: nope.pt\n")
    r = _run("--config", str(cfg), "--out", str(tmp_path / "x.png"))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "student checkpoint not found" in r.stderr
    assert not (tmp_path / "x.png").exists()

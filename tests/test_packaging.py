"""A non-editable install ships configs/ and the demo assets (as avatarforcing/_data/) and finds them from any folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from avatarforcing import AvatarForcingError
from avatarforcing import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "avatarforcing", "configs", "assets")
EXPECTED = ["configs/default.yaml", "configs/demo.yaml", "configs/tiny.yaml", "configs/avatarforcing.yaml",
            "configs/world/base.yaml", "assets/example.png", "assets/example.wav", "assets/demo/model.pt",
            "assets/demo/codec.pt"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="setuptools is needed to build the wheel")
    pytest.importorskip("wheel", reason="the wheel package is needed by pip wheel --no-build-isolation")
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"   # build from a copy: the build writes build/ and *.egg-info next to its sources
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "_data"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("avatarforcing-*.whl")
    return whl


def test_wheel_contains_configs_and_demo_assets(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in EXPECTED:
        assert f"avatarforcing/_data/{rel}" in names, rel
    shipped_yaml = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert {f"avatarforcing/_data/{r}" for r in shipped_yaml} <= names


def test_installed_wheel_finds_its_data_from_any_folder(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ("import avatarforcing, sys; from avatarforcing.config import load_config, resource_path;"
            "from avatarforcing.pipeline import default_config_path;"
            "assert avatarforcing.__file__.startswith(sys.argv[1]), avatarforcing.__file__;"
            "cfg = load_config('configs/demo.yaml'); print(resource_path(cfg.inference.checkpoint));"
            "print(default_config_path())")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, default = proc.stdout.split()
    data = target / "avatarforcing" / "_data"
    assert Path(model) == data / "assets/demo/model.pt" and Path(default) == data / "configs/demo.yaml"


def test_resource_path_prefers_checkout_then_installed_data(tmp_path, monkeypatch):
    assert config_mod.resource_path("configs/demo.yaml") == config_mod.REPO_ROOT / "configs/demo.yaml"
    data = tmp_path / "_data"
    (data / "configs").mkdir(parents=True)
    (data / "configs" / "demo.yaml").write_text("{}\n")
    monkeypatch.setattr(config_mod, "REPO_ROOT", tmp_path / "no_checkout")
    monkeypatch.setattr(config_mod, "DATA_ROOT", data)
    monkeypatch.chdir(tmp_path)
    assert config_mod.resource_path("configs/demo.yaml") == data / "configs" / "demo.yaml"
    assert config_mod.resolve_path("configs/demo.yaml") == data / "configs" / "demo.yaml"
    with pytest.raises(AvatarForcingError) as err:
        config_mod.resource_path("assets/example.wav")
    assert "assets/example.wav not found" in str(err.value) and "\n" not in str(err.value)
    assert config_mod.resource_path("assets/example.wav", required=False) == tmp_path / "no_checkout/assets/example.wav"

"""Layering: the core package never imports the synthetic world or scripts/; backends plug in via the registry.

Core = every module under avatarforcing/ except avatarforcing/world/ (avatarforcing/train/ is core).  The only
place the core may name the world is the plugin table of avatarforcing/backends.py (ENTRY_POINTS), which the
registry imports on the first lookup of a built-in kind.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from avatarforcing import AvatarForcingError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "avatarforcing"
WORLD = PACKAGE / "world"
REGISTRY = PACKAGE / "backends.py"
CORE = sorted(p for p in PACKAGE.rglob("*.py") if WORLD not in p.parents)
LOADERS = {"spec_from_file_location", "SourceFileLoader", "run_path", "load_source", "exec_module"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of a (possibly relative) ``from X import ...``."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _bad_module(name: str) -> bool:
    return name == "avatarforcing.world" or name.startswith("avatarforcing.world.") or \
        name == "scripts" or name.startswith("scripts.")


def _imports(path: Path):
    """(line, imported module) of every static import, with ``from avatarforcing import world`` expanded."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(path, node)
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def _dynamic_imports(tree: ast.AST):
    """(line, string literal) of every import_module / __import__ call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                yield node.lineno, str(node.args[0].value)


def _registry_table_lines() -> set[int]:
    """Lines of the ENTRY_POINTS table in backends.py (the one allowed mention of the world)."""
    for node in ast.parse(REGISTRY.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                       else None)
        if isinstance(target, ast.Name) and target.id == "ENTRY_POINTS":
            return set(range(node.lineno, node.end_lineno + 1))
    raise AssertionError("avatarforcing/backends.py has no ENTRY_POINTS table")


def test_core_modules_are_found():
    names = {_module_name(p) for p in CORE}
    assert {"avatarforcing.metrics", "avatarforcing.vae", "avatarforcing.pipeline", "avatarforcing.backends",
            "avatarforcing.train.loop"} <= names
    assert not any(n.startswith("avatarforcing.world") for n in names)


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_does_not_import_world_or_scripts(path: Path):
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {name}" for line, name in _imports(path) if _bad_module(name)]
    assert not bad, "core modules must not import avatarforcing.world or scripts/ (register a backend in " \
                    "avatarforcing/backends.py instead):\n" + "\n".join(bad)


@pytest.mark.parametrize("path", CORE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_has_no_dynamic_world_imports(path: Path):
    allowed = _registry_table_lines() if path == REGISTRY else set()
    tree = ast.parse(path.read_text(), str(path))
    bad = [f"{line}: import_module({name!r})" for line, name in _dynamic_imports(tree)
           if "world" in name or "scripts" in name]
    # string literals naming the world's modules (fed to import_module indirectly) outside the plugin table
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.lineno not in allowed:
            if _bad_module(node.value) or node.value.startswith(("avatarforcing.world.", "scripts.")):
                bad.append(f"{node.lineno}: module name {node.value!r}")
    assert not bad, f"{path.relative_to(ROOT)} names a world / scripts module outside the registry's ENTRY_POINTS:\n" \
                    + "\n".join(bad)


def test_registry_table_is_the_only_world_entry():
    from avatarforcing import backends
    assert backends.ENTRY_POINTS == {"world": "avatarforcing.world", "world_v2": "avatarforcing.world"}
    assert _registry_table_lines()


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_package_loads_nothing_from_scripts(path: Path):
    """No module of the package (world included) executes files of scripts/ (importlib / runpy file loaders,
    or paths built from a "scripts" folder)."""
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in LOADERS:
                bad.append(f"{node.lineno}: {name}(...)")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):       # REPO_ROOT / "scripts" / ...
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str) and \
                        side.value.strip("/").split("/")[0] == "scripts":
                    bad.append(f"{node.lineno}: path into scripts/")
    assert not bad, f"{path.relative_to(ROOT)} loads code from files:\n" + "\n".join(bad)


def test_importing_the_core_does_not_import_the_world():
    code = ("import sys, avatarforcing.pipeline, avatarforcing.metrics, avatarforcing.vae, avatarforcing.backends; "
            "print(sorted(m for m in sys.modules if m.startswith(('avatarforcing.world', 'scripts'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_world_kind_resolves_without_importing_the_world():
    """vae.kind: world works from a fresh interpreter that never imports avatarforcing.world by hand."""
    code = ("from omegaconf import OmegaConf; from avatarforcing.vae import build_vae; "
            "v = build_vae(OmegaConf.create({'kind': 'world', 'z_dim': 16})); print(type(v).__module__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "avatarforcing.world.codec", out.stdout + out.stderr


def test_unknown_kind_lists_known_kinds():
    from avatarforcing.backends import metric_backend
    from avatarforcing.vae import build_vae
    with pytest.raises(AvatarForcingError) as info:
        build_vae(OmegaConf.create({"kind": "nope"}))
    msg = str(info.value)
    assert "\n" not in msg and "'nope'" in msg and "wan" in msg and "world" in msg
    with pytest.raises(AvatarForcingError, match="known kinds"):
        metric_backend("nope")


def test_registered_backend_is_used(monkeypatch):
    """A third-party codec registers through the same interface as the world's."""
    from avatarforcing import backends
    from avatarforcing.vae import build_vae
    monkeypatch.setattr(backends, "_VAE", dict(backends._VAE))
    sentinel = object()
    backends.register_vae("mine", lambda cfg: (sentinel, cfg["z_dim"]))
    assert build_vae(OmegaConf.create({"kind": "mine", "z_dim": 3})) == (sentinel, 3)
    assert "mine" in backends.vae_kinds()


def test_world_registers_through_the_registry():
    import avatarforcing.world  # noqa: F401
    from avatarforcing import backends
    from avatarforcing.world.metric_nets import METRIC_BACKEND
    assert "world" in backends._VAE and backends.metric_backend("world") is METRIC_BACKEND

"""Build hook: ship the repository's configs/ and demo assets inside the package, as avatarforcing/_data/.

A checkout finds them at the repository root; an installed package (``pip install .``, not editable) finds
them through :func:`avatarforcing.config.resource_path`, which falls back to avatarforcing/_data/.
Everything else about the package is declared in pyproject.toml.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("configs/**/*.yaml", "assets/example.png", "assets/example.wav", "assets/demo/*", "assets/world_v2/*",
           "assets/world_anchor/*")


def shipped_files() -> list[Path]:
    return sorted({p for pattern in SHIPPED for p in ROOT.glob(pattern) if p.is_file()})


class build_py_with_data(build_py):
    """build_py, plus configs/ and assets/ copied to <build>/avatarforcing/_data/ (editable installs skip it:
    they read the checkout's own files)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for src in shipped_files():
            dst = Path(self.build_lib) / "avatarforcing" / "_data" / src.relative_to(ROOT)
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst))

    def get_outputs(self, include_bytecode=True):
        extra = [str(Path(self.build_lib) / "avatarforcing" / "_data" / p.relative_to(ROOT)) for p in shipped_files()]
        return super().get_outputs(include_bytecode) + ([] if getattr(self, "editable_mode", False) else extra)


setup(cmdclass={"build_py": build_py_with_data})

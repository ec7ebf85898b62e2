"""No module of ours may share a name with an installed package's top-level module.

A script folder put at the front of `sys.path` hides any installed package of the same name from every
import that follows (a `benchmarks/kernels.py` once hid the `kernels` package that transformers imports).
Benchmarks run as modules of the `benchmarks` package (`python -m benchmarks.X`), which puts only the
repository root on `sys.path`; this test guards both that root and the script folders.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = {"eet_pipe"}  # our own distribution's top-level package


def installed_top_level() -> set[str]:
    """Top-level module names provided by installed distributions, plus the standard library's."""
    names = {name for name, dists in md.packages_distributions().items() if not OURS & {d.lower() for d in dists}}
    return (names | set(sys.stdlib_module_names)) - OURS


def module_names(folder: Path) -> set[str]:
    """Names importable from `folder` if it were on sys.path: modules and packages."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names - {"__init__", "__main__", "conftest"}


def clashes(folder: Path, installed: set[str]) -> set[str]:
    return module_names(folder) & installed


def test_no_name_under_the_root_or_a_script_folder_shadows_an_installed_module():
    installed = installed_top_level()
    found = {f"{folder.relative_to(ROOT) if folder != ROOT else '.'}/{name}"
             for folder in (ROOT, ROOT / "benchmarks", ROOT / "tests", ROOT / "launch")
             for name in clashes(folder, installed)}
    assert not found, f"these names shadow installed modules when their folder is on sys.path: {sorted(found)}"


def test_the_check_sees_a_shadowing_script(tmp_path):
    """The detector itself: a script named after an installed package (here `kernels`, which transformers
    depends on, or `pytest` where that is absent) is found."""
    installed = installed_top_level()
    victim = "kernels" if "kernels" in installed else "pytest"
    (tmp_path / f"{victim}.py").write_text("")
    (tmp_path / "our_own_script.py").write_text("")
    assert clashes(tmp_path, installed) == {victim}

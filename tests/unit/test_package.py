"""The package's face: `import eet_pipe` is light, and every public name resolves."""

from __future__ import annotations

import subprocess
import sys

import pytest

import eet_pipe


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(out.split())


def test_import_is_light():
    loaded = _modules_after("import eet_pipe")
    assert "eet_pipe" in loaded
    assert not {"torch", "torch.distributed", "eet_pipe.runtime", "eet_pipe.runtime.worker"} & loaded


def test_pipeline_engine_from_the_package_root():
    loaded = _modules_after("from eet_pipe import PipelineEngine\nassert PipelineEngine.__name__ == 'PipelineEngine'")
    assert "eet_pipe.runtime.engine" in loaded


@pytest.mark.parametrize("name", sorted(set(eet_pipe.__all__) - {"__version__"}))
def test_every_public_name_resolves(name):
    value = getattr(eet_pipe, name)
    assert getattr(value, "__name__", name) == name
    assert name in dir(eet_pipe)


def test_unknown_names_and_subpackages():
    with pytest.raises(AttributeError, match="no_such_thing"):
        eet_pipe.no_such_thing  # noqa: B018
    assert eet_pipe.schedule.__name__ == "eet_pipe.schedule"


def test_all_lists_exactly_the_lazy_exports():
    assert set(eet_pipe.__all__) == set(eet_pipe._EXPORTS) | {"__version__"}


ROOT = __import__("pathlib").Path(eet_pipe.__file__).parent


def test_the_root_holds_only_entry_points_and_parts():
    """The package root is its face: the entry points (`eet-pipe`, `python -m eet_pipe.serve`) and
    `__init__`; every other module lives in the folder of the part it belongs to."""
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert modules == ["__init__.py", "cli.py", "serve.py"]
    parts = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert parts == ["compare", "generation", "loading", "models", "ops", "options", "partition", "runtime",
                     "schedule", "serving", "weights"]


def _module_imports() -> dict[str, set[str]]:
    """eet_pipe module -> the eet_pipe modules it imports at module level (TYPE_CHECKING blocks and
    imports inside functions excluded: those run later and cannot form an import cycle)."""
    import ast

    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("eet_pipe"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("eet_pipe")}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_import_cycle():
    graph = _module_imports()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, path + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_the_runtime_never_imports_the_http_layer():
    graph = _module_imports()
    for name, deps in graph.items():
        if name.startswith(("eet_pipe.runtime", "eet_pipe.models", "eet_pipe.schedule", "eet_pipe.weights")):
            assert not {d for d in deps if d.startswith("eet_pipe.serving")}, name

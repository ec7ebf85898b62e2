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

"""The transparency grids' shared fixture: per grid row, the single-process model and a CPU pipeline of it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import eet_pipe
from eet_pipe.runtime import PipelineEngine

Row = tuple[str, int, str, int]
"""(model fixture name, stages, schedule, virtual chunks per stage)."""


def pipeline_cases(grid: list[Row]) -> Callable:
    """A module-scoped fixture over `grid` yielding (checkpoint path, single-process model, engine, schedule);
    engines are reused across a module's tests so the grid stays fast on two CPU cores."""

    @pytest.fixture(scope="module", params=grid, ids=lambda p: f"{p[0][:-4]}-P{p[1]}-{p[2]}")
    def case(request):
        fixture, stages, schedule, virtual = request.param
        path = request.getfixturevalue(fixture)
        single = eet_pipe.from_pretrained(str(path))
        engine = PipelineEngine(str(path), devices=["cpu"] * stages, schedule=schedule, virtual=virtual, plan="even",
                                timeout=120)
        yield path, single, engine, schedule
        engine.close()

    return case

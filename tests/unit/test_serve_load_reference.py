"""serve_load's reference=<file>: an earlier run's engine figures, only where they measured the same engine."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("aiohttp")

from benchmarks.serve_load import DEFAULTS, compare, reference_from  # noqa: E402

ENGINE = {"tokens": 4096, "wall_s": 0.5, "tokens_per_s": 8192.0, "step_s": 0.004, "groups": 2}


def _opts(**changes) -> dict:
    return {**DEFAULTS, "model": "gpt2-xl", "stages": 1, "server_args": "weights=random dtype=fp16 max_seq=192",
            **changes}


def _write(path, config: dict, with_engine: bool = True) -> None:
    levels = [{"concurrency": 64, "tokens_per_s": 7000.0, **({"engine": ENGINE} if with_engine else {})},
              {"concurrency": 1, "tokens_per_s": 300.0}]
    path.write_text(json.dumps({"env": {}, "config": config, "results": levels}))


def test_same_engine_gives_its_figures_and_the_ratios(tmp_path):
    path = tmp_path / "first.json"
    _write(path, _opts())
    # server-only options (HTTP processes, parser) may differ: they are what a variant changes
    ref = reference_from(path, _opts(server_args="weights=random dtype=fp16 max_seq=192 api_servers=2 http_parser=h11"))
    assert ref == {64: ENGINE}
    levels = [{"concurrency": 64, "tokens_per_s": 4096.0, "tpot_s": {"p50": 0.002}},
              {"concurrency": 1, "tokens_per_s": 300.0, "tpot_s": {"p50": 0.002}}]
    compare(levels, ref)
    assert levels[0]["server_over_engine"] == pytest.approx(0.5) and "engine" not in levels[1]
    assert levels[0]["tpot_p50_over_engine_step"] == pytest.approx(0.5)


@pytest.mark.parametrize("changes, named", [
    ({"model": "gpt2"}, "model"),
    ({"stages": 2}, "stages"),
    ({"max_tokens": 128}, "max_tokens"),
    ({"server_args": "weights=random dtype=bf16 max_seq=192"}, "engine options"),
])
def test_another_engine_is_refused_naming_what_differs(tmp_path, changes, named):
    path = tmp_path / "first.json"
    _write(path, _opts())
    with pytest.raises(SystemExit, match=named):
        reference_from(path, _opts(**changes))


def test_a_file_without_engine_figures_or_not_a_run_is_refused(tmp_path):
    path = tmp_path / "off.json"
    _write(path, _opts(), with_engine=False)
    with pytest.raises(SystemExit, match="no engine figures"):
        reference_from(path, _opts())
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a serve_load JSON"):
        reference_from(tmp_path / "junk.json", _opts())
    with pytest.raises(SystemExit, match="not a serve_load JSON"):
        reference_from(tmp_path / "missing.json", _opts())

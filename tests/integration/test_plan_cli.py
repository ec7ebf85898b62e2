"""`eet-pipe plan` and plan="auto" through the public entry points: the CLI writes a plan JSON, and
`PipelineEngine` runs auto and JSON plans with the same output as the single-device model."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eet_pipe
from eet_pipe.cli import main
from eet_pipe.generation.sequences import pad_prompts
from eet_pipe.loading.presets import resolve_model
from eet_pipe.partition import Plan
from eet_pipe.partition import profile as profile_mod
from eet_pipe.partition.plan_options import PlanOptions
from eet_pipe.partition.sizes import unit_bytes
from eet_pipe.runtime import PipelineEngine

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 33, 9, 41, 3, 77, 12], [8, 13], [100, 3, 4, 5, 6]]
UNITS = ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"]


@pytest.fixture(scope="module")
def cli_plan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`python -m eet_pipe.cli plan ... --out plan.json` in a subprocess; (plan path, stdout)."""
    tmp = tmp_path_factory.mktemp("plan_cli")
    out = tmp / "plan.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "eet_pipe.cli", "plan", "model=tiny", "devices=cpu,cpu",
                           "schedule=gpipe", "microbatches=1", "seq=64", f"cache_dir={tmp / 'profiles'}",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return out, done.stdout


@pytest.fixture(scope="module")
def single() -> eet_pipe.LanguageModel:
    return eet_pipe.from_pretrained("tiny")


def _same_as_single(engine: PipelineEngine, single: eet_pipe.LanguageModel) -> None:
    ids, mask = pad_prompts(PROMPTS)
    out = engine.forward(ids, mask, microbatches=1)
    ref = single.forward(ids, mask)
    assert out.shape == ref.shape
    assert torch.equal(out[mask], ref[mask]), f"max diff {(out - ref)[mask].abs().max()}"


def _check_contents(plan: Plan) -> None:
    """The plan against the model's units: each placed once, in order, every layer somewhere, and each
    stage's predicted memory (its parameters' bytes computed from the config) within its device's memory."""
    cfg = resolve_model("tiny").cfg
    placed = [u for st in plan.stages for u in st.units]
    assert placed == UNITS == cfg.unit_names()  # every unit exactly once, in model order
    assert all(st.units for st in plan.stages) and plan.stages[0].units[0] == "embed" and plan.stages[-1].units[-1] == "head"
    counts = [len(plan.layer_range(s)) for s in range(len(plan.stages))]
    assert sum(counts) == cfg.num_layers and all(c >= 1 for c in counts)
    for st in plan.stages:
        mem = st.predicted_mem
        assert st.predicted_time_s > 0 and mem["total"] == st.predicted_mem_bytes > 0
        assert mem["params"] == sum(unit_bytes(cfg, u, "fp32") for u in st.units)
        assert mem["kv"] == 0  # a prefill plan holds no KV cache
        assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
        assert st.mem_cap_bytes is not None and mem["total"] <= st.mem_cap_bytes


def test_cli_writes_the_plan(cli_plan) -> None:
    path, stdout = cli_plan
    plan = Plan.from_json(path)
    plan.check(UNITS, ["cpu", "cpu"], model="tiny")
    assert plan.schedule == "gpipe" and plan.microbatches == 1 and plan.dtype == "fp32"
    _check_contents(plan)
    assert plan.predicted_bubble is not None and plan.predicted_makespan_s is not None
    assert plan.profile_key.startswith("tiny@") and plan.profile_key.endswith("/cpu/fp32/prefill-1x64")
    assert stdout.startswith("plan: tiny fp32, schedule gpipe")
    for text in ("pred ms", "of GiB", "profile (one microbatch: prefill-1x64)", "(measured now)", "devices:",
                 "memory per stage (bytes in GiB):", "stage 0 cpu: params", "bytes spare)",
                 "stage 0 cpu -> stage 1 cpu: LOCAL", "link kinds", f"wrote {path}"):
        assert text in stdout, f"{text!r} not in the output:\n{stdout}"


def test_cli_help_lists_every_field(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["plan", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(PlanOptions):
        assert f"  {f.name}=" in text, f"--help does not list {f.name}"
    assert "--out" in text


def test_cli_rejects_bad_options(capsys) -> None:
    assert main(["plan", "schedule=1f1b"]) == 2
    assert "schedule='1f1b' is invalid" in capsys.readouterr().err
    assert main(["plan", "bogus=1"]) == 2
    assert "unknown option 'bogus'" in capsys.readouterr().err


def test_engine_auto_plan_equals_single_device(single, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(profile_mod, "default_cache_dir", lambda: tmp_path)
    with PipelineEngine("tiny", devices=["cpu", "cpu"], plan="auto", microbatches=1, timeout=120) as engine:
        engine.plan.check(UNITS, ["cpu", "cpu"])
        _check_contents(engine.plan)
        assert engine.plan.predicted_bottleneck_s is not None and engine.plan.profile_key.startswith("tiny@")
        assert list(tmp_path.glob("tiny_*.json")), "plan='auto' should have cached its profile"
        _same_as_single(engine, single)


def test_engine_runs_the_cli_plan_file(cli_plan, single) -> None:
    path, _ = cli_plan
    with PipelineEngine("tiny", devices=["cpu", "cpu"], plan=str(path), microbatches=1, timeout=120) as engine:
        assert engine.plan.to_dict() == Plan.from_json(path).to_dict()
        _same_as_single(engine, single)

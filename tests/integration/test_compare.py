"""The precision comparison tool (`eet_pipe.compare.core`): sides, points, tolerances, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eet_pipe
from eet_pipe.compare import core as compare_mod
from eet_pipe.compare.cli import main
from eet_pipe.compare.core import Side, compare
from eet_pipe.compare.points import MissingPointError, point_names
from eet_pipe.generation.sequences import pad_prompts
from tests.hf_models import mistral_dir, qwen2_dir, qwen3_dir  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[5, 17, 33, 9, 41, 3, 77, 12, 5, 6], [8, 13, 40, 99]]  # left-padded: 10 and 4 tokens


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return pad_prompts(PROMPTS)


def test_identical_sides_pass_with_zero_error(gpt2_dir, batch):
    report = compare(Side("eet", str(gpt2_dir)), Side("eet", str(gpt2_dir)), *batch)
    cfg = eet_pipe.from_pretrained(str(gpt2_dir)).cfg
    assert [r.name for r in report.rows] == point_names(cfg)
    assert report.passed and report.first_failure is None
    assert all(r.max_abs == 0 and r.mean_abs == 0 for r in report.rows)
    assert report.summary() == f"all {len(report.rows)} points pass"
    assert report.row("layers.0.attn.probs").shape == (2, 25, 10, 10)


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir", "bert_dir"])
def test_eet_matches_hf_at_every_point(fixture, request, batch):
    path = str(request.getfixturevalue(fixture))
    report = compare(Side("hf", path), Side("eet", path), *batch)
    assert report.passed, report.table()
    assert {r.tol for r in report.rows} == {1e-4}  # fp32 vs fp32: absolute
    names = [r.name for r in report.rows]
    assert names == point_names(eet_pipe.from_pretrained(path).cfg)
    assert ("layers.5.mlp.gate" in names) == (fixture == "llama_dir")
    assert ("pooler" in names) == (fixture == "bert_dir")
    last = "pooler" if fixture == "bert_dir" else "head"
    assert 0 < report.row(last).max_abs  # two implementations, not one model compared with itself
    assert all(r.cosine > 0.99999 for r in report.rows)


def test_perturbed_weight_is_the_first_divergence(llama_dir, batch):
    """One changed weight of layers.3.mlp.up: everything before it passes, it fails first."""
    lm = eet_pipe.from_pretrained(str(llama_dir))
    with torch.no_grad():
        lm.model.layers["3"].mlp.up.weight[5, 7] += 0.5
    report = compare(Side("hf", str(llama_dir)), Side("eet", lm), *batch, topk=3)
    first = report.first_failure
    assert first is not None and first.name == "layers.3.mlp.up", report.table()
    names = [r.name for r in report.rows]
    assert all(r.passed for r in report.rows[:names.index("layers.3.mlp.up")])
    assert not report.row("layers.3").passed and not report.row("head").passed
    assert report.row("layers.3.mlp.gate").passed  # the gate projection does not read mlp.up
    assert len(first.worst) == 3 and {w["index"][-1] for w in first.worst} == {5}  # output feature 5
    assert report.summary().startswith(f"first divergence: layers.3.mlp.up (max-abs {first.max_abs:.1e})")
    marked = [line for line in report.table().splitlines() if line.startswith(">> ")]
    assert len(marked) == 1 and marked[0].split()[1] == "layers.3.mlp.up" and marked[0].endswith("FAIL")


def test_fp16_error_grows_with_depth(llama_dir, batch):
    report = compare(Side("eet", str(llama_dir)), Side("eet", str(llama_dir), dtype="fp16"), *batch)
    first, last = report.row("layers.0"), report.row("layers.5")
    assert 0 < first.max_abs < last.max_abs
    assert report.passed, report.table()  # within 2e-2 * scale
    assert min(r.tol for r in report.rows) == pytest.approx(2e-2)  # 2e-2 * max(1, max |a|): probs have scale 1


def test_pipeline_equals_single_process_exactly(llama_dir, batch):
    report = compare(Side("eet", str(llama_dir)), Side.parse("eet:stages=2", str(llama_dir)), *batch)
    assert report.passed
    bad = [(r.name, r.max_abs) for r in report.rows if r.max_abs != 0]
    assert not bad, bad
    assert len(report.rows) == len(point_names(eet_pipe.from_pretrained(str(llama_dir)).cfg))


def test_reference_ops_side_runs_and_restores_dispatch(gpt2_dir, batch):
    before = eet_pipe.ops._kernel
    report = compare(Side("eet", str(gpt2_dir)), Side.parse("eet:ops=reference", str(gpt2_dir)), *batch,
                     points=["layers.1"])
    assert report.passed and eet_pipe.ops._kernel is before
    assert [r.name for r in report.rows][:2] == ["layers.1.attn.norm", "layers.1.attn.q"]


def test_errors_name_the_problem(gpt2_dir, llama_dir, batch):
    with pytest.raises(MissingPointError, match=r"side a \(hf fp32 cpu\) has no point 'layers\.0\.mlp\.gate'"):
        compare(Side("hf", str(gpt2_dir)), Side("eet", str(gpt2_dir)), *batch, points=["layers.0.mlp.gate"])
    with pytest.raises(MissingPointError, match=r"side a \(eet fp32 cpu\) has no point 'layers\.0\.mlp\.gate'"):
        compare(Side("eet", str(gpt2_dir)), Side("hf", str(gpt2_dir)), *batch, points=["layers.0.mlp.gate"])
    with pytest.raises(ValueError, match="different models.*hidden_size: a=500 b=160"):
        compare(Side("eet", str(gpt2_dir)), Side("eet", str(llama_dir)), *batch)
    with pytest.raises(ValueError, match=r"point head: shapes differ: side a \(1, 2, 3\) vs side b \(1, 2, 4\)"):
        compare_mod._compare_point("head", torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=bool),
                                   lambda s: 1e-4, 0)
    assert Side.parse("eet:model=/other,dtype=bf16", str(gpt2_dir)).model == "/other"
    with pytest.raises(ValueError, match="ops=reference cannot be combined with stages>1"):
        Side.parse("eet:stages=2,ops=reference", str(gpt2_dir))
    with pytest.raises(ValueError, match="'nope'.*names no comparison point"):
        compare(Side("eet", str(gpt2_dir)), Side("eet", str(gpt2_dir)), *batch, points=["nope"])


def test_cli_usage_errors_exit_2(gpt2_dir, capsys):
    assert main([f"model={gpt2_dir}", "ids=1,2", "points=layers.0.mlp.gate"]) == 2
    assert "side a (hf fp32 cpu) has no point 'layers.0.mlp.gate'" in capsys.readouterr().err
    assert main([f"model={gpt2_dir}", "ids=1,2", "a=torch"]) == 2
    assert "side kind 'torch' is invalid" in capsys.readouterr().err
    assert main([f"model={gpt2_dir}"]) == 2
    assert "prompt=" in capsys.readouterr().err
    assert main([f"model={gpt2_dir}", "ids=1,2", "colour=red"]) == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "eet_pipe.compare", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


def test_cli_prints_the_table_and_exits_0(gpt2_dir):
    proc = _cli(f"model={gpt2_dir}", "a=hf", "b=eet", "ids=5,17,33,9,41,3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "all 75 points pass"
    assert any(line.split()[:2] == ["layers.2.attn.probs", "1x25x6x6"] and line.endswith("PASS") for line in lines)


def test_cli_json_reports_failures_with_exit_1(gpt2_dir):
    proc = _cli(f"model={gpt2_dir}", "ids=5,17,33", "points=layers.0,head", "tol=0", "--json", "--topk", "2")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    failing = [r for r in data["rows"] if not r["passed"]]
    assert data["passed"] is False and data["first_failure"] == failing[0]["name"]
    assert data["rows"][-1]["name"] == "head" and all(len(r["worst"]) == 2 for r in failing)
    assert data["summary"].startswith(f"first divergence: {failing[0]['name']} (max-abs ")


@pytest.mark.parametrize("fixture", ["mistral_dir", "qwen2_dir", "qwen3_dir"])
def test_new_decoders_match_hf_at_every_point(fixture, request, batch):
    """Including the attention probabilities past Mistral's and Qwen2's sliding windows (10 tokens, windows 6
    and 5) and Qwen3's per-head q/k norm outputs; HF module names come from the weight tables."""
    path = str(request.getfixturevalue(fixture))
    report = compare(Side("hf", path), Side("eet", path), *batch)
    assert report.passed, report.table()
    names = [r.name for r in report.rows]
    assert names == point_names(eet_pipe.from_pretrained(path).cfg)
    assert ("layers.3.attn.q_norm" in names) == ("layers.3.attn.k_norm" in names) == (fixture == "qwen3_dir")
    assert 0 < report.row("head").max_abs
    if fixture == "qwen3_dir":
        assert report.row("layers.1.attn.q_norm").shape == (2, 10, 4, 32)
        assert report.row("layers.1.attn.k_norm").shape == (2, 10, 2, 32)


def test_perturbed_k_norm_is_the_first_divergence(qwen3_dir, batch):  # noqa: F811
    lm = eet_pipe.from_pretrained(str(qwen3_dir))
    with torch.no_grad():
        lm.model.layers["2"].attn.k_norm.weight[3] += 0.5
    report = compare(Side("hf", str(qwen3_dir)), Side("eet", lm), *batch)
    assert report.first_failure is not None and report.first_failure.name == "layers.2.attn.k_norm", report.table()
    assert report.row("layers.2.attn.q_norm").passed and report.row("layers.2.attn.k").passed
    assert not report.row("layers.2.attn.probs").passed  # recomputed from the normalised k


def test_q_norm_points_exist_only_where_the_model_has_them(llama_dir, batch):
    with pytest.raises(MissingPointError, match=r"side a \(hf fp32 cpu\) has no point 'layers\.0\.attn\.q_norm'"):
        compare(Side("hf", str(llama_dir)), Side("eet", str(llama_dir)), *batch, points=["layers.0.attn.q_norm"])


def test_pipelined_qwen3_equals_single_process_exactly(qwen3_dir, batch):  # noqa: F811
    report = compare(Side("eet", str(qwen3_dir)), Side.parse("eet:stages=2", str(qwen3_dir)), *batch,
                     points=["layers.1", "layers.2", "head"])
    assert report.passed and not [(r.name, r.max_abs) for r in report.rows if r.max_abs != 0]
    assert "layers.2.attn.k_norm" in [r.name for r in report.rows]

"""Profiler and auto planner on CPU: workloads, measured costs, the cache, keys, auto_plan, predictions."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from eet_pipe.loading.presets import resolve_model
from eet_pipe.loading.units import load_units
from eet_pipe.partition import (
    DeviceInfo,
    DeviceSpec,
    LinkMatrix,
    MemoryBudget,
    Plan,
    PlanInputs,
    Profile,
    Topology,
    UnitCost,
    Workload,
    auto_plan,
    plan_from_inputs,
    profile_units,
)
from eet_pipe.partition import profile as profile_mod
from eet_pipe.partition.plan_options import PlanOptions
from eet_pipe.partition.profile import cache_path, profile_key

SMALL = Workload("prefill", 2, 16)
FP32 = 4


@pytest.fixture(scope="module")
def spec():
    return resolve_model("tiny")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Profiles go to a fresh folder (the default one is left alone)."""
    monkeypatch.setattr(profile_mod, "default_cache_dir", lambda: tmp_path)
    return tmp_path


def _no_measuring(*args, **kwargs):
    raise AssertionError("a unit was measured although a cached profile should have been used")


def test_workload_validation_and_shape(spec) -> None:
    assert Workload().shape == "prefill-1x512" and Workload("decode", 8, context=1024).shape == "decode-8x1@1024"
    assert Workload("decode", 4, context=9).new_tokens == 1 and SMALL.new_tokens == 16
    for bad, field in ((dict(kind="train"), "kind"), (dict(batch=0), "batch"), (dict(seq=0), "seq"),
                       (dict(kind="decode", context=-1), "context")):
        with pytest.raises(ValueError, match=f"Workload.{field}"):
            Workload(**bad)
    with pytest.raises(ValueError, match="max positions 512"):
        Workload("prefill", 1, 513).check(spec.cfg)
    with pytest.raises(ValueError, match="context=512"):
        Workload("decode", 1, context=512).check(spec.cfg)


def test_prefill_profile_costs(spec, cache) -> None:
    prof = profile_units(spec, "cpu", "fp32", SMALL, warmup=1, repeats=3)
    cfg = spec.cfg
    assert prof.measured and [u.name for u in prof.units] == cfg.unit_names()
    assert prof.key == profile_key(spec, "cpu", "fp32", SMALL) and prof.device_name == "cpu" and prof.dtype == "fp32"
    by = {u.name: u for u in prof.units}
    layers = [u for u in prof.units if u.name.startswith("layers.")]
    assert len({(u.time_s, u.param_bytes, u.act_bytes, u.temp_bytes) for u in layers}) == 1  # layers.0 reused
    assert all(u.time_s > 0 for u in prof.units)
    hidden = 2 * 16 * cfg.hidden_size * FP32  # [B, S, H] fp32
    assert by["embed"].act_bytes == hidden and layers[0].act_bytes == hidden
    assert by["head"].act_bytes == 2 * 16 * cfg.vocab_size * FP32  # logits [B, S, V]
    assert layers[0].kv_bytes_per_token == 2 * cfg.num_kv_heads * cfg.head_dim * FP32
    assert by["embed"].kv_bytes_per_token == 0 and by["head"].kv_bytes_per_token == 0
    assert by["embed"].param_bytes == (cfg.vocab_size + cfg.max_positions) * cfg.hidden_size * FP32
    layer = load_units(spec, ["layers.0"], torch.float32, "cpu")
    assert layers[0].param_bytes == sum(p.numel() * 4 for p in layer.parameters())
    assert layers[0].temp_bytes > hidden  # qkv + scores + MLP intermediate
    assert prof.info["measured_units"] == ["embed", "layers.0", "head"] and "reuse" in prof.info["note"]


def test_decode_profile_sends_one_token(spec, cache) -> None:
    prof = profile_units(spec, "cpu", "fp32", Workload("decode", 3, context=10), warmup=1, repeats=3)
    by = {u.name: u for u in prof.units}
    assert by["layers.0"].act_bytes == 3 * 1 * spec.cfg.hidden_size * FP32
    assert by["head"].act_bytes == 3 * 1 * spec.cfg.vocab_size * FP32
    assert "decode-3x1@10" in prof.key


def test_second_call_reads_the_cache(spec, cache, monkeypatch) -> None:
    first = profile_units(spec, "cpu", "fp32", SMALL, warmup=1, repeats=3)
    path = cache_path(first.key)
    assert first.measured and path.exists() and path.parent == cache
    monkeypatch.setattr(profile_mod, "_measure_unit", _no_measuring)
    second = profile_units(spec, "cpu", "fp32", SMALL)
    assert not second.measured and second.units == first.units and second.key == first.key
    with pytest.raises(AssertionError, match="was measured"):  # refresh measures again
        profile_units(spec, "cpu", "fp32", SMALL, refresh=True)
    with pytest.raises(AssertionError, match="was measured"):  # another workload is another key
        profile_units(spec, "cpu", "fp32", Workload("prefill", 1, 16))


def test_a_profile_cached_before_shared_bytes_gets_them_from_the_config(spec, cache, monkeypatch) -> None:
    first = profile_units(spec, "cpu", "fp32", SMALL, warmup=0, repeats=1)
    head = next(u for u in first.units if u.name == "head")
    assert spec.cfg.tie_embeddings and head.shared_bytes == spec.cfg.vocab_size * spec.cfg.hidden_size * FP32
    path = cache_path(first.key)
    data = json.loads(path.read_text())
    for unit in data["units"]:
        del unit["shared_bytes"]  # as an older version wrote it
    path.write_text(json.dumps(data))
    monkeypatch.setattr(profile_mod, "_measure_unit", _no_measuring)
    assert profile_units(spec, "cpu", "fp32", SMALL).units == first.units


def test_json_round_trip_and_format(spec, cache, tmp_path) -> None:
    prof = profile_units(spec, "cpu", "fp32", SMALL, warmup=1, repeats=3)
    back = Profile.from_json(cache_path(prof.key), expected_key=prof.key)
    assert back.to_dict() == prof.to_dict() and back.workload == SMALL
    with pytest.raises(ValueError, match="format 7"):
        Profile.from_dict({**prof.to_dict(), "format": 7})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Profile.from_json(bad)


def test_profile_of_another_model_or_dtype_is_rejected(spec, cache, monkeypatch) -> None:
    prof = profile_units(spec, "cpu", "fp32", SMALL, warmup=1, repeats=3)
    path = cache_path(prof.key)
    other = resolve_model("gpt2", "random")
    with pytest.raises(ValueError) as err:
        Profile.from_json(path, expected_key=profile_key(other, "cpu", "fp32", SMALL))
    assert prof.key in str(err.value) and "gpt2@" in str(err.value)
    monkeypatch.setattr(profile_mod, "_measure_unit", _no_measuring)
    with pytest.raises(ValueError) as err:  # same model, other dtype: both keys named, nothing measured
        auto_plan(spec, ["cpu", "cpu"], "bf16", "gpipe", 1, 1, workload=SMALL, profiles=[path])
    assert prof.key in str(err.value) and "tiny@" in str(err.value) and "/bf16/" in str(err.value)


def test_auto_plan_tiny_on_two_cpus(spec, cache) -> None:
    start = time.perf_counter()
    plan = auto_plan(spec, ["cpu", "cpu"], "fp32", "gpipe", 1, 4)
    elapsed = time.perf_counter() - start
    assert elapsed < 6.0, f"auto_plan took {elapsed:.2f} s on CPU (goal < 3 s)"  # slack for busy CI machines
    units = spec.cfg.unit_names()
    plan.check(units, ["cpu", "cpu"], model="tiny")
    assert [u for st in plan.stages for u in st.units] == units
    assert plan.model == "tiny" and plan.dtype == "fp32" and plan.schedule == "gpipe" and plan.microbatches == 4
    assert plan.profile_key == profile_key(spec, "cpu", "fp32", Workload("prefill", 1, 512))
    assert all(st.predicted_time_s > 0 and st.predicted_mem_bytes > 0 for st in plan.stages)
    assert plan.predicted_bottleneck_s == max(st.predicted_time_s for st in plan.stages)
    assert 0 < plan.predicted_bubble < 1
    assert plan.predicted_makespan_s >= 4 * plan.predicted_bottleneck_s * (1 - 1e-9)  # M forwards on the slowest
    again = Plan.from_dict(plan.to_dict())
    assert again == plan


def test_decode_plan_holds_the_kv_cache(spec, cache) -> None:
    work = Workload("decode", 2, context=40)
    plan = auto_plan(spec, ["cpu", "cpu"], "fp32", "decode", 1, 3, workload=work)
    kv_token = 2 * spec.cfg.num_kv_heads * spec.cfg.head_dim * FP32
    for s, st in enumerate(plan.stages):
        kv = len(plan.layer_range(s)) * kv_token * 2 * 3 * 41  # batch x groups x (context + 1)
        assert st.predicted_mem_bytes >= kv + MemoryBudget().workspace_bytes
    assert plan.schedule == "decode" and 0 <= plan.predicted_bubble < 1


def test_bad_schedule_fails_before_measuring(spec, cache, monkeypatch) -> None:
    monkeypatch.setattr(profile_mod, "_measure_unit", _no_measuring)
    with pytest.raises(ValueError, match="virtual=2"):
        auto_plan(spec, ["cpu", "cpu"], "fp32", "gpipe", 2, 1)
    with pytest.raises(ValueError, match="not a known schedule"):
        auto_plan(spec, ["cpu", "cpu"], "fp32", "1f1b", 1, 1)


def _inputs(speeds: list[float], bandwidth: float, act: int = 1000) -> PlanInputs:
    """Synthetic inputs: embed and head 0.1 ms, 8 layers of 1 ms, devices of the given speeds."""
    units = [UnitCost("embed", 1e-4, 10, act), *(UnitCost(f"layers.{i}", 1e-3, 10, act) for i in range(8)),
             UnitCost("head", 1e-4, 10, 5 * act)]
    names = [f"cuda:{i}" for i in range(len(speeds))]
    devices = [DeviceSpec(n, s, "GPU", mem_bytes=1 << 40) for n, s in zip(names, speeds, strict=True)]
    infos = [DeviceInfo(n, 1 << 40, 1 << 40, (9, 0), "cuda") for n in names]
    prof = Profile("synthetic", units, "GPU", "fp32", Workload("prefill", 1, 8))
    return PlanInputs(units, devices, Topology(infos, LinkMatrix.uniform(len(names), bandwidth)), {"GPU": prof})


def test_faster_device_gets_more_layers(spec) -> None:
    plan = plan_from_inputs(_inputs([1.0, 3.0], 1e15), spec, "fp32", "gpipe", 1, 1)
    by_device = {st.device: len(plan.layer_range(s)) for s, st in enumerate(plan.stages)}
    assert by_device["cuda:1"] == 6 and by_device["cuda:0"] == 2
    assert plan.predicted_bottleneck_s == pytest.approx(2.1e-3)  # embed + 2 layers at speed 1


def test_prediction_counts_slow_links(spec) -> None:
    """One microbatch through two stages: makespan = stage 0 + its send + stage 1."""
    fast = plan_from_inputs(_inputs([1.0, 1.0], 1e15), spec, "fp32", "gpipe", 1, 1)
    slow = plan_from_inputs(_inputs([1.0, 1.0], 1e6), spec, "fp32", "gpipe", 1, 1)  # 1000 B take 1 ms
    assert fast.predicted_makespan_s == pytest.approx(8.2e-3, rel=1e-6)
    assert slow.predicted_makespan_s == pytest.approx(9.2e-3, rel=1e-6)
    assert slow.predicted_makespan_s == pytest.approx(sum(st.predicted_time_s for st in slow.stages), rel=1e-9)
    assert math.isclose(fast.predicted_bubble, 0.5, rel_tol=1e-9)


def test_plan_options_validate_and_build_the_workload(spec) -> None:
    opts = PlanOptions(schedule="decode", workload="decode", batch=4, microbatches=2)
    assert opts.make_workload(spec.cfg) == Workload("decode", 4, 512, 511) and opts.chunks_per_device == 1
    assert PlanOptions(schedule="interleaved", virtual=3).chunks_per_device == 3
    assert PlanOptions(kv_tokens=100).budget().kv_tokens == 100 and PlanOptions().budget() is None
    assert PlanOptions(stages=3).device_list() in (["cpu"] * 3, ["cuda:0", "cuda:1", "cuda:2"])
    for bad, name in ((dict(schedule="1f1b"), "schedule"), (dict(workload="train"), "workload"),
                      (dict(batch=0), "batch"), (dict(schedule="interleaved", virtual=1), "virtual"),
                      (dict(devices=["cpu", "cpu"], stages=3), "stages"), (dict(dtype="int8"), "dtype")):
        with pytest.raises(ValueError, match=name):
            PlanOptions(**bad)

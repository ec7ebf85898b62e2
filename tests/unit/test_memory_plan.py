"""Planning that respects memory, on CPU with declared device capacities and costs derived from the config:
a 70B model in bf16 fits 4 x 80 GB with a KV cache for 32 x 4096 tokens, and 2 x 80 GB is refused with the
shortfall in bytes. Nothing of the model is built (the loaders are made to fail if called)."""

from __future__ import annotations

import dataclasses

import pytest

from eet_pipe.cli import main
from eet_pipe.loading import units as loading
from eet_pipe.loading.presets import resolve_model
from eet_pipe.partition import InfeasibleError, MemoryBudget, Workload, auto_plan, profile_units
from eet_pipe.partition import profile as profile_mod
from eet_pipe.partition.estimate import config_profile
from eet_pipe.partition.plan_options import PlanOptions, parse_bytes
from eet_pipe.partition.sizes import unit_bytes, weight_bytes
from eet_pipe.weights import loader

GB = 10**9
SLOTS, SEQ = 32, 4096
KV_70B = 2 * 8 * 128 * 2  # bytes per token per layer: keys + values, 8 kv heads of 128, bf16


@pytest.fixture
def building_allowed():
    """Tests that measure a small model on purpose."""


@pytest.fixture(autouse=True)
def nothing_is_built(request, monkeypatch):
    if "building_allowed" in request.fixturenames:
        return

    def refuse(*args, **kwargs):
        raise AssertionError("planning from the config built a unit")

    for module, name in ((loading, "load_units"), (profile_mod, "load_units"), (loader, "init_random"),
                         (loading, "init_random")):
        monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def spec70():
    return resolve_model("llama-3-70b", "random")


def _plan(spec, devices: int, cap: int, kv_tokens: int = SLOTS * SEQ):
    return auto_plan(spec, ["cpu"] * devices, "bf16", "gpipe", 1, 1, workload=Workload("prefill", 1, 512),
                     measure_links=False, budget=MemoryBudget(kv_tokens=kv_tokens), costs="config", mem_caps=[cap])


def test_four_80gb_devices_hold_70b_bf16(spec70):
    plan = _plan(spec70, 4, 80 * GB)
    units = spec70.cfg.unit_names()
    plan.check(units, ["cpu"] * 4, model="llama-3-70b")
    assert [u for st in plan.stages for u in st.units] == units  # every unit once, in order
    assert sum(len(plan.layer_range(s)) for s in range(4)) == 80
    total_params = 0
    for s, st in enumerate(plan.stages):
        mem = st.predicted_mem
        assert st.mem_cap_bytes == 80 * GB and mem["total"] == st.predicted_mem_bytes <= 80 * GB
        assert mem["params"] == sum(unit_bytes(spec70.cfg, u, "bf16") for u in st.units)
        assert mem["kv"] == len(plan.layer_range(s)) * KV_70B * SLOTS * SEQ
        assert mem["graphs"] > 0 and mem["workspace"] == MemoryBudget().workspace_bytes
        assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
        total_params += mem["params"]
    assert total_params == weight_bytes(spec70.cfg, "bf16")  # untied: every tensor held once


def test_two_80gb_devices_are_refused_with_the_shortfall(spec70):
    with pytest.raises(InfeasibleError) as err:
        _plan(spec70, 2, 80 * GB)
    e = err.value
    kv = 80 * KV_70B * SLOTS * SEQ
    assert e.needed_bytes == weight_bytes(spec70.cfg, "bf16") + kv + 2 * MemoryBudget().workspace_bytes
    assert e.offered_bytes == 160 * GB and e.needed_bytes - e.offered_bytes > 20 * GB
    msg = str(e)
    assert f"{e.needed_bytes - e.offered_bytes:,} bytes too few" in msg
    assert f"short by {e.shortfall_bytes:,} bytes" in msg and e.shortfall_bytes > 0
    assert "has 80,000,000,000 bytes" in msg and "tightest: stage" in msg


def test_without_a_kv_cache_two_devices_suffice(spec70):
    plan = _plan(spec70, 2, 80 * GB, kv_tokens=0)  # 141 GB of weights fit 160 GB
    assert all(st.predicted_mem_bytes <= 80 * GB for st in plan.stages)


def test_a_tied_head_is_held_once_where_it_shares_a_stage_with_the_embedding():
    """GPT-2 ties its head to the token embedding: one stage holds that matrix once (the model shares it),
    two stages hold it twice (each builds its own). A cap between the two figures fits one stage."""
    spec = resolve_model("gpt2-xl", "random")
    cfg, tied = spec.cfg, spec.cfg.vocab_size * spec.cfg.hidden_size * 2
    whole = weight_bytes(cfg, "bf16")
    one = _plan(spec, 1, 80 * GB, kv_tokens=0).stages[0].predicted_mem
    assert one["params"] == whole
    two = _plan(spec, 2, 80 * GB, kv_tokens=0)
    assert sum(st.predicted_mem["params"] for st in two.stages) == whole + tied
    room = one["total"] - one["params"]
    assert _plan(spec, 1, whole + room + tied // 2, kv_tokens=0).stages[0].predicted_mem_bytes <= whole + room + tied // 2
    with pytest.raises(InfeasibleError) as err:
        _plan(spec, 1, whole + room - 1, kv_tokens=0)
    assert err.value.needed_bytes == whole + MemoryBudget().workspace_bytes


def test_cli_plans_and_refuses(capsys):
    args = ["plan", "model=llama-3-70b", "weights=random", "dtype=bf16", "costs=config", "mem=80GB",
            f"max_slots={SLOTS}", f"max_seq={SEQ}", "measure_links=false"]
    assert main([*args, "devices=cpu,cpu,cpu,cpu"]) == 0
    out = capsys.readouterr().out
    assert "plan: llama-3-70b bf16" in out and "(from the config)" in out and "declared GiB" in out
    assert out.count("GiB of 74.51 GiB") == 4 and "kv 10.00" in out
    assert main([*args, "devices=cpu,cpu"]) == 2
    err = capsys.readouterr().err
    assert "no split of 82 units into 2 chunks fits" in err and "bytes too few" in err


def test_config_profile_matches_the_model(spec70):
    prof = config_profile(spec70, "bf16", Workload("decode", 4, context=100))
    cfg = spec70.cfg
    by = {u.name: u for u in prof.units}
    assert sum(u.param_bytes for u in prof.units) == weight_bytes(cfg, "bf16")
    assert by["layers.3"].kv_bytes_per_token == KV_70B and by["embed"].kv_bytes_per_token == 0
    assert by["layers.3"].act_bytes == 4 * cfg.hidden_size * 2 and by["head"].act_bytes == 4 * cfg.vocab_size * 2
    assert by["layers.3"].time_s > by["embed"].time_s > 0 and prof.device_name == "config"
    assert prof.key.startswith("llama-3-70b@") and prof.key.endswith("/config/bf16/decode-4x1@100")


@pytest.mark.usefixtures("building_allowed")
def test_config_costs_equal_measured_ones_but_time(tmp_path):
    """The profiler measures a small random model; every byte count derived from the config must agree."""
    spec = dataclasses.replace(resolve_model("tinyllama-1.1b", "random"), name="small")
    spec.cfg = spec.cfg.replace(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=None,
                                intermediate_size=96, vocab_size=300)
    for workload in (Workload("prefill", 2, 16), Workload("decode", 3, context=20)):
        derived = config_profile(spec, "fp32", workload)
        measured = profile_units(spec, "cpu", "fp32", workload, warmup=0, repeats=1, cache_dir=tmp_path)
        for a, b in zip(derived.units, measured.units, strict=True):
            assert (a.name, a.param_bytes, a.act_bytes, a.kv_bytes_per_token, a.temp_bytes) == \
                (b.name, b.param_bytes, b.act_bytes, b.kv_bytes_per_token, b.temp_bytes)


def test_plan_options_memory_fields(spec70):
    opts = PlanOptions(max_slots=SLOTS, max_seq=SEQ, mem=["80GB"], costs="config")
    assert opts.budget(spec70.cfg).kv_tokens == SLOTS * SEQ and opts.mem_caps() == [80 * GB]
    assert PlanOptions(max_slots=2).budget(spec70.cfg).kv_tokens == 2 * 131072  # max_seq 0 = max positions
    assert PlanOptions(max_slots=2, cuda_graphs=False).budget(spec70.cfg).graph_pools == 0
    with pytest.raises(ValueError, match="kv_tokens=5 and max_slots=2 both size the KV cache"):
        PlanOptions(kv_tokens=5, max_slots=2)
    with pytest.raises(ValueError, match="max_seq=200000 exceeds the model's max positions 131072"):
        PlanOptions(max_slots=1, max_seq=200_000).budget(spec70.cfg)
    with pytest.raises(ValueError, match="costs='guess' is invalid; allowed: measure, config"):
        PlanOptions(costs="guess")
    with pytest.raises(ValueError, match="memory size '80 potatoes' is invalid"):
        PlanOptions(mem=["80 potatoes"])
    assert (parse_bytes("80GiB"), parse_bytes("1.5TB"), parse_bytes("512"), parse_bytes("64 MiB")) == \
        (80 * 2**30, 1_500_000_000_000, 512, 64 * 2**20)


@pytest.mark.cuda
@pytest.mark.usefixtures("building_allowed")
def test_measured_plan_on_a_gpu_respects_its_free_memory(tmp_path):
    """On a GPU: costs measured (one unit at a time), the cap is the free memory, the KV cache is in the need."""
    import torch

    spec = resolve_model("llama-3-8b", "random")
    plan = auto_plan(spec, ["cuda:0"], "bf16", "gpipe", 1, 1, workload=Workload("prefill", 1, 512),
                     budget=MemoryBudget(kv_tokens=4 * 8192), cache_dir=tmp_path)
    st = plan.stages[0]
    free, _ = torch.cuda.mem_get_info(0)
    assert st.mem_cap_bytes <= free + 4 * 2**30 and st.predicted_mem_bytes <= st.mem_cap_bytes
    assert st.predicted_mem["params"] == weight_bytes(spec.cfg, "bf16")
    assert st.predicted_mem["kv"] == 32 * 2 * 8 * 128 * 2 * 4 * 8192

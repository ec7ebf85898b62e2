"""Plan: even split, from a Partition, JSON round trip, table, checks against a model."""

from __future__ import annotations

import json

import pytest

from eet_pipe.partition import DeviceSpec, LinkMatrix, MemoryBudget, Plan, StagePlan, UnitCost, balance

GIB = 1 << 30


def names(layers: int) -> list[str]:
    return ["embed", *(f"layers.{i}" for i in range(layers)), "head"]


def cuda(n: int) -> list[str]:
    return [f"cuda:{i}" for i in range(n)]


def test_even_split_twenty_layers() -> None:
    plan = Plan.even(names(20), cuda(4), model="gpt2")
    assert [plan.layer_range(s) for s in range(4)] == [list(range(5 * s, 5 * s + 5)) for s in range(4)]
    assert plan.stages[0].units[0] == "embed" and plan.stages[-1].units[-1] == "head"
    assert plan.stages[0].chunks == [("embed", "layers.4")] and plan.stages[3].chunks == [("layers.15", "head")]
    assert plan.schedule == "gpipe" and plan.virtual == 1 and plan.devices == cuda(4)
    plan.check(names(20), cuda(4), model="gpt2")


def test_even_split_gives_earlier_chunks_the_extra_layer() -> None:
    plan = Plan.even(names(10), cuda(4))
    assert [len(plan.layer_range(s)) for s in range(4)] == [3, 3, 2, 2]


def test_even_split_interleaved() -> None:
    plan = Plan.even(names(8), cuda(2), virtual=2)
    assert plan.schedule == "interleaved"
    assert plan.chunks() == [["embed", "layers.0", "layers.1"], ["layers.2", "layers.3"],
                             ["layers.4", "layers.5"], ["layers.6", "layers.7", "head"]]
    assert plan.stages[0].chunks == [("embed", "layers.1"), ("layers.4", "layers.5")]
    assert plan.layer_range(1) == [2, 3, 6, 7]
    plan.check(names(8), cuda(2))


def test_even_split_needs_a_layer_per_chunk() -> None:
    with pytest.raises(ValueError, match="8 chunks .* only 6 layers"):
        Plan.even(names(6), cuda(4), virtual=2)


def balanced_plan() -> tuple[Plan, list[UnitCost], list[DeviceSpec]]:
    """Device 0 is very slow, so the balancer moves it to the end where it only holds the free head."""
    units = [UnitCost(n, 0.0 if n == "head" else 1e-3, GIB // 4, 1 << 20) for n in names(8)]
    devs = [DeviceSpec(f"cuda:{i}", 0.01 if i == 0 else 1.0, mem_bytes=8 * GIB) for i in range(3)]
    part = balance(units, devs, LinkMatrix.uniform(3, 100e9, 5e-6), 3, budget=MemoryBudget())
    plan = Plan.from_partition(part, units, devs, model="gpt2", dtype="float16", microbatches=8,
                               profile_key="gpt2/H100/float16/4x512", predicted_makespan_s=0.05)
    return plan, units, devs


def test_from_partition_follows_the_searched_order() -> None:
    plan, units, devs = balanced_plan()
    assert plan.devices[-1] == "cuda:0"  # moved: the plan, not the input order, says where stages run
    assert plan.predicted_bottleneck_s == pytest.approx(max(s.predicted_time_s for s in plan.stages))
    assert all(s.predicted_mem_bytes > 0 for s in plan.stages)
    plan.check([u.name for u in units], [d.name for d in devs], model="gpt2")  # devices in any order


def test_json_round_trip(tmp_path) -> None:
    plan, _, _ = balanced_plan()
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert json.loads(path.read_text())["format"] == 1
    again = Plan.from_json(path)
    assert again == plan
    assert Plan.from_dict(plan.to_dict()) == plan
    assert again.stages[0].chunks[0] == tuple(plan.stages[0].chunks[0])
    even = Plan.even(names(4), cuda(2))
    assert Plan.from_dict(json.loads(json.dumps(even.to_dict()))) == even


def test_from_dict_rejects_bad_input(tmp_path) -> None:
    data = Plan.even(names(4), cuda(2)).to_dict()
    with pytest.raises(ValueError, match="format 2"):
        Plan.from_dict({**data, "format": 2})
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        Plan.from_dict({**data, "colour": "red"})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json(bad)
    with pytest.raises(ValueError, match="do not match chunks"):
        StagePlan("cuda:0", [("embed", "layers.1")], ["embed", "layers.2"])
    with pytest.raises(ValueError, match="stage 0 has 1 chunks but virtual=2"):
        Plan("m", "float16", "interleaved", 1, 2, [StagePlan("cuda:0", [("embed", "head")], ["embed", "head"])])


def test_table_lists_every_stage_and_totals() -> None:
    plan, _, _ = balanced_plan()
    text = plan.table()
    for dev in plan.devices:
        assert dev in text
    assert "total: 3 stages, 10 units" in text and "bottleneck" in text and "makespan 50.000 ms" in text
    assert "pred ms" in text and "pred GiB" in text
    lines = text.splitlines()
    assert len({line.index("pred ms") for line in lines if "pred ms" in line}) == 1
    even = Plan.even(names(4), cuda(2)).table()
    assert "cuda:0" in even and "cuda:1" in even and " - " in even


def test_check_errors() -> None:
    model = names(8)
    plan = Plan.even(model, cuda(2), model="gpt2")
    with pytest.raises(ValueError, match="plan was made for model 'gpt2' but the model is 'llama'"):
        plan.check(model, cuda(2), model="llama")
    with pytest.raises(ValueError, match="unit layers.8 appears in no stage"):
        plan.check(names(9), cuda(2))
    with pytest.raises(ValueError, match="stage 1 lists unit 'layers.7' which the model does not have"):
        plan.check(names(7), cuda(2))
    with pytest.raises(ValueError, match="plan has 2 stages but 3 devices"):
        plan.check(model, cuda(3))
    with pytest.raises(ValueError, match="'cuda:1'"):
        plan.check(model, ["cuda:0", "cuda:2"])
    swapped = Plan("gpt2", "", "gpipe", 1, 1, list(reversed(plan.stages)))
    with pytest.raises(ValueError, match="chunk 0 .* should start at embed"):
        swapped.check(model, cuda(2))
    twice = Plan("gpt2", "", "gpipe", 1, 1, [plan.stages[0], StagePlan("cuda:1", [("layers.3", "head")],
                                                                         model[4:])])
    with pytest.raises(ValueError, match="unit layers.3 appears 2 times, in stages \\[0, 1\\]"):
        twice.check(model, cuda(2))


def test_stage_of_unit_and_layer_range() -> None:
    plan = Plan.even(names(6), cuda(3))
    assert [plan.stage_of_unit(u) for u in names(6)] == [0, 0, 0, 1, 1, 2, 2, 2]
    assert plan.layer_range(2) == [4, 5]
    with pytest.raises(ValueError, match="in no stage"):
        plan.stage_of_unit("layers.9")
    with pytest.raises(ValueError, match="stages 0..2"):
        plan.layer_range(3)

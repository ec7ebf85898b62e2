"""The balancer against brute force (every contiguous split x every device order) and on
hand-made cases whose answer is known."""

from __future__ import annotations

import itertools
import math
import random
import re
import time

import pytest

from eet_pipe.partition import DeviceSpec, InfeasibleError, LinkMatrix, MemoryBudget, UnitCost, balance

GIB = 1 << 30
NO_MEM = MemoryBudget(workspace_bytes=0, act_buffers=0, graph_pools=0)


def units(times: list[float], acts: list[int] | None = None, params: list[int] | None = None) -> list[UnitCost]:
    """embed, layers.0.., head with the given times (first and last are embed and head)."""
    n = len(times)
    names = ["embed", *(f"layers.{i}" for i in range(n - 2)), "head"]
    acts = acts or [1] * n
    params = params or [0] * n
    return [UnitCost(names[i], times[i], params[i], acts[i]) for i in range(n)]


def devices(speeds: list[float], mem: int = 1 << 60) -> list[DeviceSpec]:
    return [DeviceSpec(f"cuda:{i}", s, mem_bytes=mem) for i, s in enumerate(speeds)]


def layer_counts(part, us: list[UnitCost]) -> list[int]:
    return [sum(u.name.startswith("layers.") for u in us[s:e]) for s, e in part.bounds]


# ---- an independent reference: the objective and the memory model written out plainly ----

def device_memory(us: list[UnitCost], chunks: list[tuple[int, int]], budget: MemoryBudget) -> int:
    held = [u for s, e in chunks for u in us[s:e]]
    act = max(us[i].act_bytes for s, e in chunks for i in range(max(s - 1, 0), e))
    temp = max(u.temp_bytes for u in held)
    return (sum(u.param_bytes + u.kv_bytes_per_token * budget.kv_tokens for u in held)
            + budget.act_buffers * act + temp + budget.graph_pools * (act + temp) + budget.workspace_bytes)


def evaluate(us, devs, links, order, bounds, budget) -> float:
    """Bottleneck of a split, or inf if some device lacks memory."""
    p = len(order)
    loads = [0.0] * p
    for c, (s, e) in enumerate(bounds):
        d = order[c % p]
        loads[c % p] += sum(u.time_s for u in us[s:e]) / devs[d].speed
        if c + 1 < len(bounds) and links is not None:
            loads[c % p] += links.transfer_time(d, order[(c + 1) % p], us[e - 1].act_bytes)
    for pos in range(p):
        if device_memory(us, bounds[pos::p], budget) > devs[order[pos]].mem_bytes:
            return math.inf
    return max(loads)


def brute_force(us, devs, links, virtual, budget) -> tuple[float, tuple[int, ...] | None]:
    """Best bottleneck over all orders and splits, and the lexicographically first order reaching it."""
    best, best_order, k = math.inf, None, len(devs) * virtual
    for order in itertools.permutations(range(len(devs))):
        for cuts in itertools.combinations(range(1, len(us)), k - 1):
            edges = [0, *cuts, len(us)]
            value = evaluate(us, devs, links, order, list(itertools.pairwise(edges)), budget)
            if value < best * (1 - 1e-9):
                best, best_order = value, order
    return best, best_order


def check_consistent(part, us, devs, links, budget) -> None:
    """Bounds tile the units; reported times and memory agree with the reference model."""
    assert part.bounds[0][0] == 0 and part.bounds[-1][1] == len(us)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(part.bounds))
    assert part.bottleneck == pytest.approx(evaluate(us, devs, links, part.order, part.bounds, budget), rel=1e-9)
    assert part.bottleneck == pytest.approx(max(part.stage_times), rel=1e-12)
    p = len(part.order)
    for pos in range(p):
        assert part.stage_memory[pos] == device_memory(us, part.bounds[pos::p], budget)
        assert part.stage_memory[pos] <= devs[part.order[pos]].mem_bytes


def random_case(rng: random.Random, virtual: int):
    p = rng.randint(1, 4)
    n = rng.randint(p * virtual, 9)
    uniform = rng.random() < 0.4  # many ties
    us = [UnitCost(f"u{i}", (1.0 if 0 < i < n - 1 else rng.choice([0.0, 0.3])) if uniform
                   else rng.choice([0.0, rng.uniform(0.1, 3.0)]),
                   rng.randint(0, 100), rng.randint(0, 50), rng.randint(0, 3), rng.randint(0, 20)) for i in range(n)]
    devs = [DeviceSpec(f"d{i}", rng.choice([1.0, 0.5, 2.0]), mem_bytes=rng.randint(100, 500)) for i in range(p)]
    links = None
    if rng.random() < 0.7:
        bw = [[math.inf if i == j else rng.choice([10.0, 100.0, 1000.0]) for j in range(p)] for i in range(p)]
        lat = [[0.0 if i == j else rng.choice([0.0, 0.1]) for j in range(p)] for i in range(p)]
        links = LinkMatrix(bw, lat, [["SELF" if i == j else "X" for j in range(p)] for i in range(p)])
    budget = MemoryBudget(kv_tokens=rng.randint(0, 10), workspace_bytes=rng.randint(0, 30), act_buffers=2,
                          graph_pools=rng.choice([0, 0, 1]))
    return us, devs, links, budget


@pytest.mark.parametrize("virtual", [1, 2])
@pytest.mark.parametrize("seed", range(4))
def test_equals_brute_force_on_random_cases(virtual: int, seed: int) -> None:
    rng = random.Random(1000 * virtual + seed)
    feasible = 0
    for _ in range(40):
        us, devs, links, budget = random_case(rng, virtual)
        want, want_order = brute_force(us, devs, links, virtual, budget)
        if math.isinf(want):
            with pytest.raises(InfeasibleError):
                balance(us, devs, links, len(devs), virtual, budget)
            continue
        feasible += 1
        part = balance(us, devs, links, len(devs), virtual, budget)
        assert part.bottleneck == pytest.approx(want, rel=1e-9)
        assert tuple(part.order) == want_order  # ties: the lexicographically first order (identity first)
        assert part.exact
        check_consistent(part, us, devs, links, budget)
    assert feasible >= 10


def test_fixed_order_equals_brute_force_over_splits() -> None:
    rng = random.Random(7)
    for _ in range(30):
        us, devs, links, budget = random_case(rng, 1)
        order = list(range(len(devs)))
        rng.shuffle(order)
        splits = itertools.combinations(range(1, len(us)), len(devs) - 1)
        want = min(evaluate(us, devs, links, order, list(itertools.pairwise([0, *c, len(us)])), budget)
                   for c in splits)
        if math.isinf(want):
            continue
        part = balance(us, devs, links, len(devs), budget=budget, order=order)
        assert part.order == order and part.bottleneck == pytest.approx(want, rel=1e-9)


def test_twenty_uniform_layers_on_four_devices() -> None:
    us = units([0.0, *[1.0] * 20, 0.0])
    part = balance(us, devices([1.0] * 4), LinkMatrix.uniform(4, 100e9), 4, budget=NO_MEM)
    assert layer_counts(part, us) == [5, 5, 5, 5]
    assert part.bottleneck == pytest.approx(5.0, rel=1e-6)
    assert part.order == [0, 1, 2, 3]


def test_ties_give_earlier_chunks_the_extra_layer() -> None:
    us = units([0.0, *[1.0] * 21, 0.0])
    part = balance(us, devices([1.0] * 4), None, 4, budget=NO_MEM)
    assert layer_counts(part, us) == [6, 5, 5, 5]


def test_heavy_embed_and_head_get_fewer_layers() -> None:
    us = units([3.0, *[1.0] * 8, 4.0])
    devs = devices([1.0] * 3)
    part = balance(us, devs, None, 3, budget=NO_MEM)
    assert part.bottleneck == pytest.approx(brute_force(us, devs, None, 1, NO_MEM)[0])
    counts = layer_counts(part, us)
    assert counts[0] < counts[1] and counts[2] < counts[1]


def test_half_speed_device_gets_fewer_layers() -> None:
    us = units([0.5, *[1.0] * 10, 0.5])
    devs = devices([1.0, 1.0, 0.5, 1.0])
    part = balance(us, devs, None, 4, budget=NO_MEM)
    assert part.bottleneck == pytest.approx(brute_force(us, devs, None, 1, NO_MEM)[0])
    counts = dict(zip(part.order, layer_counts(part, us), strict=True))
    assert counts[2] < min(counts[d] for d in (0, 1, 3))


def test_memory_cap_forces_an_uneven_split() -> None:
    us = units([0.0, *[1.0] * 8, 0.0], params=[0, *[GIB] * 8, 0])
    devs = [DeviceSpec("cuda:0", mem_bytes=3 * GIB), DeviceSpec("cuda:1", mem_bytes=6 * GIB)]
    part = balance(us, devs, None, 2, budget=NO_MEM, order=[0, 1])
    assert layer_counts(part, us) == [3, 5]  # time alone would give [4, 4]
    assert part.stage_memory == [3 * GIB, 5 * GIB]
    searched = balance(us, devs, None, 2, budget=NO_MEM)
    assert searched.bottleneck == pytest.approx(5.0)


def test_slow_link_goes_where_the_activation_is_smallest() -> None:
    # device 1 reaches every other device over a slow link; only layers.2's output is small
    acts = [10**6] * 8
    acts[3] = 10**3  # unit 3 is layers.2
    us = units([0.0, *[1.0] * 6, 0.0], acts=acts)
    bw = [[math.inf if i == j else (1e5 if 1 in (i, j) else 1e12) for j in range(4)] for i in range(4)]
    links = LinkMatrix(bw, [[0.0] * 4 for _ in range(4)], [["X"] * 4 for _ in range(4)])
    devs = devices([1.0] * 4)
    part = balance(us, devs, links, 4, budget=NO_MEM)
    assert part.bottleneck == pytest.approx(brute_force(us, devs, links, 1, NO_MEM)[0])
    assert part.order[-1] == 1  # the slow device is at the end: one slow link instead of two
    assert us[part.bounds[-1][0] - 1].name == "layers.2"  # and that link carries the small activation
    assert part.bottleneck == pytest.approx(3.0)


def test_interleaved_uniform() -> None:
    us = units([0.0, *[1.0] * 16, 0.0])
    part = balance(us, devices([1.0] * 4), None, 4, virtual=2, budget=NO_MEM)
    assert layer_counts(part, us) == [2] * 8
    assert part.bottleneck == pytest.approx(4.0) and part.chunks_of(1) == [1, 5]


def test_infeasible_memory_names_the_tightest_stage() -> None:
    us = units([0.0, *[1.0] * 4, 0.0], params=[0, *[GIB] * 4, 0])
    devs = [DeviceSpec("cuda:0", mem_bytes=GIB), DeviceSpec("cuda:1", mem_bytes=GIB + GIB // 2)]
    with pytest.raises(InfeasibleError) as err:
        balance(us, devs, None, 2, budget=MemoryBudget(workspace_bytes=GIB // 4, act_buffers=0, graph_pools=0))
    msg = str(err.value)
    assert "tightest: stage" in msg and ("'cuda:0'" in msg or "'cuda:1'" in msg)
    assert re.search(r"needs [\d,]+ bytes \(\d+\.\d\d GiB", msg) and re.search(r"has [\d,]+ bytes \(1\.(00|50) GiB", msg)
    assert isinstance(err.value, ValueError)
    # 4 GiB of layers + 2 x 1/4 GiB workspace against 2.5 GiB: the pipeline lacks 2 GiB at least
    assert (err.value.needed_bytes, err.value.offered_bytes) == (4 * GIB + GIB // 2, GIB * 5 // 2)
    assert f"{2 * GIB:,} bytes too few" in msg
    assert err.value.shortfall_bytes > 0 and f"short by {err.value.shortfall_bytes:,} bytes" in msg


def test_single_huge_unit_is_infeasible() -> None:
    us = units([1.0, 1.0, 1.0], params=[0, 5 * GIB, 0])
    with pytest.raises(InfeasibleError, match=r"layers\.0.*needs [\d,]+ bytes \(5\.\d\d GiB.*has [\d,]+ bytes \(4\.00 GiB"):
        balance(us, devices([1.0, 1.0], mem=4 * GIB), None, 2, budget=NO_MEM)


def test_argument_errors() -> None:
    us = units([1.0] * 3)
    with pytest.raises(ValueError, match="4 chunks .* only 3 units"):
        balance(us, devices([1.0] * 4), None, 4)
    with pytest.raises(ValueError, match="4 chunks .*virtual=2"):
        balance(us, devices([1.0] * 2), None, 2, virtual=2)
    with pytest.raises(ValueError, match="num_stages=3 but 2 devices"):
        balance(us, devices([1.0] * 2), None, 3)
    with pytest.raises(ValueError, match="empty"):
        balance([], devices([1.0]), None, 1)
    with pytest.raises(ValueError, match="permutation"):
        balance(us, devices([1.0] * 2), None, 2, order=[0, 0])
    with pytest.raises(ValueError, match="links is 3x3"):
        balance(us, devices([1.0] * 2), LinkMatrix.uniform(3, 1e9), 2)


def test_duplicate_devices() -> None:
    us = units([1.0] * 4)
    twice = [DeviceSpec("cuda:0", mem_bytes=GIB), DeviceSpec("cuda:0", mem_bytes=GIB)]
    with pytest.raises(ValueError, match="'cuda:0' is listed 2 times"):
        balance(us, twice, None, 2, budget=NO_MEM)
    assert balance(us, twice, None, 2, budget=NO_MEM, allow_duplicates=True).bottleneck == pytest.approx(2.0)
    cpus = [DeviceSpec("cpu", mem_bytes=GIB), DeviceSpec("cpu", mem_bytes=GIB)]  # not a concrete device
    assert balance(us, cpus, None, 2, budget=NO_MEM).bottleneck == pytest.approx(2.0)


def test_eight_devices_with_distinct_links_is_fast() -> None:
    rng = random.Random(3)
    us = units([0.2, *[rng.uniform(0.7, 1.3) for _ in range(48)], 0.8], acts=[10**7] * 50)
    devs = [DeviceSpec(f"cuda:{i}", rng.choice([0.5, 1.0, 1.5]), mem_bytes=80 * GIB) for i in range(8)]
    bw = [[math.inf if i == j else rng.uniform(5e9, 300e9) for j in range(8)] for i in range(8)]
    links = LinkMatrix(bw, [[0.0 if i == j else 1e-5 for j in range(8)] for i in range(8)],
                       [["X"] * 8 for _ in range(8)])
    start = time.perf_counter()
    part = balance(us, devs, links, 8)
    assert time.perf_counter() - start < 5.0  # ~0.4 s here; order search must not enumerate naively
    assert part.exact
    check_consistent(part, us, devs, links, MemoryBudget())

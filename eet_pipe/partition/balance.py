"""Exact balancer: cut an ordered unit list into contiguous chunks over a pipeline of devices.

Objective (what `Partition.bottleneck` is):
  * chunk time = compute time of its units / device speed
                 + time to send its output activation to the next chunk's device (none for the last chunk);
  * device (stage) time = SUM of the times of its chunks (v chunks per device when `virtual` = v);
  * bottleneck = max over devices of the device time; it is minimised.
  With v = 1 this is the classic "max over stages"; with v > 1 summing per device is chosen because a
  device runs all of its chunks for every microbatch, so its busy time per microbatch is the sum.

Algorithms (exact; tests compare them with brute force):
  * v = 1, fixed order: DP over (stage, split point), O(P·N²), vectorised with numpy.
  * v = 1, order search (<= EXHAUSTIVE_ORDER_LIMIT devices): depth-first over device orders; orders
    sharing a prefix share its DP rows, orders equivalent under device symmetry are visited once,
    and a prefix is dropped when a link-aware suffix DP bound shows it cannot win.
  * v > 1: branch and bound over chunk ends (chunk c on pipeline position c % P), pruned by work,
    unit-count and reach relaxations and by memoising equivalent states; each distinct device order
    is solved when there are at most ORDER_LIST_LIMIT of them. After NODE_BUDGET nodes it returns
    the best split found with `exact=False` (a warning is logged).
  * more orders than that (or more than EXHAUSTIVE_ORDER_LIMIT devices): candidate orders only
    (identity, nearest-neighbour chains on bandwidth, the best v = 1 order); `exact=False`.
Ties: the identity order wins among equally good orders (orders are tried in lexicographic order
and only a strictly better one replaces the best). With v = 1, among splits with the optimal
bottleneck the most even one (least sum of squared chunk times) is returned, and remaining ties
give earlier chunks the extra units (e.g. 21 equal layers on 4 devices -> 6, 5, 5, 5).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass

import numpy as np

from .costs import CostTable, DeviceSpec, LinkMatrix, MemoryBudget, PipelineCosts, UnitCost, gib
from .interleaved import REL as _REL
from .interleaved import BranchAndBound
from .plan import Partition
from .topology import chain_orders, distinct_orders, may_place, symmetry_classes

__all__ = ["EXHAUSTIVE_ORDER_LIMIT", "NODE_BUDGET", "ORDER_LIST_LIMIT", "InfeasibleError", "Partition", "balance"]

log = logging.getLogger(__name__)

EXHAUSTIVE_ORDER_LIMIT = 8
"""v = 1: up to this many devices every device order is searched (modulo symmetry)."""
NODE_BUDGET = 40_000
"""Branch-and-bound nodes (v > 1) per `balance` call before settling for the best found (~2-4 s)."""
ORDER_LIST_LIMIT = 24
"""Orders solved one by one (v > 1, or more devices than EXHAUSTIVE_ORDER_LIMIT): all distinct
ones when there are at most this many, else candidates (identity, nearest-neighbour chains, the
best order for v = 1) and `Partition.exact` is False."""
_CONCRETE = re.compile(r"^(?:[^/]+/)?[A-Za-z_]+:\d+$")  # 'cuda:0', 'node1/cuda:3', 'cpu:1'


class InfeasibleError(ValueError):
    """No split fits the devices' memory; the message names the tightest stage and the shortfall.

    `shortfall_bytes`: how many bytes the tightest stage of the best-fitting split lacks (its need minus
    its device's memory); `needed_bytes` / `offered_bytes`: a lower bound on what the whole pipeline
    needs (every unit's parameters and KV cache, each device's workspace) and the memory of all devices."""

    def __init__(self, message: str, shortfall_bytes: int = 0, needed_bytes: int = 0, offered_bytes: int = 0) -> None:
        super().__init__(message)
        self.shortfall_bytes, self.needed_bytes, self.offered_bytes = shortfall_bytes, needed_bytes, offered_bytes


def _chunk_times(prob: PipelineCosts, order: list[int], k: int) -> np.ndarray:
    """[s, e] -> time of chunk [s, e) at pipeline position k (v = 1), +inf where it does not fit."""
    m = prob.cmat(order[k])
    return m if k + 1 == len(order) else m + prob.xfer(order[k], order[k + 1])[None, :]


def _row(prev: np.ndarray, times: np.ndarray) -> np.ndarray:
    """One DP step: best bottleneck of the first e units after one more position with `times`."""
    return np.maximum(prev[:, None], times).min(axis=0)


def _first_row(n: int) -> np.ndarray:
    row = np.full(n + 1, math.inf)
    row[0] = 0.0
    return row


def _balanced_bounds(prob: PipelineCosts, order: list[int], target: float) -> list[tuple[int, int]]:
    """Among v = 1 splits with bottleneck `target`, the one with the least sum of squared chunk
    times (the most even); remaining ties give earlier chunks more units."""
    n, limit = prob.table.n, target * (1 + _REL) + 1e-300
    cost, costs = _first_row(n), []
    for k in range(len(order)):
        times = _chunk_times(prob, order, k)
        costs.append(cost[:, None] + np.where(times <= limit, times * times, math.inf))  # [s, e]
        cost = costs[-1].min(axis=0)
    bounds, e = [], n
    for step in reversed(costs):
        col = step[:, e]
        s = int(np.nonzero(col <= col.min() * (1 + 1e-12) + 1e-300)[0].max())
        bounds.append((s, e))
        e = s
    return bounds[::-1]


def _solve_dp(prob: PipelineCosts, order: list[int]) -> tuple[float, list[tuple[int, int]]] | None:
    """Exact v = 1 split for a fixed order; None if nothing fits."""
    row = _first_row(prob.table.n)
    for k in range(len(order)):
        row = _row(row, _chunk_times(prob, order, k))
    if math.isinf(row[-1]):
        return None
    return float(row[-1]), _balanced_bounds(prob, order, float(row[-1]))


@dataclass
class _Best:
    value: float = math.inf
    order: list[int] | None = None
    bounds: list[tuple[int, int]] | None = None
    exact: bool = True
    nodes_left: int = NODE_BUDGET  # branch-and-bound nodes left to this search

    def offer(self, value: float, order: list[int], bounds: list[tuple[int, int]]) -> None:
        if value < self.value * (1 - _REL):
            self.value, self.order, self.bounds = value, list(order), bounds


def _search_dp_orders(prob: PipelineCosts, best: _Best, stop_at: float) -> None:
    """v = 1: depth-first over device orders; a node holds the DP row of its finished positions."""
    p, n, t = prob.num_devices, prob.table.n, prob.table
    reps = symmetry_classes([(d.speed, d.mem_bytes) for d in prob.devices], prob.links)
    rest = t.time_list[-1] - t.time_prefix  # [e] -> reference seconds left after unit e-1

    def visit(prefix: list[int], row: np.ndarray) -> bool:  # True = stop searching
        if len(prefix) == p:
            last = _row(row, prob.cmat(prefix[-1]))
            if last[n] < best.value * (1 - _REL):
                best.offer(float(last[n]), prefix, _balanced_bounds(prob, prefix, float(last[n])))
            return best.value <= stop_at * (1 + _REL)
        used = set(prefix)
        left = [i for i in range(p) if i not in used]
        bound = np.maximum(prob.suffix_bound(left), rest / sum(prob.devices[i].speed for i in left))
        for j in range(p):
            if not may_place(j, used, reps):
                continue
            nxt = row
            if prefix:  # position len(prefix) - 1 is now complete: its device sends to j
                nxt = _row(row, prob.cmat(prefix[-1]) + prob.xfer(prefix[-1], j)[None, :])
                if float(np.maximum(nxt, bound).min()) >= best.value * (1 - _REL):
                    continue
            if visit([*prefix, j], nxt):
                return True
        return False

    visit([], _first_row(n))


def _solve_fixed(prob: PipelineCosts, order: list[int], best: _Best, stop_at: float) -> None:
    """Offer the best split for a fixed order to `best` (only if strictly better than it)."""
    if prob.virtual == 1:
        found = _solve_dp(prob, order)
        if found is not None:
            best.offer(found[0], order, found[1])
        return
    if best.nodes_left <= 0:
        return
    bb = BranchAndBound(prob, order, best, stop_at)
    bounds = bb.run()
    if bounds is not None:
        best.offer(bb.ub, order, bounds)


def _candidate_orders(prob: PipelineCosts, order: list[int] | None) -> tuple[list[list[int]], bool]:
    """Device orders to solve one by one, the preferred one (identity or given) first, and
    whether they are all the distinct orders."""
    if order is not None:
        return [order], True
    classes = symmetry_classes([(d.speed, d.mem_bytes) for d in prob.devices], prob.links)
    every = list(itertools.islice(distinct_orders(classes), ORDER_LIST_LIMIT + 1))
    if len(every) <= ORDER_LIST_LIMIT:
        return every, True
    chains = chain_orders(prob.links)
    if prob.num_devices <= EXHAUSTIVE_ORDER_LIMIT:  # v > 1: add the best order for v = 1
        flat = _Best()
        _search_dp_orders(PipelineCosts(prob.table, prob.devices, prob.links, 1, prob.caps), flat, prob.lower_bound())
        if flat.order is not None and flat.order not in chains:
            chains.insert(1, flat.order)
    return chains, False


def _search(prob: PipelineCosts, order: list[int] | None) -> _Best:
    """Best (order, bounds) over the allowed orders; `_Best.order` is None if nothing fits."""
    best, stop_at = _Best(), prob.lower_bound()
    if order is None and prob.num_devices <= EXHAUSTIVE_ORDER_LIMIT and prob.virtual == 1:
        _search_dp_orders(prob, best, stop_at)
        return best
    orders, every = _candidate_orders(prob, order)
    for cand in orders:
        _solve_fixed(prob, cand, best, stop_at)
        if best.value <= stop_at * (1 + _REL):
            return best
    best.exact &= every
    return best


def _evaluate(prob: PipelineCosts, order: list[int], bounds: list[tuple[int, int]], exact: bool) -> Partition:
    """Recompute every reported number from the bounds."""
    t, p = prob.table, len(order)
    times = []
    for c, (s, e) in enumerate(bounds):
        d = order[c % p]
        send = prob.links.transfer_time(d, order[(c + 1) % p], t.units[e - 1].act_bytes) if c + 1 < len(bounds) else 0.0
        times.append((t.time_list[e] - t.time_list[s]) / prob.devices[d].speed + send)
    stage_times = [sum(times[pos::p]) for pos in range(p)]
    needs = [t.need(bounds[pos::p]) for pos in range(p)]
    return Partition(list(order), list(bounds), times, stage_times, [m.total for m in needs], max(stage_times),
                     prob.virtual, exact, [m.to_dict() for m in needs])


def _describe_units(units: list[UnitCost], chunks: list[tuple[int, int]]) -> str:
    return " + ".join(units[s].name if e == s + 1 else f"{units[s].name}..{units[e - 1].name}" for s, e in chunks)


def _infeasible_error(prob: PipelineCosts, order: list[int] | None) -> InfeasibleError:
    """Find the smallest memory scale that fits (bisection) and name the tightest stage there."""
    order = order or list(range(prob.num_devices))
    n, p, k = prob.table.n, len(order), len(order) * prob.virtual

    def attempt(scale: float) -> _Best:  # any split that fits; a small search budget (v > 1) suffices
        best = _Best(nodes_left=NODE_BUDGET // 16)
        _solve_fixed(prob.scaled(scale), order, best, math.inf)
        return best

    lo, hi = 1.0, 2.0
    while attempt(hi).order is None:
        lo, hi = hi, hi * 2
        if hi > 2.0**64:
            return InfeasibleError(f"no split of {n} units into {k} chunks fits the memory of {p} devices; "
                                   f"some device has (almost) no memory: {[d.mem_bytes for d in prob.devices]}")
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if attempt(mid).order is not None else (mid, hi)
    bounds = attempt(hi).bounds or []
    needs = [prob.table.need(bounds[pos::p]) for pos in range(p)]
    ratio = [needs[pos].total / max(prob.devices[order[pos]].mem_bytes, 1) for pos in range(p)]
    pos = max(range(p), key=lambda q: ratio[q])
    dev = prob.devices[order[pos]]
    short = needs[pos].total - dev.mem_bytes
    t = prob.table
    shared = t.shared(0, n) if k == 1 else 0  # a single chunk holds a tied head once
    needed = int(t.held_list[-1]) - shared + p * t.budget.workspace_bytes
    offered = sum(d.mem_bytes for d in prob.devices)
    overall = (f"the whole pipeline needs at least {needed:,} bytes ({gib(needed)}: parameters and KV cache of "
               f"every unit, workspace of every device) and the devices offer {offered:,} bytes ({gib(offered)})"
               + (f", {needed - offered:,} bytes too few" if needed > offered else ""))
    return InfeasibleError(
        f"no split of {n} units into {k} chunks fits the memory of {p} devices (pipeline order {order}); "
        f"tightest: stage {pos} on device {dev.name!r} holding {_describe_units(prob.table.units, bounds[pos::p])} "
        f"needs {needs[pos].total:,} bytes ({gib(needs[pos].total)}: {needs[pos].describe()}) but has "
        f"{dev.mem_bytes:,} bytes ({gib(dev.mem_bytes)}), short by {short:,} bytes ({gib(short)}); {overall}; "
        f"reduce the KV cache (max_slots x max_seq, kv_tokens) or workspace_bytes, use a smaller dtype, "
        f"or add devices", short, needed, offered)


def _validate(units: list[UnitCost], devices: list[DeviceSpec], links: LinkMatrix | None, num_stages: int,
              virtual: int, order: list[int] | None, allow_duplicates: bool) -> None:
    """Raise ValueError naming the first bad argument."""
    if not units:
        raise ValueError("balance: `units` is empty; a model has at least one unit (embed, layers.*, head)")
    if num_stages < 1 or virtual < 1:
        raise ValueError(f"balance: num_stages={num_stages}, virtual={virtual}; both must be >= 1")
    if num_stages != len(devices):
        raise ValueError(f"balance: num_stages={num_stages} but {len(devices)} devices were given; "
                         f"pass exactly one DeviceSpec per stage")
    if num_stages * virtual > len(units):
        raise ValueError(f"balance: {num_stages * virtual} chunks (num_stages={num_stages} x virtual={virtual}) "
                         f"but only {len(units)} units; every chunk needs at least one unit")
    if links is not None and links.size != len(devices):
        raise ValueError(f"balance: links is {links.size}x{links.size} but there are {len(devices)} devices")
    if order is not None and sorted(order) != list(range(len(devices))):
        raise ValueError(f"balance: order={order} is not a permutation of range({len(devices)})")
    names = [d.name for d in devices]
    dups = sorted({x for x in names if names.count(x) > 1 and _CONCRETE.match(x)})
    if dups and not allow_duplicates:
        raise ValueError(f"balance: device {dups[0]!r} is listed {names.count(dups[0])} times in {names}; "
                         f"list each device once, or pass allow_duplicates=True to put several stages on it")


def balance(units: list[UnitCost], devices: list[DeviceSpec], links: LinkMatrix | None, num_stages: int,
            virtual: int = 1, budget: MemoryBudget | None = None, order: list[int] | None = None, *,
            allow_duplicates: bool = False) -> Partition:
    """Split `units` into `num_stages * virtual` contiguous chunks minimising the bottleneck.

    Args:
        units: costs of the partition units in model order (embed, layers.0.., head).
        devices: one DeviceSpec per pipeline stage.
        links: link matrix over `devices` (indices as in `devices`); None = free transfers.
        num_stages: P, must equal len(devices).
        virtual: chunks per device (v); chunk c goes to pipeline position c % P.
        budget: KV tokens, activation buffers and workspace (default MemoryBudget()).
        order: fixed device order along the pipeline (indices into `devices`); None = search it.
        allow_duplicates: accept the same concrete device name ('cuda:0') more than once.

    Returns:
        The optimal Partition (see module docstring for objective and ties).

    Raises:
        ValueError: bad arguments. InfeasibleError: nothing fits in memory.
    """
    _validate(units, devices, links, num_stages, virtual, order, allow_duplicates)
    budget = MemoryBudget() if budget is None else budget
    links = LinkMatrix.uniform(len(devices), math.inf) if links is None else links
    prob = PipelineCosts(CostTable(units, budget), list(devices), links, virtual, [float(d.mem_bytes) for d in devices])
    best = _search(prob, order)
    if best.order is None or best.bounds is None:
        raise _infeasible_error(prob, order)
    part = _evaluate(prob, best.order, best.bounds, best.exact)
    if not part.exact:
        log.warning("balance: the split may not be optimal: the search budget (%d nodes) ran out or only "
                    "candidate device orders were tried", NODE_BUDGET)
    log.info("balance: %d units on %d devices x %d: order %s, bottleneck %.3f ms",
             len(units), num_stages, virtual, part.order, part.bottleneck * 1e3)
    return part

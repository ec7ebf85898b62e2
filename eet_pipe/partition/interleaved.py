"""Exact split of P·v interleaved chunks for one fixed device order (branch and bound).

`balance` (balance.py) calls `BranchAndBound` once per candidate device order when virtual > 1;
the v = 1 case is a dynamic programme there.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from typing import Any

from .costs import PipelineCosts

__all__ = ["BranchAndBound", "REL"]

REL = 1e-9
"""Relative margin: a solution must be better by this much to replace the best one."""


class _BudgetExhaustedError(Exception):
    pass


class _BoundReachedError(Exception):
    pass


class BranchAndBound:
    """v > 1 with a fixed order: depth-first over chunk ends; each device's state is
    (time load, held bytes, largest activation, largest temp). `best` is the search's shared
    incumbent (balance._Best: value, nodes_left)."""

    def __init__(self, prob: PipelineCosts, order: list[int], best: Any, stop_at: float) -> None:
        self.t, self.order, self.ub, self.stop_at, self.shared = prob.table, order, best.value, stop_at, best
        self.p, self.k = len(order), len(order) * prob.virtual
        self.left = [[0] * self.p for _ in range(self.k)]  # [c][q]: chunks of q after chunk c
        self.sends = [[0] * self.p for _ in range(self.k)]  # [c][q]: of those, the ones that send
        for c, x in itertools.combinations(range(self.k), 2):
            self.left[c][x % self.p] += 1
            self.sends[c][x % self.p] += x < self.k - 1
        self.active = [[q for q in range(self.p) if self.left[c][q]] for c in range(self.k)]
        self.speed = [prob.devices[d].speed for d in order]
        self.cap = [prob.caps[d] for d in order]
        self.xf = [prob.xfer(d, order[(i + 1) % self.p]).tolist() for i, d in enumerate(order)]
        self.min_send = [min(x[1:-1], default=0.0) for x in self.xf]  # cheapest send of a non-final chunk
        share = [self.speed[c % self.p] for c in range(self.k)]
        # where chunk c would end if work were split in proportion to speed: explored first
        self.target = list(itertools.accumulate(x * self.t.time_list[-1] / sum(share) for x in share))
        self.state = [(0.0, 0.0, 0.0, 0.0)] * self.p
        self.path: list[tuple[int, int]] = []
        self.best: list[tuple[int, int]] | None = None
        self.seen: set[tuple] = set()

    def run(self) -> list[tuple[int, int]] | None:
        """Best bounds strictly better than the initial `ub`, or None."""
        try:
            self._visit(0, 0)
        except _BoundReachedError:
            pass
        except _BudgetExhaustedError:
            self.shared.exact = False
        return self.best

    def _visit(self, c: int, s: int) -> None:
        key = self._signature(c, s)
        if key in self.seen:  # same future, already explored (as ub only falls, still nothing better)
            return
        self.seen.add(key)
        self.shared.nodes_left -= 1
        if self.shared.nodes_left < 0:
            raise _BudgetExhaustedError
        pos = c % self.p
        for e, new in self._candidates(c, s):
            if new[0] >= self.ub * (1 - REL):
                continue
            old, self.state[pos] = self.state[pos], new
            self.path.append((s, e))
            if c == self.k - 1:
                self._record()
            elif self._promising(c, e):
                self._visit(c + 1, e)
            self.path.pop()
            self.state[pos] = old

    def _signature(self, c: int, s: int) -> tuple:
        """What the completion from chunk c at unit s depends on: the largest load among
        finished devices and the full state of devices that still get chunks."""
        active = {x % self.p for x in range(c, self.k)}
        done = max((self.state[q][0] for q in range(self.p) if q not in active), default=0.0)
        states = tuple(st if q in active else None for q, st in enumerate(self.state))
        return c, s, done, states

    def _record(self) -> None:
        value = max(st[0] for st in self.state)
        if value < self.ub * (1 - REL):
            self.ub, self.best = value, list(self.path)
            if value <= self.stop_at * (1 + REL):
                raise _BoundReachedError

    def _candidates(self, c: int, s: int) -> list[tuple[int, tuple[float, float, float, float]]]:
        """Feasible ends of chunk c starting at s, closest to the proportional target first."""
        t, pos, budget = self.t, c % self.p, self.t.budget
        tl, last = t.time_list, c == self.k - 1
        lo, hi = (t.n, t.n) if last else (s + 1, t.n - (self.k - 1 - c))
        load0, held0, act0, temp0 = self.state[pos]
        limit, out = self.ub * (1 - REL), []
        for e in range(lo, hi + 1):  # compute time and memory only grow with e
            comp = load0 + (tl[e] - tl[s]) / self.speed[pos]
            held = held0 + t.held_list[e] - t.held_list[s]
            act, temp = max(act0, t.act_max_list[s][e]), max(temp0, t.temp_max_list[s][e])
            extra = budget.act_buffers * act + temp + budget.graph_pools * (act + temp) + budget.workspace_bytes
            if comp >= limit or held + extra > self.cap[pos]:
                break
            load = comp + (0.0 if last else self.xf[pos][e])
            if load < limit:
                out.append((abs(tl[e] - self.target[c]), e, (load, held, act, temp)))
        out.sort(key=lambda x: (x[0], x[1]))
        return [(e, st) for _, e, st in out]

    def _promising(self, c: int, e: int) -> bool:
        """Necessary conditions for units [e, n) to fit the chunks after c while beating `ub`."""
        t, tl, limit = self.t, self.t.time_list, self.ub * (1 - REL)
        left, cheapest = self.left[c], t.cheapest[e]
        room, total, count = [0.0] * self.p, 0.0, 0
        for q in self.active[c]:
            # reference seconds q may still compute (a hair generous against rounding) ...
            r = (limit - self.state[q][0] - self.sends[c][q] * self.min_send[q]) * self.speed[q] * (1 + 1e-12)
            k = bisect_left(cheapest, r) - 1  # ... and the most units that fit, its cheapest ones
            if k < left[q]:  # every chunk needs a unit
                return False
            room[q], total, count = r, total + r, count + k
        if total < tl[-1] - tl[e] or count < t.n - e:
            return False
        typical = t.typical[e]  # units at least this heavy: at most room / typical per device
        if typical > 0 and t.lighter[e] + sum(int(min(r / typical, t.n)) for r in room) < t.n - e:
            return False
        reach = e  # relaxation: every later chunk may use all the time its device has left
        for x in range(c + 1, self.k):
            reach = max(reach, bisect_left(tl, tl[reach] + room[x % self.p]) - 1)
            if reach >= t.n:
                return True
        return False

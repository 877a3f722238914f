"""Solve: pick one option per unit minimising the predicted Δloss Σ αᵤ·errᵤ(option) subject to
Σ bytesᵤ(option) ≤ budget: a multiple-choice knapsack, solved exactly by dynamic programming over
bytes (in units of the greatest common divisor of all option sizes).

The DP runs over the bytes *above* every unit's smallest option (the all-smallest plan costs 0), so
any budget ≥ the smallest achievable size is feasible and the grid spans only the freedom the budget
leaves. When that grid would exceed `max_states` cells, the extra sizes are rounded *up* to a coarser
quantum: the answer then still fits the budget and is optimal for the rounded sizes (`quantum`). A
budget of at least the largest achievable size binds nothing: every unit then takes its own least
value, which is exact on any grid (rounding up could otherwise push the largest plans off it).
Among the plans of least value, the one returned has the fewest bytes on the DP's grid (exactly the
fewest when the quantum is the gcd): a tie in value never spends bytes for nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ..errors import QuantcError


@dataclass
class Solution:
    choice: list[int]        # option index per unit
    bytes: int               # exact total bytes of the choice
    value: float             # predicted Δloss of the choice
    quantum: int             # byte granularity of the DP (1 = exact bytes)


def _quantum(costs: list[list[int]], limit: int, max_states: int) -> int:
    g = reduce(math.gcd, (c for row in costs for c in row), 0) or 1
    if limit // g <= max_states:
        return g
    return math.ceil(limit / max_states)


def _dp(costs, values, limit: int, max_states: int, whole: bool = False):
    """`whole`: the grid spans every plan (the sum of each unit's rounded-up largest size, which on a
    coarse grid may exceed limit // q by up to one cell per unit), not only those within `limit`."""
    q = _quantum(costs, limit, max_states)
    S = sum(-(-max(cs) // q) for cs in costs) if whole else limit // q
    best = np.zeros(S + 1)                       # best[s]: least value with total cost ≤ s·q
    choices = np.zeros((len(costs), S + 1), dtype=np.int16)
    for u, (cs, vs) in enumerate(zip(costs, values)):
        new = np.full(S + 1, np.inf)
        arg = np.zeros(S + 1, dtype=np.int16)
        for o, (c, v) in enumerate(zip(cs, vs)):
            k = -(-c // q)                        # rounded up: never over budget
            if k > S:
                continue
            cand = np.full(S + 1, np.inf)
            cand[k:] = best[: S + 1 - k] + v
            better = cand < new
            new[better] = cand[better]
            arg[better] = o
        best, choices[u] = new, arg
    return best, choices, q


def _backtrack(costs, choices, s: int, q: int) -> list[int]:
    pick = [0] * len(costs)
    for u in range(len(costs) - 1, -1, -1):
        o = int(choices[u, s])
        pick[u] = o
        s -= -(-costs[u][o] // q)
    return pick


def _solution(costs, values, pick, q) -> Solution:
    return Solution(pick, sum(c[o] for c, o in zip(costs, pick)), float(sum(v[o] for v, o in zip(values, pick))), q)


def size_range(costs: list[list[int]]) -> tuple[int, int]:
    return sum(min(c) for c in costs), sum(max(c) for c in costs)


def allocate(costs: list[list[int]], values: list[list[float]], budget: int, max_states: int = 400_000) -> Solution:
    """Least total value with total cost ≤ budget."""
    lo, hi = size_range(costs)
    if budget < lo:
        raise QuantcError(f"budget of {budget:,} bytes is infeasible: the smallest achievable size is "
                          f"{lo:,} bytes ({lo / 2**20:.2f} MiB) and the largest {hi:,} bytes "
                          f"({hi / 2**20:.2f} MiB); raise the budget")
    if budget >= hi:                 # nothing binds: each unit's least value (exact, whatever the grid)
        pick = [min(range(len(vs)), key=lambda o: (vs[o], cs[o])) for cs, vs in zip(costs, values)]
        return _solution(costs, values, pick, 1)
    extra = _extra(costs)
    best, choices, q = _dp(extra, values, budget - lo, max_states)
    s = int(np.nonzero(best <= best[-1])[0][0])     # the least grid size that reaches the least value
    return _solution(costs, values, _backtrack(extra, choices, s, q), q)


def _extra(costs: list[list[int]]) -> list[list[int]]:
    """Bytes above each unit's smallest option."""
    return [[c - min(cs) for c in cs] for cs in costs]


def least_bytes(costs: list[list[int]], values: list[list[float]], target: float,
                max_states: int = 400_000) -> Solution:
    """The inverse problem: least total cost whose total value ≤ target."""
    lo, hi = size_range(costs)
    extra = _extra(costs)
    best, choices, q = _dp(extra, values, hi - lo, max_states, whole=True)
    ok = np.nonzero(best <= target)[0]
    if ok.size == 0:
        raise QuantcError(f"no plan reaches predicted Δloss ≤ {target:g}: even the largest options "
                          f"({hi:,} bytes) predict {best[-1]:.4g}")
    return _solution(costs, values, _backtrack(extra, choices, int(ok[0]), q), q)

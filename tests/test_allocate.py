import itertools
import random

import pytest

from quantc.errors import QuantcError
from quantc.passes.allocate import allocate, least_bytes, size_range


def brute(costs, values, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[u][o] for u, o in enumerate(pick))
        v = sum(values[u][o] for u, o in enumerate(pick))
        if c <= budget and (best is None or v < best[0] - 1e-12):
            best = (v, c)
    return best


def instance(rng, units, options):
    costs, values = [], []
    for _ in range(units):
        base = rng.randint(1, 40) * 96
        cs = sorted(base * b + rng.randint(0, 5) * 32 for b in rng.sample([2, 3, 4, 8], options))
        a = rng.random() * 3
        vs = [a * 4.0 ** -(c / base) for c in cs]     # more bytes, less error
        costs.append(cs)
        values.append(vs)
    return costs, values


@pytest.mark.parametrize("seed", range(25))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    costs, values = instance(rng, rng.randint(1, 6), rng.randint(1, 4))
    lo, hi = size_range(costs)
    budget = rng.randint(lo, hi)
    sol = allocate(costs, values, budget)
    v, _ = brute(costs, values, budget)
    assert sol.bytes <= budget
    assert sol.value == pytest.approx(v, rel=1e-9, abs=1e-12)
    # exact DP: the grid divides every size above the unit's smallest option
    assert sol.quantum >= 1 and all((c - min(row)) % sol.quantum == 0 for row in costs for c in row)


@pytest.mark.parametrize("seed", range(10))
def test_inverse_is_least_bytes(seed):
    rng = random.Random(100 + seed)
    costs, values = instance(rng, rng.randint(1, 5), 3)
    lo, hi = size_range(costs)
    target = brute(costs, values, rng.randint(lo, hi))[0] * 1.0000001
    sol = least_bytes(costs, values, target)
    assert sol.value <= target
    combos = itertools.product(*[range(len(c)) for c in costs])
    cheapest = min(sum(costs[u][o] for u, o in enumerate(p)) for p in combos
                   if sum(values[u][o] for u, o in enumerate(p)) <= target)
    assert sol.bytes == cheapest


def test_coarse_grid_never_exceeds_budget():
    rng = random.Random(7)
    costs, values = instance(rng, 30, 4)
    costs = [[c + 1 for c in row] for row in costs]        # gcd 1: forces a rounded grid
    lo, hi = size_range(costs)
    budget = (lo + hi) // 2
    sol = allocate(costs, values, budget, max_states=1000)
    assert sol.quantum > 1 and sol.bytes <= budget
    assert sol.value <= allocate(costs, values, lo + (budget - lo) // 2, max_states=1000).value


def test_infeasible_budget_names_the_range():
    costs, values = [[100, 200], [50, 80]], [[1.0, 0.5], [2.0, 1.0]]
    with pytest.raises(QuantcError, match="smallest achievable size is 150 bytes .* largest 280 bytes"):
        allocate(costs, values, 120)


def test_budget_equal_to_smallest_size_is_feasible_on_a_coarse_grid():
    """Sizes that force a rounded grid: the smallest achievable budget still gives the all-smallest plan."""
    rng = random.Random(5)
    costs = [[rng.randint(10_000, 20_000) * 7 + k * 100_003 for k in range(4)] for _ in range(120)]
    values = [[1.0 / (k + 1) for k in range(4)] for _ in costs]
    lo, _ = size_range(costs)
    sol = allocate(costs, values, lo, max_states=1000)
    assert sol.bytes == lo and sol.choice == [0] * 120
    sol = allocate(costs, values, lo + 250_000, max_states=100)       # rounded grid, still within budget
    assert sol.quantum > 1 and lo < sol.bytes <= lo + 250_000


def test_coarse_grid_reaches_the_largest_plans():
    """Sizes rounded up to a coarse quantum can add up past the grid's end: a budget of the largest
    size still buys the all-largest plan, and the inverse problem still finds it."""
    costs, values = [[0, 1001], [0, 1003], [0, 997]], [[1.0, 0.0]] * 3
    sol = allocate(costs, values, 10**6, max_states=10)
    assert sol.choice == [1, 1, 1] and sol.value == 0 and sol.bytes == 3001
    sol = least_bytes(costs, values, 0.0, max_states=10)
    assert sol.quantum > 1 and sol.choice == [1, 1, 1] and sol.bytes == 3001


@pytest.mark.parametrize("seed", range(5))
def test_a_budget_above_the_largest_size_takes_each_units_best(seed):
    costs, values = instance(random.Random(seed), 6, 3)
    lo, hi = size_range(costs)
    assert allocate(costs, values, hi + 1).value == pytest.approx(brute(costs, values, hi)[0])


@pytest.mark.parametrize("seed", range(15))
def test_ties_in_value_take_the_fewest_bytes(seed):
    """Options of equal value (an 8-bit option whose error is already nil, say): among the plans of
    least value the solver returns one of the fewest bytes, not the first option found."""
    assert allocate([[100, 50], [10, 20], [0, 1000]], [[0, 0], [1, 0], [0, .1]], 500).bytes == 70
    rng = random.Random(500 + seed)
    costs = [sorted(rng.sample(range(1, 60), 3)) for _ in range(rng.randint(2, 5))]
    values = [[float(rng.randint(0, 2)) for _ in cs] for cs in costs]      # many exact ties
    lo, hi = size_range(costs)
    budget = rng.randint(lo, hi)
    sol = allocate(costs, values, budget)
    v, _ = brute(costs, values, budget)
    fewest = min(sum(costs[u][o] for u, o in enumerate(p)) for p in itertools.product(*[range(3)] * len(costs))
                 if sum(costs[u][o] for u, o in enumerate(p)) <= budget
                 and sum(values[u][o] for u, o in enumerate(p)) == v)
    assert sol.value == v and sol.bytes == fewest

"""Choose ``(k, scheme, rank)`` per layer so that ``max_ℓ ε_ℓ`` is as small as
possible while the total cost (parameters, FLOPs or latency) meets a budget.

``alds`` — the exact solver.  Because the objective is a maximum, the problem
separates once a threshold ε is fixed: each layer takes its cheapest
configuration with ``ε_ℓ ≤ ε`` (or stays as it is when that is cheaper).  The
resulting total cost ``C(ε)`` is non-increasing in ε and changes only at the
finitely many candidate errors, so a binary search over the sorted candidates
finds the smallest ε with ``C(ε) ≤ budget``: the exact optimum.

``alds`` with ``objective="sum"`` — the same options, but the least
``Σ_ℓ ε_ℓ²`` instead of the least maximum: when the layers' errors reach the
output independently and with similar gains, the output's squared relative
error is about that sum, so its root (reported as the objective value) is a
first-order prediction of the output error.  A multiple-choice knapsack,
solved by its Lagrangian relaxation (each layer takes the configuration
minimising ``ε² + λ·cost``, bisection on λ: optimal at every cost the relaxed
problem reaches), then what the budget leaves is spent greedily on the
upgrades with the most error removed per unit of cost; the min-max selection
is kept instead where its sum is lower.  With data-aware errors, measured on
the digits zoo, it is the more accurate allocation one-shot at mild budgets
(keep-params 0.7–0.5) and the less accurate at the tightest (0.15), so it is
not the default (README, Results).

``alds-paper`` — the paper's procedure (Liebenwein et al., NeurIPS 2021):
from a seed value of k per layer, alternate (a) a search on the error with k
fixed per layer, which gives every layer a budget, and (b) re-choosing each
layer's k (and scheme) as the one with the least error within that layer's
budget, until k stops changing; the best of several seeds (k = 3, 5, 7, 9 and
random ones) wins.

``uniform`` — the classical baseline: k = 1, scheme s0, and the same fraction
of each layer's rank kept everywhere.  Pure numpy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .errors import InfeasibleBudget
from .folding import SCHEMES

log = logging.getLogger(__name__)

KEEP = -1  # marker k for "leave the layer as it is"


@dataclass
class Options:
    """Every configuration of one layer that is cheaper than the layer itself,
    plus the layer itself (``k = KEEP``, error 0), as parallel arrays."""

    name: str
    eps: np.ndarray
    cost: np.ndarray
    k: np.ndarray
    scheme: np.ndarray  # index into SCHEMES
    rank: np.ndarray
    orig_cost: float
    full_rank: int = 0  # rank of the unsliced s0 folding, for the uniform baseline

    def subset(self, mask: np.ndarray) -> "Options":
        mask = mask | (self.k == KEEP)
        return Options(self.name, self.eps[mask], self.cost[mask], self.k[mask], self.scheme[mask],
                       self.rank[mask], self.orig_cost, self.full_rank)

    def front(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cheapest configuration for each error threshold: returns
        ``(eps, cost, index)`` with eps ascending and cost strictly
        descending; ``cost[searchsorted(eps, e, 'right') - 1]`` is the
        cheapest cost with error ≤ e."""
        order = np.lexsort((self.cost, self.eps))
        c = self.cost[order]
        best = np.minimum.accumulate(c)
        keep = np.ones(len(c), bool)
        keep[1:] = best[1:] < best[:-1]
        return self.eps[order][keep], best[keep], order[keep]

    def config(self, i: int) -> "Config | None":
        if self.k[i] == KEEP:
            return None
        return Config(int(self.k[i]), SCHEMES[int(self.scheme[i])], int(self.rank[i]), float(self.eps[i]))


@dataclass(frozen=True)
class Config:
    k: int
    scheme: str
    rank: int
    rel_error: float


@dataclass
class Selection:
    method: str
    choices: dict[str, Config | None]
    max_rel_error: float
    cost: float  # total cost of the candidate layers after selection
    details: dict = field(default_factory=dict)

    @property
    def rss_error(self) -> float:
        """``sqrt(Σ_ℓ ε_ℓ²)``: the ``sum`` objective's value."""
        return float(np.sqrt(sum(c.rel_error ** 2 for c in self.choices.values() if c is not None)))

    def objective_value(self, objective: str) -> float:
        return self.rss_error if objective == "sum" else self.max_rel_error


OBJECTIVES = ("max", "sum")


def layer_options(name: str, curves: dict[tuple[int, str], np.ndarray], dense_cost: float, costs,
                  full_rank_s0: int = 0, admissible=None) -> Options:
    """A layer's options: every ``(k, scheme, rank)`` of ``curves`` (error model:
    ``curves[(k, s)][j]`` for ``j = 0..r``) that costs less than the layer itself
    (``costs(k, s, ranks) -> array``, from a cost model) and that ``admissible``
    (``(k, s, ranks) -> bool array``, e.g. a speed guard) allows."""
    eps, cost, ks, ss, rs = [], [], [], [], []
    orig = float(dense_cost)
    for (k, s) in sorted(curves):
        curve = curves[(k, s)]
        j = np.arange(1, len(curve))
        cst = np.asarray(costs(k, s, j), dtype=float)
        useful = cst < orig
        if admissible is not None:
            useful &= np.asarray(admissible(k, s, j), dtype=bool)
        eps.append(curve[1:][useful])
        cost.append(cst[useful])
        ks.append(np.full(useful.sum(), k))
        ss.append(np.full(useful.sum(), SCHEMES.index(s)))
        rs.append(j[useful])
    eps.append([0.0]); cost.append([orig]); ks.append([KEEP]); ss.append([0]); rs.append([0])
    return Options(name, np.concatenate(eps).astype(float), np.concatenate(cost).astype(float),
                   np.concatenate(ks).astype(int), np.concatenate(ss).astype(int),
                   np.concatenate(rs).astype(int), orig, full_rank_s0)


def min_cost(options: list[Options]) -> float:
    return float(sum(o.cost.min() for o in options))


def _check_feasible(options: list[Options], budget: float, fixed: float, total: float) -> None:
    least = min_cost(options)
    if least > budget + 1e-9:
        frac = (fixed + least) / total if total else float("nan")
        raise InfeasibleBudget(
            f"the budget cannot be met: the smallest reachable fraction is {frac:.4f}", frac)


class Flat:
    """Every layer's options as one set of flat arrays (layer id ``seg``, error,
    cost, k), so that a selection step costs a few numpy passes over all
    options instead of a few numpy calls per layer: the solvers stay linear in
    the number of layers with small constants (thousands of MatMuls)."""

    def __init__(self, options: list[Options]):
        sizes = np.array([len(o.eps) for o in options], dtype=np.int64)
        self.n_layers = len(options)
        self.start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.seg = np.repeat(np.arange(self.n_layers), sizes)
        cat = (lambda a: np.concatenate(a) if options else np.zeros(0))  # noqa: E731
        self.eps = cat([o.eps for o in options]).astype(float)
        self.cost = cat([o.cost for o in options]).astype(float)
        self.k = cat([o.k for o in options]).astype(np.int64)
        self.scheme = cat([o.scheme for o in options]).astype(np.int64)
        self.rank = cat([o.rank for o in options]).astype(np.int64)
        # each layer's options by error, then cost (as Options.front sorts them), once
        self.order = np.lexsort((self.cost, self.eps, self.seg))
        # exact integer keys for a running minimum of cost that restarts at every layer
        _, rank = np.unique(self.cost, return_inverse=True)
        self._key = rank.astype(np.int64).reshape(-1) - self.seg * (len(self.cost) + 1)

    def front(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Flat positions of every layer's front among the options in ``mask``
        (:meth:`Options.front`, layer after layer)."""
        order = self.order if mask is None else self.order[mask[self.order]]
        best = np.minimum.accumulate(self._key[order])
        keep = np.ones(len(order), bool)
        keep[1:] = best[1:] < best[:-1]
        return order[keep]

    def min_cost(self, mask: np.ndarray | None = None) -> float:
        """Σ over layers of the cheapest option in ``mask``."""
        c = self.cost if mask is None else np.where(mask, self.cost, np.inf)
        return float(np.minimum.reduceat(c, self.start).sum()) if self.n_layers else 0.0

    def local(self, pos: np.ndarray) -> list[int]:
        """Flat positions (one per layer, in order) → indices into each layer's options."""
        return [int(i) for i in pos - self.start]


def _front_starts(seg: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]]) if len(seg) else np.zeros(0, np.int64)


def minmax_front(flat: Flat, fp: np.ndarray, budget: float) -> tuple[float, np.ndarray]:
    """:func:`solve_minmax` on the front ``fp`` (flat positions from
    :meth:`Flat.front`); returns ``(ε*, flat position chosen in each layer)``."""
    feps, fcost = flat.eps[fp], flat.cost[fp]
    starts = _front_starts(flat.seg[fp])
    values = np.unique(feps) if len(fp) else np.zeros(1)

    def at(e):  # each layer's cheapest front entry with error ≤ e
        return starts + np.add.reduceat((feps <= e).astype(np.int64), starts) - 1

    def total(e):
        return float(fcost[at(e)].sum())

    lo, hi = 0, len(values) - 1
    if not len(fp) or total(values[hi]) > budget + 1e-9:
        return float("inf"), np.zeros(0, np.int64)
    while lo < hi:  # smallest index with total ≤ budget
        mid = (lo + hi) // 2
        if total(values[mid]) <= budget + 1e-9:
            hi = mid
        else:
            lo = mid + 1
    picks = fp[at(values[lo])]
    return float(flat.eps[picks].max(initial=0.0)), picks


def solve_minmax(options: list[Options], budget: float) -> tuple[float, list[int]]:
    """Exact: the smallest ε whose cheapest configurations fit ``budget``.
    Returns ``(ε*, index chosen in each layer's options)``."""
    flat = Flat(options)
    eps, picks = minmax_front(flat, flat.front(), budget)
    return eps, (flat.local(picks) if len(picks) else [])


def _selection(method, options, picks, **details) -> Selection:
    choices = {o.name: o.config(i) for o, i in zip(options, picks)}
    max_err = max((c.rel_error for c in choices.values() if c), default=0.0)
    cost = float(sum(o.cost[i] for o, i in zip(options, picks)))
    return Selection(method, choices, max_err, cost, dict(details))


def solve_sum(options: list[Options], budget: float) -> list[int]:
    """Least ``Σ ε²`` within ``budget`` (module docstring): Lagrangian picks, then greedy upgrades."""
    flat = Flat(options)
    fp = flat.front()
    fe, fc, fseg = flat.eps[fp], flat.cost[fp], flat.seg[fp]
    starts = _front_starts(fseg)

    def pick(lam):  # per layer, the first front entry minimising ε² + λ·cost
        v = fe ** 2 + lam * fc
        hit = np.flatnonzero(v == np.minimum.reduceat(v, starts)[fseg])
        return hit[np.r_[True, fseg[hit][1:] != fseg[hit][:-1]]]

    def cost(p):
        return float(fc[p].sum())

    hi = 1.0
    for _ in range(200):
        if cost(pick(hi)) <= budget + 1e-9:
            break
        hi *= 4.0
    lo = 0.0
    for _ in range(100):  # the smallest λ whose picks fit
        mid = (lo + hi) / 2
        if cost(pick(mid)) <= budget + 1e-9:
            hi = mid
        else:
            lo = mid
    picks = pick(hi)
    picks = _upgrade(fe, fc, starts, picks, budget - cost(picks), 10 * len(options) + 10)
    return flat.local(fp[picks])


def _upgrade(fe, fc, starts, picks, left: float, rounds: int) -> np.ndarray:
    """Spend what the budget leaves: each time the upgrade (front entry of one
    layer) that removes the most ε² per unit of cost and still fits, the
    first layer on ties.  A heap holds each layer's best upgrade; the budget
    left only shrinks, so a stale entry overestimates its layer and is
    re-evaluated when it comes out on top."""
    import heapq

    ends = np.r_[starts[1:], len(fe)]
    picks = picks.copy()

    def best(li):
        sl = slice(starts[li], ends[li])
        cur = picks[li]
        dc, de = fc[sl] - fc[cur], fe[cur] ** 2 - fe[sl] ** 2
        ok = (dc > 0) & (dc <= left + 1e-9) & (de > 0)
        if not ok.any():
            return None
        j = int(np.argmax(np.where(ok, de / np.where(dc > 0, dc, 1.0), -np.inf)))
        return (-float(de[j] / dc[j]), li, int(starts[li] + j), float(dc[j]), int(cur))

    heap = [e for e in map(best, range(len(starts))) if e is not None]
    heapq.heapify(heap)
    done = 0
    while heap and done < rounds:
        entry = heapq.heappop(heap)
        _, li, j, dc, cur = entry
        if cur != picks[li] or dc > left + 1e-9:  # stale: its layer moved, or it no longer fits
            fresh = best(li) if cur == picks[li] else None
            if fresh is not None:
                heapq.heappush(heap, fresh)
            continue
        picks[li] = j
        left -= dc
        done += 1
        fresh = best(li)
        if fresh is not None:
            heapq.heappush(heap, fresh)
    return picks


def select_alds(options: list[Options], budget: float, *, fixed: float = 0.0, total: float = 0.0,
                fill: bool = True, objective: str = "max") -> Selection:
    """The exact min-max selection.  With ``fill`` the budget that the
    bottleneck leaves is not wasted: the layers at the optimal max error are
    frozen and the others re-solved, min-max again, with what remains, until
    nothing changes (a lexicographic min-max: the max error stays optimal and
    the largest error among the other layers only falls).  With ``objective``
    ``"sum"``: the least ``Σ ε²`` (module docstring)."""
    _check_feasible(options, budget, fixed, total)
    if objective == "sum":
        minmax = select_alds(options, budget, fixed=fixed, total=total, fill=fill)
        picks = solve_sum(options, budget)
        sel = _selection("alds", options, picks)
        best = sel if sel.rss_error <= minmax.rss_error else minmax
        best.details["objective"] = "sum"
        return best
    flat = Flat(options)
    fp = flat.front()
    eps, picks = minmax_front(flat, fp, budget)
    if fill:
        picks = _fill(flat, fp, budget, eps)
    return _selection("alds", options, flat.local(picks))


class _Fenwick:
    """Prefix sums with point updates (a binary indexed tree over positions 0..n-1)."""

    def __init__(self, values: np.ndarray):
        self.n = len(values)
        tree = [0.0] + [float(v) for v in values]
        for i in range(1, self.n + 1):
            j = i + (i & -i)
            if j <= self.n:
                tree[j] += tree[i]
        self.tree = tree

    def add(self, pos: int, value: float) -> None:
        i = pos + 1
        while i <= self.n:
            self.tree[i] += value
            i += i & -i

    def first_at_most(self, limit: float) -> int:
        """The first position whose prefix sum is ≤ ``limit``, where the prefix
        sums from position 0 on fall (n when none is)."""
        pos, acc, step = 0, 0.0, 1 << self.n.bit_length()
        while step:
            nxt = pos + step
            if nxt <= self.n and acc + self.tree[nxt] > limit:
                pos, acc = nxt, acc + self.tree[nxt]
            step >>= 1
        return pos


def _fill(flat: Flat, fp: np.ndarray, budget: float, eps: float) -> np.ndarray:
    """The lexicographic fill of :func:`select_alds`: the layers at the max
    error ``eps`` are frozen at their picks and the others solved again with
    what remains, until nothing changes.  The free layers' total cost as a
    function of the threshold lives in a Fenwick tree over the candidate
    errors, so a round costs the frozen layers' fronts, not all layers: linear
    in the number of layers however many rounds there are.  Returns the flat
    position chosen in each layer."""
    fseg, feps, fcost = flat.seg[fp], flat.eps[fp], flat.cost[fp]
    starts = _front_starts(fseg)
    ends = np.r_[starts[1:], len(fp)]
    values = np.unique(feps)
    vpos = np.searchsorted(values, feps)
    delta = fcost.copy()
    delta[1:] -= fcost[:-1]
    delta[starts] = fcost[starts]  # C(e) = Σ of the deltas at the candidate errors ≤ e
    tree = _Fenwick(np.bincount(vpos, weights=delta, minlength=len(values)))
    by_value = np.argsort(vpos, kind="stable")
    value_start = np.searchsorted(vpos[by_value], np.arange(len(values) + 1))
    n = flat.n_layers
    free, pick = np.ones(n, bool), np.zeros(n, np.int64)
    threshold, frozen_cost, free_min = eps, 0.0, float(fcost[ends - 1].sum())

    def pick_at(i, e):  # layer i's cheapest front entry with error ≤ e
        return starts[i] + np.searchsorted(feps[starts[i]:ends[i]], e, side="right") - 1

    for _ in range(n):
        lo, hi = np.searchsorted(values, eps - 1e-15, "left"), np.searchsorted(values, eps, "right")
        # a layer is at the max when a front entry of it lies in [eps − 1e-15, eps]
        at_max = [i for i in dict.fromkeys(fseg[by_value[value_start[lo]:value_start[hi]]].tolist()) if free[i]]
        for i in at_max:
            free[i] = False
            pick[i] = pick_at(i, threshold)
            frozen_cost += fcost[pick[i]]
            free_min -= fcost[ends[i] - 1]
            for t in range(starts[i], ends[i]):
                tree.add(int(vpos[t]), -float(delta[t]))
        if not free.any() or not at_max:
            break
        left = budget - frozen_cost
        if free_min > left + 1e-9:
            break
        p = tree.first_at_most(left + 1e-9)
        if p >= len(values):
            break
        threshold = eps = float(values[p])
        if eps <= 0.0:
            break
    for i in np.flatnonzero(free):
        pick[i] = pick_at(i, threshold)
    return fp[pick]


def select_alds_paper(options: list[Options], budget: float, *, fixed: float = 0.0, total: float = 0.0,
                      seeds=(3, 5, 7, 9), n_random: int = 11, max_iter: int = 20, rng_seed: int = 0) -> Selection:
    """The paper's alternating heuristic; returns the best seed's selection."""
    _check_feasible(options, budget, fixed, total)
    rng = np.random.default_rng(rng_seed)
    ks_per_layer = [np.unique(o.k[o.k != KEEP]) for o in options]
    flat = Flat(options)

    def start_from(seed):
        if seed is None:
            return [int(rng.choice(ks)) if len(ks) else 1 for ks in ks_per_layer]
        return [int(ks[ks <= seed].max()) if (ks <= seed).any() else int(ks.min()) if len(ks) else 1
                for ks in ks_per_layer]

    best, best_err, tried = None, np.inf, []
    for seed in list(seeds) + [None] * n_random:
        picks = _alternate(flat, np.array(start_from(seed), dtype=np.int64), budget, max_iter)
        if picks is None:
            continue
        err = float(flat.eps[picks].max(initial=0.0))
        tried.append(err)
        if err < best_err:
            best, best_err = picks, err
    if best is None:  # no seed was feasible: fall back to the plain rank search at k = 1
        mask = (flat.k == 1) | (flat.k == KEEP)
        if flat.min_cost(mask) > budget + 1e-9:
            raise InfeasibleBudget("the budget cannot be met by the paper's procedure", float("nan"))
        _, best = minmax_front(flat, flat.front(mask), budget)
    return _selection("alds-paper", options, flat.local(best), seeds_tried=len(tried))


def _alternate(flat: Flat, ks: np.ndarray, budget: float, max_iter: int) -> np.ndarray | None:
    """The paper's alternation from one seed (k per layer): (a) the min-max
    search with k fixed per layer, (b) every layer re-chooses its k as the one
    with the least error within the cost it got; until k stops changing.
    Returns the flat position chosen in each layer, None where infeasible."""
    picks = None
    for _ in range(max_iter):
        mask = (flat.k == ks[flat.seg]) | (flat.k == KEEP)
        if flat.min_cost(mask) > budget + 1e-9:
            break  # this k assignment cannot meet the budget at any error
        _, picks = minmax_front(flat, flat.front(mask), budget)
        # (b) per layer, the first option with the least error among those costing at most its pick
        fits = flat.cost <= flat.cost[picks][flat.seg] + 1e-9
        e = np.where(fits, flat.eps, np.inf)
        hit = np.flatnonzero(fits & (e == np.minimum.reduceat(e, flat.start)[flat.seg]))
        first = hit[np.r_[True, flat.seg[hit][1:] != flat.seg[hit][:-1]]]
        new_ks = np.where(flat.k[first] != KEEP, flat.k[first], ks)
        if np.array_equal(new_ks, ks):
            break
        ks = new_ks
    return picks


def select_uniform(options: list[Options], budget: float, *, fixed: float = 0.0, total: float = 0.0) -> Selection:
    """Same kept fraction of rank in every layer (k = 1, s0)."""
    s0 = SCHEMES.index("s0")
    _check_feasible([o.subset((o.k == 1) & (o.scheme == s0)) for o in options], budget, fixed, total)
    flat = Flat(options)
    fulls = np.array([o.full_rank for o in options], dtype=np.int64)
    keep_at = np.flatnonzero(flat.k == KEEP)
    keep_at = keep_at[np.r_[True, flat.seg[keep_at][1:] != flat.seg[keep_at][:-1]]]  # first KEEP per layer
    # the k = 1, s0 options by (layer, rank): the first of each, for a vectorised lookup
    m = np.flatnonzero((flat.k == 1) & (flat.scheme == s0))
    span = int(max(fulls.max(initial=0), flat.rank.max(initial=0))) + 2
    keys = flat.seg[m] * span + flat.rank[m]
    keys, first = np.unique(keys, return_index=True)
    m = m[first]

    def pick(alpha):
        want = np.maximum(1, np.ceil(alpha * fulls - 1e-12).astype(np.int64))
        q = np.arange(len(options)) * span + want
        at = np.minimum(np.searchsorted(keys, q), max(len(keys) - 1, 0))
        hit = (keys[at] == q) if len(keys) else np.zeros(len(q), bool)
        return np.where(hit, m[at] if len(keys) else keep_at, keep_at)

    alphas = np.unique(np.concatenate([np.arange(1, full + 1) / full for full in fulls.tolist() if full]
                                      + [[1.0]]))
    # the largest alpha whose cost fits; a scan, not a bisection: where a rank is not an option
    # (it saves nothing, or the speed guard refuses it) the layer stays whole, so the cost of
    # alpha is not monotone
    fits = [i for i, a in enumerate(alphas) if float(flat.cost[pick(a)].sum()) <= budget + 1e-9]
    if not fits:
        raise InfeasibleBudget("the budget cannot be met with uniform rank", float("nan"))
    lo = fits[-1]
    return _selection("uniform", options, flat.local(pick(alphas[lo])), kept_rank_fraction=float(alphas[lo]))


METHODS = {"alds": select_alds, "alds-paper": select_alds_paper, "uniform": select_uniform}


def baseline_options(method: str, options: list[Options]) -> list[Options]:
    """What each method may choose among the same options (same error model, same costs)."""
    s0 = SCHEMES.index("s0")
    if method == "uniform":
        return [o.subset((o.k == 1) & (o.scheme == s0)) for o in options]
    if method == "alds-paper":
        return [o.subset(o.scheme == s0) for o in options]
    return options


def solve(options: list[Options], *, method: str, fraction: float, total: float, compare: bool = True,
          fill: bool = True, objective: str = "max") -> tuple[Selection, dict]:
    """Choose under the budget ``fraction · total`` (the cost of non-candidate
    layers counts as fixed); returns the selection and the objective value
    (max error, or root-sum-square error for ``"sum"``) each other method
    reaches on the same options (None where it cannot meet the budget)."""
    from .errors import UsageError

    if method not in METHODS:
        raise UsageError(f"unknown method {method!r} (use {', '.join(METHODS)})")
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown objective {objective!r} (use {', '.join(OBJECTIVES)})")
    fixed = total - sum(o.orig_cost for o in options)
    budget = fraction * total - fixed

    def extra_for(m):
        return {"fill": fill, "objective": objective} if m == "alds" else {}

    if not options:  # no compressible layer: the model as it is, if the budget allows it
        if budget < -1e-9:
            raise InfeasibleBudget("the model has no compressible layer, so the smallest reachable fraction is 1.0",
                                   1.0)
        sel = Selection(method, {}, 0.0, 0.0, {"fraction": fraction, "total": total, "fixed": fixed,
                                               "target": fraction * total, "predicted": fixed})
        return sel, {m: 0.0 for m in METHODS if m != method} if compare else {}
    extra = extra_for(method)
    sel = METHODS[method](baseline_options(method, options), budget, fixed=fixed, total=total, **extra)
    sel.details.update(fraction=fraction, total=total, fixed=fixed, target=fraction * total,
                       predicted=fixed + sel.cost)
    baselines = {}
    for other in (METHODS if compare else ()):
        if other == method:
            continue
        try:
            baselines[other] = METHODS[other](baseline_options(other, options), budget, fixed=fixed, total=total,
                                              **extra_for(other)).objective_value(objective)
        except InfeasibleBudget as e:  # reported as such; any other exception is a bug
            log.info("baseline %s: %s", other, e)
            baselines[other] = None
    return sel, baselines


def layer_configs(layers, schemes=None, k_max=None) -> dict[str, list[tuple[int, str]]]:
    """The candidate ``(k, scheme)`` pairs of each layer: every divisor k of c up
    to ``k_max`` (1 where groups cannot be emitted) × the distinct schemes."""
    from .errors import UsageError
    from .folding import canonical_scheme
    from .spectra import candidate_ks

    schemes = tuple(schemes or SCHEMES)
    for s in schemes:
        if s not in SCHEMES:
            raise UsageError(f"unknown scheme {s!r} (use s0, s1, s2, s3)")
    out = {}
    for l in layers:
        ss = sorted({canonical_scheme(s, l.geometry.kernel) for s in schemes} & set(l.schemes))
        ks = candidate_ks(l.geometry.c, k_max, l.allow_groups)
        out[l.name] = [(k, s) for k in ks for s in ss]
    return out

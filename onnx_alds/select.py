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


def solve_minmax(options: list[Options], budget: float) -> tuple[float, list[int]]:
    """Exact: the smallest ε whose cheapest configurations fit ``budget``.
    Returns ``(ε*, index chosen in each layer's options)``."""
    fronts = [o.front() for o in options]
    values = np.unique(np.concatenate([f[0] for f in fronts])) if fronts else np.zeros(1)

    def total(e):
        return sum(f[1][np.searchsorted(f[0], e, side="right") - 1] for f in fronts)

    lo, hi = 0, len(values) - 1
    if total(values[hi]) > budget + 1e-9:
        return float("inf"), []
    while lo < hi:  # smallest index with total ≤ budget
        mid = (lo + hi) // 2
        if total(values[mid]) <= budget + 1e-9:
            hi = mid
        else:
            lo = mid + 1
    e = values[lo]
    picks = [int(f[2][np.searchsorted(f[0], e, side="right") - 1]) for f in fronts]
    achieved = max((float(o.eps[i]) for o, i in zip(options, picks)), default=0.0)
    return achieved, picks


def _selection(method, options, picks, **details) -> Selection:
    choices = {o.name: o.config(i) for o, i in zip(options, picks)}
    max_err = max((c.rel_error for c in choices.values() if c), default=0.0)
    cost = float(sum(o.cost[i] for o, i in zip(options, picks)))
    return Selection(method, choices, max_err, cost, dict(details))


def solve_sum(options: list[Options], budget: float) -> list[int]:
    """Least ``Σ ε²`` within ``budget`` (module docstring): Lagrangian picks, then greedy upgrades."""
    fronts = [o.front() for o in options]

    def pick(lam):
        return [int(f[2][np.argmin(f[0] ** 2 + lam * f[1])]) for f in fronts]

    def cost(p):
        return float(sum(o.cost[i] for o, i in zip(options, p)))

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
    left = budget - cost(picks)
    # spend the rest: each time the upgrade that removes the most ε² per unit of cost and still fits
    for _ in range(10 * len(options) + 10):
        best = None
        for li, (o, (fe, fc, fi)) in enumerate(zip(options, fronts)):
            cur = picks[li]
            dc = fc - o.cost[cur]
            de = o.eps[cur] ** 2 - fe ** 2
            ok = (dc > 0) & (dc <= left + 1e-9) & (de > 0)
            if ok.any():
                j = int(np.argmax(np.where(ok, de / np.where(dc > 0, dc, 1.0), -np.inf)))
                gain = de[j] / dc[j]
                if best is None or gain > best[0]:
                    best = (gain, li, int(fi[j]), float(dc[j]))
        if best is None:
            break
        _, li, idx, dc = best
        picks[li] = idx
        left -= dc
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
    eps, picks = solve_minmax(options, budget)
    if not fill:
        return _selection("alds", options, picks)
    picks = list(picks)
    free = list(range(len(options)))
    for _ in range(len(options)):
        at_max = [i for i in free if options[i].eps[picks[i]] >= eps - 1e-15]
        free = [i for i in free if i not in at_max]
        if not free or not at_max:
            break
        left = budget - sum(options[i].cost[picks[i]] for i in range(len(options)) if i not in free)
        sub = [options[i] for i in free]
        if min_cost(sub) > left + 1e-9:
            break
        eps, sub_picks = solve_minmax(sub, left)
        for i, p in zip(free, sub_picks):
            picks[i] = p
        if eps <= 0.0:
            break
    return _selection("alds", options, picks)


def select_alds_paper(options: list[Options], budget: float, *, fixed: float = 0.0, total: float = 0.0,
                      seeds=(3, 5, 7, 9), n_random: int = 11, max_iter: int = 20, rng_seed: int = 0) -> Selection:
    """The paper's alternating heuristic; returns the best seed's selection."""
    _check_feasible(options, budget, fixed, total)
    rng = np.random.default_rng(rng_seed)
    ks_per_layer = [np.unique(o.k[o.k != KEEP]) for o in options]

    def start_from(seed):
        if seed is None:
            return [int(rng.choice(ks)) if len(ks) else 1 for ks in ks_per_layer]
        return [int(ks[ks <= seed].max()) if (ks <= seed).any() else int(ks.min()) if len(ks) else 1
                for ks in ks_per_layer]

    best, best_err, tried = None, np.inf, []
    for seed in list(seeds) + [None] * n_random:
        ks = start_from(seed)
        picks = None
        for _ in range(max_iter):
            restricted = [o.subset(o.k == k) for o, k in zip(options, ks)]
            if min_cost(restricted) > budget + 1e-9:
                break  # this k assignment cannot meet the budget at any error
            _, sub = solve_minmax(restricted, budget)
            # map back to indices of the full option arrays
            picks = [int(np.flatnonzero((o.k == k) | (o.k == KEEP))[i]) for o, k, i in zip(options, ks, sub)]
            # (b) every layer re-chooses k for the budget it got
            new_ks = []
            for o, i, k in zip(options, picks, ks):
                fits = o.cost <= o.cost[i] + 1e-9
                j = np.flatnonzero(fits)[np.argmin(o.eps[fits])]
                new_ks.append(int(o.k[j]) if o.k[j] != KEEP else k)
            if new_ks == ks:
                break
            ks = new_ks
        if picks is None:
            continue
        err = max((float(o.eps[i]) for o, i in zip(options, picks)), default=0.0)
        tried.append(err)
        if err < best_err:
            best, best_err = picks, err
    if best is None:  # no seed was feasible: fall back to the plain rank search at k = 1
        restricted = [o.subset(o.k == 1) for o in options]
        if min_cost(restricted) > budget + 1e-9:
            raise InfeasibleBudget("the budget cannot be met by the paper's procedure", float("nan"))
        _, sub = solve_minmax(restricted, budget)
        best = [int(np.flatnonzero((o.k == 1) | (o.k == KEEP))[i]) for o, i in zip(options, sub)]
    return _selection("alds-paper", options, best, seeds_tried=len(tried))


def select_uniform(options: list[Options], budget: float, *, fixed: float = 0.0, total: float = 0.0) -> Selection:
    """Same kept fraction of rank in every layer (k = 1, s0)."""
    s0 = SCHEMES.index("s0")
    per = []
    for o in options:
        m = (o.k == 1) & (o.scheme == s0)
        ranks = o.rank[m]
        full = o.full_rank  # ranks that save nothing are not options: they mean "keep"
        per.append((o, np.flatnonzero(m), ranks, full))
    _check_feasible([o.subset((o.k == 1) & (o.scheme == s0)) for o in options], budget, fixed, total)

    def pick(alpha):
        out = []
        for o, idx, ranks, full in per:
            want = max(1, int(np.ceil(alpha * full - 1e-12)))
            hit = idx[ranks == want]
            out.append(int(hit[0]) if len(hit) else int(np.flatnonzero(o.k == KEEP)[0]))
        return out

    def cost(picks):
        return sum(o.cost[i] for (o, *_), i in zip(per, picks))

    alphas = np.unique(np.concatenate([np.arange(1, full + 1) / full for *_, full in per if full] + [[1.0]]))
    # the largest alpha whose cost fits; a scan, not a bisection: where a rank is not an option
    # (it saves nothing, or the speed guard refuses it) the layer stays whole, so the cost of
    # alpha is not monotone
    fits = [i for i, a in enumerate(alphas) if cost(pick(a)) <= budget + 1e-9]
    if not fits:
        raise InfeasibleBudget("the budget cannot be met with uniform rank", float("nan"))
    lo = fits[-1]
    return _selection("uniform", [p[0] for p in per], pick(alphas[lo]), kept_rank_fraction=float(alphas[lo]))


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

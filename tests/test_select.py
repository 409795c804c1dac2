"""ALDS selection: exact optimality, baselines, budgets, monotonicity."""

import itertools

import numpy as np
import pytest

from graphs import cnn_model, initializer_floats
from onnx_alds import rewrite
from functools import partial
from types import SimpleNamespace

from onnx_alds.cost import Geometry, cost_model, full_rank
from onnx_alds.error_model import norm_curves
from onnx_alds.errors import InfeasibleBudget
from onnx_alds.folding import divisors
from onnx_alds.select import layer_options, select_alds, select_alds_paper, select_uniform
from onnx_alds.spectra import compute_spectra


def random_layers(seed, n=3):
    rng = np.random.default_rng(seed)
    weights, geos, configs = {}, {}, {}
    for i in range(n):
        f, c = int(rng.choice([3, 4, 6])), int(rng.choice([2, 4]))
        kern = (int(rng.choice([1, 2])), int(rng.choice([1, 2])))
        w = rng.standard_normal((f, c, *kern)) * (0.7 ** np.arange(c))[None, :, None, None]
        name = f"l{i}"
        weights[name] = w
        geos[name] = Geometry(f, c, kern, (5, 5), (4, 4))
        from onnx_alds.folding import distinct_schemes

        configs[name] = [(k, s) for k in divisors(c) for s in distinct_schemes(kern)]
    spectra = compute_spectra(weights, configs, progress=False, workers=1)
    return geos, {n: norm_curves(spectra[n].sv, configs[n], "paper") for n in geos}


def options_of(name, geometry, curves, metric):
    """A layer's options under a cost model, as the API builds them."""
    layer = SimpleNamespace(geometry=geometry)
    cm = cost_model(metric)
    return layer_options(name, curves, cm.dense(layer), partial(cm.configs, layer), full_rank(geometry, 1, "s0"))


def brute_force(options, budget):
    best = np.inf
    for combo in itertools.product(*[range(len(o.eps)) for o in options]):
        cost = sum(o.cost[i] for o, i in zip(options, combo))
        if cost <= budget + 1e-9:
            best = min(best, max(o.eps[i] for o, i in zip(options, combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric", ["params", "flops"])
def test_alds_is_optimal_against_brute_force(seed, metric):
    geos, spectra = random_layers(seed)
    options = [options_of(n, geos[n], spectra[n], metric) for n in geos]
    total = sum(o.orig_cost for o in options)
    for frac in (0.3, 0.5, 0.8):
        budget = frac * total
        try:
            sel = select_alds(options, budget, total=total)
        except InfeasibleBudget:
            assert brute_force(options, budget) == np.inf
            continue
        assert sel.cost <= budget + 1e-9
        assert sel.max_rel_error == pytest.approx(brute_force(options, budget), abs=1e-12)
        for baseline in (select_alds_paper, select_uniform):
            try:
                other = baseline(options, budget, total=total)
            except InfeasibleBudget:
                continue  # a restricted baseline may not reach a budget that alds meets
            assert other.cost <= budget + 1e-9
            assert sel.max_rel_error <= other.max_rel_error + 1e-12


def test_larger_budget_never_gives_larger_error():
    geos, spectra = random_layers(7, n=5)
    options = [options_of(n, geos[n], spectra[n], "params") for n in geos]
    total = sum(o.orig_cost for o in options)
    errs = []
    for frac in np.linspace(0.35, 1.0, 25):
        errs.append(select_alds(options, frac * total, total=total).max_rel_error)
    assert all(b <= a + 1e-15 for a, b in zip(errs, errs[1:]))
    assert errs[-1] == 0.0


@pytest.mark.parametrize("method", ["alds", "alds-paper", "uniform"])
@pytest.mark.parametrize("frac", [0.35, 0.6, 0.9])
def test_params_budget_met_in_written_file(method, frac, tmp_path):
    model = cnn_model()
    new, report = rewrite(model, allow_slower=True, keep_params=frac, method=method, validate=False, compare=False)
    path = tmp_path / "out.onnx"
    path.write_bytes(new.SerializeToString())
    import onnx

    counted = initializer_floats(onnx.load(str(path)))
    assert counted == report.params_after
    assert counted / initializer_floats(model) <= frac + 1e-12
    assert report.params_before == initializer_floats(model)
    assert report.budget["predicted"] == pytest.approx(counted)  # the cost model is exact


@pytest.mark.parametrize("frac", [0.4, 0.7])
def test_flops_budget_met_and_cost_model_exact(frac):
    model = cnn_model()
    _, report = rewrite(model, allow_slower=True, keep_flops=frac, validate=False, compare=False)
    assert report.flops_after / report.flops_before <= frac + 1e-12
    assert report.budget["predicted"] == pytest.approx(report.flops_after)


def test_flops_cost_model_exact_for_every_scheme():
    model = cnn_model()
    for s in ("s0", "s1", "s2", "s3"):
        _, report = rewrite(model, allow_slower=True, keep_flops=0.6, schemes=[s], validate=False, compare=False)
        assert report.budget["predicted"] == pytest.approx(report.flops_after)
        for l in report.layers:
            if l.status == "decomposed":
                assert l.scheme == (s if l.weight_shape[2:] == [3, 3] else "s0")


def test_infeasible_budget_states_smallest_fraction():
    with pytest.raises(InfeasibleBudget, match=r"smallest reachable fraction is 0\.\d+") as e:
        rewrite(cnn_model(), allow_slower=True, keep_params=0.01, validate=False)
    assert 0.01 < e.value.smallest_fraction < 1
    # and that fraction is indeed reachable
    rewrite(cnn_model(), allow_slower=True, keep_params=e.value.smallest_fraction + 1e-4, validate=False, compare=False)


def test_schemes_and_k_max_restrict_the_choice():
    _, report = rewrite(cnn_model(), allow_slower=True, keep_params=0.5, schemes=["s0"], k_max=2, validate=False, compare=False)
    dec = [l for l in report.layers if l.status == "decomposed"]
    assert dec and all(l.scheme == "s0" and l.k <= 2 for l in dec)


@pytest.mark.parametrize("seed", range(4))
def test_filling_the_budget_keeps_the_optimum_and_uses_what_is_left(seed):
    geos, spectra = random_layers(seed, n=4)
    options = [options_of(n, geos[n], spectra[n], "params") for n in geos]
    total = sum(o.orig_cost for o in options)
    for frac in (0.4, 0.6, 0.8):
        try:
            plain = select_alds(options, frac * total, total=total, fill=False)
        except InfeasibleBudget:
            continue
        filled = select_alds(options, frac * total, total=total)
        assert filled.cost <= frac * total + 1e-9
        assert filled.max_rel_error == pytest.approx(plain.max_rel_error, abs=1e-12)
        assert filled.cost >= plain.cost - 1e-9  # never leaves more of the budget unused
        errs = lambda s: sorted((c.rel_error if c else 0.0) for c in s.choices.values())  # noqa: E731
        # lexicographically no worse: the sorted errors, largest first, never rise
        assert errs(filled)[::-1] <= errs(plain)[::-1] or errs(filled) == errs(plain)


def brute_force_sum(options, budget):
    best = np.inf
    for combo in itertools.product(*[range(len(o.eps)) for o in options]):
        cost = sum(o.cost[i] for o, i in zip(options, combo))
        if cost <= budget + 1e-9:
            best = min(best, sum(o.eps[i] ** 2 for o, i in zip(options, combo)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_sum_objective_is_optimal_where_the_relaxation_reaches_and_never_worse_than_min_max(seed):
    geos, spectra = random_layers(seed, n=4)
    options = [options_of(n, geos[n], spectra[n], "params") for n in geos]
    total = sum(o.orig_cost for o in options)
    fronts = [o.front() for o in options]
    rng = np.random.default_rng(seed)
    # budgets the Lagrangian relaxation reaches exactly: the cost of each layer's argmin of ε² + λ·cost
    budgets = []
    for lam in 10.0 ** rng.uniform(-6, 0, 4):
        budgets.append(float(sum(f[1][np.argmin(f[0] ** 2 + lam * f[1])] for f in fronts)))
    for budget in budgets + [0.4 * total, 0.7 * total]:
        try:
            sel = select_alds(options, budget, total=total, objective="sum")
        except InfeasibleBudget:
            assert brute_force_sum(options, budget) == np.inf
            continue
        assert sel.cost <= budget + 1e-9
        best = brute_force_sum(options, budget)
        assert sel.rss_error ** 2 >= best - 1e-12
        if budget in budgets:
            assert sel.rss_error ** 2 == pytest.approx(best, abs=1e-12)
        minmax = select_alds(options, budget, total=total)
        assert sel.rss_error <= minmax.rss_error + 1e-12
        assert sel.details["objective"] == "sum"


def test_sum_objective_is_reported_on_its_own_terms(tmp_path):
    from onnx_alds.errors import UsageError

    model = cnn_model()
    cal = {"x": np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)}
    _, rep = rewrite(model, keep_params=0.5, calibration=cal, validate=False, allow_slower=True, objective="sum")
    assert rep.budget["objective"] == "sum"
    errs = [l.rel_error for l in rep.layers if l.status == "decomposed"]
    assert rep.budget["rss_error"] == pytest.approx(float(np.sqrt(np.sum(np.square(errs)))))
    assert "root-sum-square" in rep.summary()
    # the baselines are on the same objective: alds-paper and uniform cannot have a smaller sum here
    for name, value in rep.baselines.items():
        if value is not None and name == "uniform":
            assert value >= rep.budget["rss_error"] - 1e-12
    _, rep_max = rewrite(model, keep_params=0.5, calibration=cal, validate=False, allow_slower=True,
                         objective="max")
    assert rep_max.budget["objective"] == "max"
    assert rep_max.max_rel_error <= rep.max_rel_error + 1e-12  # min-max is optimal on its own objective
    with pytest.raises(UsageError):
        rewrite(model, keep_params=0.5, validate=False, objective="mean")

"""What keeps large models cheap: the memory-bounded spectra and factors give
what the plain ones give; progress reaches a log without a terminal."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from onnx_alds import factorize, progress, spectra

CASES = [((64, 48, 3, 3), "s1", 2, 20), ((30, 64, 1, 1), "s0", 4, 5), ((64, 30, 2, 2), "s3", 1, 17),
         ((20, 40, 3, 1), "s2", 5, 3), ((50, 50, 1, 1), "s0", 1, 50)]


@pytest.mark.parametrize("shape,scheme,k,rank", CASES)
def test_memory_bounded_paths_equal_the_plain_ones(shape, scheme, k, rank, monkeypatch):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * 0.5 ** (4 * rng.random(shape))).astype(np.float32)
    sv = spectra.group_singular_values(w, scheme, k)
    a, b = factorize.truncated_factors(w, scheme, k, rank)
    monkeypatch.setattr(factorize, "LARGE_FOLD", 0)
    monkeypatch.setattr(spectra, "LARGE_FOLD", 0)
    monkeypatch.setattr(factorize, "GRAM_BLOCK", 7)  # many blocks
    sv2 = spectra.group_singular_values(w, scheme, k)
    a2, b2 = factorize.truncated_factors(w, scheme, k, rank)
    assert np.abs(sv2 - sv).max() <= 1e-12 * sv.max()
    p, p2 = np.einsum("kij,kjl->kil", a, b), np.einsum("kij,kjl->kil", a2, b2)
    assert np.abs(p2 - p).max() <= 1e-10 * np.abs(p).max()
    # the root of σ is split evenly between the factors in both
    assert np.allclose(np.linalg.norm(a2, axis=1), np.linalg.norm(a, axis=1), rtol=1e-8, atol=1e-12)


def test_progress_without_a_terminal_is_log_lines(monkeypatch, caplog):
    monkeypatch.setattr(progress, "_tty", lambda: False)
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    with caplog.at_level(logging.INFO, logger="onnx_alds.progress"):
        assert list(progress.progress_iter(range(100), desc="spectra", unit="svd")) == list(range(100))
    lines = [r.getMessage() for r in caplog.records if r.name == "onnx_alds.progress"]
    assert 10 <= len(lines) <= 21  # one per 5 % at most, and the closing line
    assert lines[0].startswith("spectra: 5/100 svd (5 %)") and "left" in lines[0]
    assert lines[-1].startswith("spectra: 100 svd done in")
    caplog.clear()
    list(progress.progress_iter(range(100), desc="quiet", enabled=False))
    assert not caplog.records


def test_operator_norm_of_a_large_matrix_is_the_plain_one(monkeypatch):
    from onnx_alds import error_model

    m = np.random.default_rng(1).standard_normal((40, 70)) * 1e3
    plain = error_model._op_norm(m)
    monkeypatch.setattr(error_model, "LARGE_FOLD", 0)
    assert error_model._op_norm(m) == pytest.approx(plain, rel=1e-12)
    assert error_model._op_norm(m.T) == pytest.approx(plain, rel=1e-12)


def test_per_layer_keeps_the_order_and_runs_large_layers_alone(monkeypatch):
    """``per_layer`` spreads the small layers over threads (one BLAS thread each) and runs the large
    ones one at a time, yet returns what a plain loop does, in the items' order."""
    import threading

    monkeypatch.setattr(factorize, "LARGE_FOLD", 100)
    rng = np.random.default_rng(2)
    mats = [rng.standard_normal((n, n)) for n in (5, 12, 3, 11, 9, 2, 10)]  # 25..144 elements
    running, seen = [], []
    lock = threading.Lock()

    def work(m):
        with lock:
            running.append(m.size)
            seen.append((m.size, [r for r in running if r != m.size]))
        try:
            return np.linalg.svd(m, compute_uv=False)
        finally:
            with lock:
                running.remove(m.size)

    got = factorize.per_layer(work, mats, lambda m: m.size, workers=2)
    for m, sv in zip(mats, got):
        assert np.array_equal(sv, np.linalg.svd(m, compute_uv=False))
    for size, others in seen:  # a large layer never runs beside another one
        assert size <= 100 or not others

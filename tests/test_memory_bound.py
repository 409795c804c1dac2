"""Memory bounded by the weights (docs/scale.md): what a large layer's spectra, factors and residual
norm allocate, measured with tracemalloc (numpy's arrays, scipy's LAPACK workspaces and Python's
bytes are traced; none of it depends on the CPU or its BLAS), and the weights kept once."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_alds import factorize, spectra
from onnx_alds.factorize import Factors
from onnx_alds.folding import fold

N = 768  # a square float32 weight of 2.25 MB: its float64 Gram matrix is twice its bytes


@pytest.fixture
def large(monkeypatch):
    """Every weight takes the memory-bounded path, with blocks far smaller than the weight."""
    monkeypatch.setattr(factorize, "LARGE_FOLD", 0)
    monkeypatch.setattr(spectra, "LARGE_FOLD", 0)
    monkeypatch.setattr(factorize, "GRAM_BLOCK", 1 << 14)


def _peak(fn, *args):
    """``fn(*args)`` and the most memory traced while it ran, besides what its arguments hold (run
    once untraced first: the modules it imports on first use are not its memory)."""
    fn(*args)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _weight(shape=(N, N, 1, 1), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 0.5 ** (4 * rng.random(shape))).astype(np.float32)


def test_spectra_hold_one_gram_matrix(large):
    w = _weight()
    sv, peak = _peak(spectra.group_singular_values, w, "s0", 1)
    # the float64 Gram matrix (2x the weight) and small blocks; before: its float64 product, numpy's
    # copy for LAPACK and the blocks' product besides it (6x)
    assert peak <= 2.3 * w.nbytes
    plain = np.linalg.svd(w[:, :, 0, 0].astype(np.float64), compute_uv=False)
    assert np.abs(sv[0] - plain).max() <= 1e-12 * plain[0]


def test_spectra_of_a_folded_conv_copy_no_fold(large):
    w = _weight((N // 2, N // 2, 2, 2))  # s1 folds it into N x N with its kernel axes moved
    sv, peak = _peak(spectra.group_singular_values, w, "s1", 1)
    assert peak <= 2.3 * w.nbytes  # the Gram matrix, no folded copy of the weight (before: 7x)
    plain = np.linalg.svd(fold(w.astype(np.float64), "s1", 1)[0], compute_uv=False)
    assert np.abs(sv[0] - plain).max() <= 1e-12 * plain[0]


def test_factors_hold_one_gram_matrix(large):
    w = _weight()
    rank = N // 8
    (enc, dec), peak = _peak(factorize.factorize, w, "s0", 1, rank)
    # the Gram matrix (2x), then the top vectors and the factors (rank/N of it each)
    assert peak <= 2.5 * w.nbytes
    u, s, vt = np.linalg.svd(w[:, :, 0, 0].astype(np.float64))
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    got = dec[:, :, 0, 0].astype(np.float64) @ enc[:, :, 0, 0].astype(np.float64)
    assert np.abs(got - best).max() <= 1e-5 * np.abs(best).max()


def test_reconstruct_holds_the_result_and_a_block(large):
    w = _weight()
    enc, dec = factorize.factorize(w, "s0", 1, N // 8)
    _, peak = _peak(factorize.reconstruct, Factors(enc, dec), w.shape)
    # its float64 result (2x) and the factors in float64; before, the whole product as well (4.6x)
    assert peak <= 2.8 * w.nbytes


def test_residual_norm_never_forms_the_residual(large):
    w = _weight()
    f = Factors(*factorize.factorize(w, "s0", 1, N // 8))
    norm, peak = _peak(factorize.residual_norm, w, f, "s0")
    # Lanczos: the factors in float64 (rank N/8: half the weight's bytes) and blocks; reconstruct,
    # subtract and a norm held 6x
    assert peak <= 0.8 * w.nbytes
    e = factorize.reconstruct(f, w.shape) - w
    assert norm == pytest.approx(np.linalg.norm(e[:, :, 0, 0], 2), rel=1e-10)


CASES = [((64, 48, 3, 3), "s1", 2, 20), ((30, 64, 1, 1), "s0", 4, 5), ((64, 30, 2, 2), "s3", 1, 17),
         ((20, 40, 3, 1), "s2", 5, 3), ((40, 8, 3, 3), "s0", 2, 2), ((8, 6, 3, 2), "s2", 3, 1)]


@pytest.mark.parametrize("shape,scheme,k,rank", CASES)
@pytest.mark.parametrize("block,lanczos", [(1 << 21, False), (7, False), (7, True)])
def test_residual_norm_and_blocks_equal_the_plain_ones(shape, scheme, k, rank, block, lanczos, monkeypatch):
    monkeypatch.setattr(factorize, "GRAM_BLOCK", block)
    if lanczos:
        monkeypatch.setattr(factorize, "LARGE_FOLD", 0)
    w = _weight(shape, seed=1)
    f = Factors(*factorize.factorize(w, scheme, k, rank))
    rec = factorize.reconstruct(f, shape)
    a, b = factorize.factor_matrices(f, scheme, shape)
    for i, m in enumerate(fold(rec, scheme, k)):
        assert np.abs(a[i] @ b[i] - m).max() <= 1e-12 * np.abs(m).max()
    e = rec - w
    assert factorize.residual_norm(w, f, scheme) == pytest.approx(np.linalg.norm(fold(e, scheme, 1)[0], 2),
                                                                  rel=1e-10)
    assert factorize.residual_norm(w, f, scheme, "fro") == pytest.approx(np.linalg.norm(e), rel=1e-10)
    for i in range(k):
        view, n = factorize.group_view(w, scheme, k, i)
        m = fold(w, scheme, k)[i]
        assert np.shares_memory(view, w) and np.array_equal(view.reshape(m.shape), m)
        got = np.concatenate([blk for _, _, blk in factorize.blocks(view, n, block)], axis=1)
        assert np.array_equal(got, m)


def _gemm_file(tmp_path: Path, n: int) -> Path:
    w = _weight((n, n), seed=2)[:, :]
    g = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                          [numpy_helper.from_array(w, "w")])
    path = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_the_weights_are_kept_once(tmp_path):
    """The protobuf holds the weights; extraction and weight4 leave no copy on the graph, and a
    weight is read with one copy (graphsurgeon's loader made two besides the protobuf's)."""
    from onnx_alds.extract import extract
    from onnx_alds.io import Source

    path = _gemm_file(tmp_path, 512)
    nbytes = 512 * 512 * 4
    tracemalloc.start()
    try:
        source = Source.load(path)
        info = extract(source.model, source.graph)
        kept = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        w = source.weight4(info.candidates[0])
        once = tracemalloc.get_traced_memory()[1] - kept
    finally:
        tracemalloc.stop()
    assert kept <= 0.25 * nbytes  # (the protobuf itself is not traced: only copies of it are)
    assert once <= 1.1 * nbytes
    assert np.array_equal(w[:, :, 0, 0], numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]))


@pytest.mark.parametrize("budget", [{"keep_params": 0.5, "allow_slower": True}, {}])
def test_validation_reads_the_models_from_files(tmp_path, monkeypatch, budget):
    """A rewrite is validated from the input file and a written copy of the rewrite (a session
    made from a ModelProto serializes it beside it first); whether the graphs are the same is
    still the protos' (with no budget and no data the model is written unchanged)."""
    from onnx_alds import api
    from onnx_alds.pipeline import stages

    seen = []
    real = stages.validate

    def spy(original, rewritten, **kw):
        seen.append((original, rewritten))
        return real(original, rewritten, **kw)

    monkeypatch.setattr(stages, "validate", spy)
    path = _gemm_file(tmp_path, 64)
    new, report = api.rewrite(str(path), **budget)
    (orig, rewritten), = seen
    assert orig == path and isinstance(rewritten, Path)
    decomposed = any(n.op_type != "Gemm" or n.input[1] != "w" for n in new.graph.node)
    assert decomposed == bool(budget)
    assert report.validation["same_graph"] == (not decomposed)
    assert report.validation["rel_l2"] < (1.0 if decomposed else 1e-7)

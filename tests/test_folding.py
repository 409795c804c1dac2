"""The numerical core: folding, k-SVD factors and their errors."""

import numpy as np
import pytest
from onnx import numpy_helper

from graphs import conv_model
from onnx_alds import apply_plan, rewrite
from onnx_alds.cost import Geometry, factorized_params, full_rank
from onnx_alds.factorize import factorize
from onnx_alds.folding import SCHEMES, distinct_schemes, divisors, fold, unfold
from onnx_alds.plan import LayerPlan, Plan
from onnx_alds.spectra import LayerSpectra, group_singular_values


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_fold_unfold_roundtrip(scheme, k):
    w = np.random.default_rng(0).standard_normal((5, 6, 3, 2))
    m = fold(w, scheme, k)
    assert m.shape[0] == k
    np.testing.assert_array_equal(unfold(m, scheme, w.shape), w)


def test_fold_shapes_follow_the_paper():
    w = np.zeros((8, 6, 3, 5))
    assert fold(w, "s0", 2).shape == (2, 8, 3 * 3 * 5)
    assert fold(w, "s1", 2).shape == (2, 8 * 3, 5 * 3)
    assert fold(w, "s2", 2).shape == (2, 8 * 5, 3 * 3)
    assert fold(w, "s3", 2).shape == (2, 8 * 3 * 5, 3)


def test_distinct_schemes():
    assert distinct_schemes((3, 3)) == SCHEMES
    assert distinct_schemes((1, 1)) == ("s0",)
    assert distinct_schemes((3, 1)) == ("s0", "s3")
    assert divisors(12) == [1, 2, 3, 4, 6, 12]


def compose(enc, dec, k):
    """Effective conv weight of encoder (k·j, cg, e1, e2, group=k) followed by
    decoder (f, k·j, d1, d2): an independent check of the emission algebra."""
    f = dec.shape[0]
    j = enc.shape[0] // k
    cg = enc.shape[1]
    e = enc.reshape(k, j, cg, *enc.shape[2:])
    d = dec.reshape(f, k, j, *dec.shape[2:])
    w = np.einsum("airpq,ircst->aicpsqt", d, e)
    p, s, q, t = w.shape[3:]
    return w.reshape(f, k * cg, p * s, q * t)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_full_rank_factors_reproduce_weight(scheme, k):
    w = np.random.default_rng(1).standard_normal((4, 6, 3, 2))
    r = full_rank(Geometry(4, 6, (3, 2), None, None), k, scheme)
    enc, dec = factorize(w, scheme, k, r)
    np.testing.assert_allclose(compose(enc, dec, k), w, atol=1e-12)
    assert enc.size + dec.size == factorized_params(Geometry(4, 6, (3, 2), None, None), k, scheme, r)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("k,rank", [(1, 2), (2, 3), (3, 1)])
def test_measured_error_of_emitted_weights_equals_prediction(scheme, k, rank):
    """ε = max_i σ_{j+1}(W_i) / ‖fold_s(W)‖₂, measured on the weights written to the ONNX file."""
    model = conv_model(f=8, c=6, kernel=(3, 3), in_hw=(7, 7))
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    new = apply_plan(model, Plan([LayerPlan("conv", "conv.weight", k, scheme, rank)]))
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in new.graph.initializer}
    enc, dec = inits["conv/alds_encoder.weight"], inits["conv/alds_decoder.weight"]
    assert enc.shape[0] == k * rank
    err = fold(w - compose(enc, dec, k), scheme, k)
    measured = max(np.linalg.norm(e, 2) for e in err) / np.linalg.norm(fold(w, scheme, 1)[0], 2)
    sv = group_singular_values(w, scheme, k)
    tail = sv[:, rank].max() if rank < sv.shape[1] else 0.0  # full rank: exact
    predicted = tail / group_singular_values(w, scheme, 1)[0, 0]
    assert measured == pytest.approx(predicted, rel=1e-5, abs=1e-6)
    spectra = LayerSpectra({(k, scheme): sv, (1, scheme): group_singular_values(w, scheme, 1)})
    assert spectra.error_curve(k, scheme)[rank] == pytest.approx(predicted, rel=1e-12)


def test_float16_factors_stay_float16():
    w = np.random.default_rng(2).standard_normal((8, 4, 3, 3)).astype(np.float16)
    enc, dec = factorize(w, "s0", 2, 3)
    assert enc.dtype == np.float16 and dec.dtype == np.float16


@pytest.mark.parametrize("error,k,scheme", [("spectral", 1, "s0"), ("spectral", 1, "s1"), ("paper", 1, "s3"),
                                            ("frobenius", 2, "s0"), ("frobenius", 3, "s2")])
@pytest.mark.parametrize("shape,decay", [((8, 6, 3, 3), None), ((8, 6, 3, 3), 0.7),
                                         ((192, 192, 3, 3), None), ((192, 192, 3, 3), 0.97)])
def test_reported_error_of_a_truncated_svd_is_its_residual(error, k, scheme, shape, decay):
    """Where the error curve is a truncated SVD's residual itself (k = 1 under the operator norm, any k
    under Frobenius), the rewrite reports the curve's value instead of measuring the residual again
    (``WeightError.known_error``): it must equal the norm of the residual of the float32 weights
    written to the file, computed here in float64, for small layers (SVD) and large ones (factors from
    a float32 Gram matrix), flat spectra and decaying ones."""
    f, c, k1, k2 = shape
    model = conv_model(f=f, c=c, kernel=(k1, k2), in_hw=(7, 7), spectrum_decay=decay)
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    rank = full_rank(Geometry(f, c, (k1, k2), None, None), k, scheme) // 3
    new, rep = rewrite(model, plan=Plan([LayerPlan("conv", "conv.weight", k, scheme, rank)]), error=error,
                       validate=False, compare=False)
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in new.graph.initializer}
    e = w - compose(inits["conv/alds_encoder.weight"], inits["conv/alds_decoder.weight"], k)
    if error == "frobenius":
        real = np.linalg.norm(e) / np.linalg.norm(w)
    else:
        real = np.linalg.norm(fold(e, scheme, 1)[0], 2) / np.linalg.norm(fold(w, scheme, 1)[0], 2)
    (layer,) = rep.layers
    assert 0.01 < real < 1
    assert layer.measured_error == pytest.approx(real, rel=1e-6)
    assert layer.rel_error == pytest.approx(real, rel=1e-6)

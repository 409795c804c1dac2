"""--keep-latency: the table, its cache, and the selection that uses it."""

import numpy as np
import pytest

from graphs import cnn_model
from onnx_alds import rewrite
from onnx_alds.api import analyze
from onnx_alds.latency import LatencyTable, cache_key


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_keep_latency_uses_only_table_entries(cache):
    model = cnn_model()
    _, _, info = analyze(model)
    table = LatencyTable.for_model(model, info, cache_dir=cache, k_max=4)
    assert table.measured > 0 and table.provider == "CPUExecutionProvider"
    # a budget halfway between the smallest reachable latency and the original, whatever the machine's noise
    from onnx_alds.errors import InfeasibleBudget

    with pytest.raises(InfeasibleBudget) as least:
        rewrite(model, keep_latency=1e-3, latency_table=table, validate=False, compare=False)
    frac = (1 + least.value.smallest_fraction) / 2
    new, report = rewrite(model, keep_latency=frac, latency_table=table, validate=False, compare=False)
    chosen = [l for l in report.layers if l.status == "decomposed"]
    assert chosen
    predicted = table.model_ms
    for l in chosen:
        entry = table.layers[l.name]
        assert (l.k, l.scheme) in entry.grid  # only configurations the table measured
        rs, ms = entry.grid[(l.k, l.scheme)]
        assert rs.min() <= l.rank <= rs.max()
        predicted += np.interp(l.rank, rs, ms) - entry.orig_ms
    assert report.budget["predicted_ms"] == pytest.approx(predicted)
    assert report.budget["predicted_ms"] <= frac * table.model_ms + 1e-9
    assert report.budget["measured_ms"] > 0


def test_cache_hits_and_invalidation(cache):
    model = cnn_model()
    _, _, info = analyze(model)
    first = LatencyTable.for_model(model, info, cache_dir=cache, k_max=2)
    again = LatencyTable.for_model(model, info, cache_dir=cache, k_max=2)
    assert first.measured > 0 and again.measured == 0 and again.cached == first.measured
    # another input shape: every conv is measured anew; fc sees the same (1, 32) input and hits the cache
    _, _, bigger = analyze(model, input_shapes={"x": [1, 3, 24, 24]})
    other = LatencyTable.for_model(model, bigger, cache_dir=cache, k_max=2)
    n_fc = 2 + sum(len(rs) for rs, _ in first.layers["fc"].grid.values())  # with the run overhead
    assert other.cached == n_fc and other.measured == first.measured - n_fc
    # another provider or onnxruntime version gives another key
    layer = info.candidates[0]
    dims = info.shapes[layer.input_name]
    base = cache_key(layer, dims, "CPUExecutionProvider", "1.0", 2, 17, True)[0]
    assert cache_key(layer, dims, "CUDAExecutionProvider", "1.0", 2, 17, True)[0] != base
    assert cache_key(layer, dims, "CPUExecutionProvider", "1.1", 2, 17, True)[0] != base
    assert cache_key(layer, [1, 3, 24, 24], "CPUExecutionProvider", "1.0", 2, 17, True)[0] != base

"""Shared checks for the robustness tests: full-rank plans over every layer,
seeded inputs for any model, and output comparison through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_alds import apply_plan
from onnx_alds.api import analyze
from onnx_alds.cost import full_rank
from onnx_alds.plan import LayerPlan, Plan
from onnx_alds.spectra import candidate_ks

LAYER_OPS = ("Conv", "Gemm", "MatMul")


def full_rank_plan_all(model, input_shapes=None, seed=0) -> tuple[Plan, object]:
    """A plan that factorizes every compressible layer at full rank, with a
    k and scheme drawn per layer (seeded) among the ones the layer allows."""
    rng = np.random.default_rng(seed)
    _, _, info = analyze(model, input_shapes)
    layers = []
    for l in info.candidates:
        ks = candidate_ks(l.geometry.c, None, l.allow_groups)
        k = int(ks[rng.integers(len(ks))])
        scheme = str(l.schemes[rng.integers(len(l.schemes))])
        layers.append(LayerPlan(l.name, l.weight_name, k, scheme, full_rank(l.geometry, k, scheme)))
    return Plan(layers), info


def ort_session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    return ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])


_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def feeds_for(model, shapes: dict | None = None, seed=0, batch=2) -> dict:
    """Seeded inputs: dims from ``shapes`` (name → dims), else the model's,
    a dynamic batch as ``batch``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for inp in ort_session(model).get_inputs():
        dims = list((shapes or {}).get(inp.name) or
                    [d if isinstance(d, int) else batch for d in inp.shape])
        dt = _DTYPES[inp.type]
        if np.issubdtype(dt, np.floating):
            feeds[inp.name] = rng.standard_normal(dims).astype(dt)
        elif dt == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            feeds[inp.name] = rng.integers(0, 3, dims).astype(dt)
    return feeds


def run_all(model, feeds) -> list[np.ndarray]:
    return ort_session(model).run(None, feeds)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = np.linalg.norm(a)
    return float(np.linalg.norm(a - b) / n) if n > 0 else float(np.linalg.norm(b))


def assert_same_outputs(model, new, feeds, tol=1e-5) -> float:
    """Every output of ``new`` has the shape and dtype of ``model``'s and a
    relative L2 error ≤ ``tol``; returns the worst error."""
    y0, y1 = run_all(model, feeds), run_all(new, feeds)
    assert len(y0) == len(y1)
    worst = 0.0
    for a, b in zip(y0, y1):
        assert a.shape == b.shape and a.dtype == b.dtype
        e = rel_err(a, b)
        assert e <= tol, e
        worst = max(worst, e)
    return worst


def count_layer_ops(model: onnx.ModelProto) -> int:
    return sum(n.op_type in LAYER_OPS for n in model.graph.node)


def check_full_rank(model, feeds, input_shapes=None, seed=0, tol=1e-5):
    """Apply a full-rank plan to every compressible layer and compare through
    onnxruntime.  Returns (rewritten model, info, plan)."""
    plan, info = full_rank_plan_all(model, input_shapes, seed)
    new = apply_plan(model, plan, input_shapes=input_shapes)
    # every planned layer was really replaced: one layer op → at least two
    assert count_layer_ops(new) >= count_layer_ops(model) + len(plan.layers)
    assert_same_outputs(model, new, feeds, tol)
    return new, info, plan

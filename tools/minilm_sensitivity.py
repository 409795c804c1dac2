#!/usr/bin/env python
"""The sentence encoder's layer sensitivities and the plans they give (docs/error-models.md,
"Output sensitivity"). A benchmark, never run in CI; needs the artifacts of
``tools/real_models.py --models minilm`` (original.onnx, cal.npz, eval.npz, ref_embeddings.npy).

    python tools/minilm_sensitivity.py probe      # each Linear alone at rank r/4: 1 - cos of the embedding
    python tools/minilm_sensitivity.py base 0.9   # rewrite --keep-params 0.9 --calibration: cosine
    python tools/minilm_sensitivity.py weighted 0.9  # the same, curves weighted by the probe's sqrt(1 - cos) / eps
    python tools/minilm_sensitivity.py product 0.9   # the same with the tool's --sensitivity

``probe`` fits the factors on the first 192 calibration sentences and measures on the other 64;
``weighted`` reads its results (``--work``). The embedding is the checkpoint's mean pooling over
real tokens, normalised; cosines are against the original's on the 100 held-out sentences.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_alds import rewrite
from onnx_alds.api import analyze
from onnx_alds.plan import LayerPlan, Plan


def embed(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    h = s.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}})[0]
    m = feeds["attention_mask"][..., None].astype(np.float32)
    e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def load_artifacts(d: Path):
    """The calibration and evaluation feeds, the original's embeddings and the original model."""
    cal, ev = dict(np.load(d / "cal.npz")), dict(np.load(d / "eval.npz"))
    return cal, ev, np.load(d / "ref_embeddings.npy"), onnx.load(str(d / "original.onnx"))


def probe(orig, cal, out: Path) -> None:
    fit = {k: v[:192] for k, v in cal.items()}
    hold = {k: v[192:] for k, v in cal.items()}
    ref = embed(orig, hold)
    _, _, info = analyze(orig)
    plan = Plan([LayerPlan(l.name, l.weight_name, 1, "s0", max(1, min(l.geometry.f, l.geometry.c) // 4))
                 for l in info.candidates])
    _, rep = rewrite(orig, plan=plan, calibration=fit, validate=False, compare=False, sequential=False)
    eps = {e.name: e.measured_error or e.rel_error for e in rep.layers}
    result = {}
    for lp in plan.layers:
        new, _ = rewrite(orig, plan=Plan([lp]), calibration=fit, validate=False, compare=False, sequential=False)
        result[lp.name] = dict(eps=eps[lp.name], one_minus_cos=1 - float((embed(new, hold) * ref).sum(1).mean()))
        print(lp.name, f"eps {eps[lp.name]:.4f}  1 - cos {result[lp.name]['one_minus_cos']:.5f}", flush=True)
    out.write_text(json.dumps(result, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["probe", "base", "weighted", "product"])
    p.add_argument("keep", type=float, nargs="?", default=0.9)
    p.add_argument("--artifacts", type=Path, default=Path("/work/rm-artifacts/minilm"))
    p.add_argument("--no-hold-out", action="store_true",
                   help="fit on every calibration sentence (no held-back quarter to judge the candidates on)")
    p.add_argument("--sequential", action="store_true", help="refit every layer on the compressed prefix's inputs")
    p.add_argument("--work", type=Path, default=Path("artifacts/minilm_sensitivity.json"))
    a = p.parse_args(argv)
    logging.disable(logging.WARNING)
    cal, ev, ref, orig = load_artifacts(a.artifacts)
    if a.mode == "probe":
        a.work.parent.mkdir(parents=True, exist_ok=True)
        probe(orig, cal, a.work)
        return 0
    if a.mode == "weighted":
        import onnx_alds.error_model as em

        sens = json.loads(a.work.read_text())
        w = {n: np.sqrt(v["one_minus_cos"]) / max(v["eps"], 1e-12) for n, v in sens.items()}
        mean = float(np.exp(np.mean(np.log(list(w.values())))))
        plain = em.DataError.curves

        def curves(self, source, layers, configs, **kw):
            got = plain(self, source, layers, configs, **kw)
            return {n: {c: arr * w.get(n, mean) / mean for c, arr in cc.items()} for n, cc in got.items()}

        em.DataError.curves = curves
    t = time.time()
    new, rep = rewrite(orig, keep_params=a.keep, calibration=cal, allow_slower=True, validate=False,
                       compare=False, sensitivity=a.mode == "product", hold_out=not a.no_hold_out,
                       sequential=True if a.sequential else None)
    cos = float((embed(new, ev) * ref).sum(1).mean())
    print(f"{a.mode} keep-params {a.keep}: cosine {cos:.4f}, params {rep.params_fraction:.3f}, "
          f"{time.time() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

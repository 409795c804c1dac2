"""Selection benchmark: max ε and wall time of alds, alds-paper and uniform,
side by side in one run, on trained models and a ResNet-50-sized layout.

    python tools/bench_select.py                       # models/*.onnx, artifacts/onnx/*.onnx, ResNet-50
    python tools/bench_select.py --budgets 0.3 0.5 0.7 --of layers

The budget is a fraction of the compressible layers' parameters (``--of
layers``, as in the paper) or of the whole model's (``--of model``, as the
CLI's --keep-params).  ``alds`` uses all four schemes (the paper's ALDS+),
``alds-s0`` the exact solver on scheme s0 alone (the paper's own objective),
``alds-paper`` the paper's alternating heuristic on s0 and ``uniform`` k=1.
The spectra are computed once per model and timed separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from onnx_alds.api import analyze, layer_configs  # noqa: E402
from onnx_alds.select import METHODS, layer_options  # noqa: E402
from onnx_alds.spectra import compute_spectra  # noqa: E402

VARIANTS = [  # (label, method, schemes)
    ("alds", "alds", ("s0", "s1", "s2", "s3")),
    ("alds-s0", "alds", ("s0",)),
    ("alds-paper", "alds-paper", ("s0",)),
    ("uniform", "uniform", ("s0",)),
]


def bench_model(path, budgets, of="layers", metric="params", k_max=None):
    _, _, info = analyze(path)
    cands = info.candidates
    t0 = time.perf_counter()
    configs = layer_configs(info, None, k_max)
    spectra = compute_spectra({l.name: l.weight4() for l in cands}, configs, progress=sys.stderr.isatty())
    t_spectra = time.perf_counter() - t0
    rows = []
    for frac in budgets:
        row = {"model": Path(path).stem, "layers": len(cands), "budget": frac, "spectra_s": t_spectra}
        for label, method, schemes in VARIANTS:
            t0 = time.perf_counter()
            allowed = layer_configs(info, schemes, k_max) if method != "uniform" else \
                {l.name: [(1, "s0")] for l in cands}
            options = [layer_options(l.name, l.geometry, spectra[l.name], metric, configs=allowed[l.name])
                       for l in cands]
            layers_cost = sum(o.orig_cost for o in options)
            total = layers_cost if of == "layers" else float(info.params_total)
            fixed = total - layers_cost
            try:
                sel = METHODS[method](options, frac * total - fixed, fixed=fixed, total=total)
                row[label] = sel.max_rel_error
                row[label + "_kept"] = (fixed + sel.cost) / total
            except Exception as e:  # infeasible for this method
                row[label] = None
                row[label + "_why"] = str(e)
            row[label + "_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help="ONNX files (default: shipped and trained models + ResNet-50)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--of", choices=["layers", "model"], default="layers")
    ap.add_argument("--metric", choices=["params", "flops"], default="params")
    ap.add_argument("--k-max", type=int, default=None)
    ap.add_argument("--no-resnet50", action="store_true")
    ap.add_argument("--json", help="write the rows as JSON")
    a = ap.parse_args(argv)
    paths = [Path(p) for p in a.models]
    if not paths:
        paths = sorted((ROOT / "models").glob("*.onnx")) + sorted((ROOT / "artifacts" / "onnx").glob("*_digits.onnx"))
    tmp = None
    if not a.no_resnet50:
        from synthetic_models import resnet50

        tmp = tempfile.TemporaryDirectory()
        p = Path(tmp.name) / "resnet50_random.onnx"
        import onnx

        onnx.save(resnet50(seed=0), str(p))
        paths.append(p)
    rows = []
    for p in paths:
        print(f"... {p}", file=sys.stderr)
        rows += bench_model(p, a.budgets, a.of, a.metric, a.k_max)
    labels = [v[0] for v in VARIANTS]
    head = f"{'model':<22} {'layers':>6} {'budget':>6} " + " ".join(f"{l:>11}" for l in labels) + \
           "   " + " ".join(f"{l + ' s':>12}" for l in labels) + f" {'spectra s':>10}"
    print(f"max relative error (lower is better) at a budget of {a.metric} ({a.of}); wall times in seconds")
    print(head)
    for r in rows:
        errs = " ".join(f"{r[l]:>11.4f}" if r[l] is not None else f"{'infeasible':>11}" for l in labels)
        times = " ".join(f"{r[l + '_s']:>12.3f}" for l in labels)
        print(f"{r['model']:<22} {r['layers']:>6} {r['budget']:>6.2f} {errs}   {times} {r['spectra_s']:>10.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

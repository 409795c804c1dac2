"""One-shot accuracy against compression, per error model and method.

For each model (the shipped ResNet20 and every zoo model trained by
``tools/train_models.py`` into artifacts/onnx/), each error model (paper,
spectral, frobenius, data) and method (alds, uniform) and each budget
(keep-params 0.7/0.5/0.3/0.15): rewrite with 256 *training* images as
calibration data (data-aware error; never test images), then measure through
onnxruntime the top-1 test accuracy and the output relative L2 on the
held-out test images.  Prints a table, writes CSV and a plot (accuracy
against kept parameters, one line per error model × method) to
artifacts/oneshot/.  For every budget it also compares alds with uniform on
the same test images (paired): the images each gets right that the other
gets wrong, and the exact McNemar p-value of the difference (pairs.csv).

    python tools/oneshot_accuracy.py [--models resnet20 vgg_small ...] [--allow-slower]
    python tools/oneshot_accuracy.py --metric latency --budgets 0.9 0.8 0.7 --errors data --methods alds

``--metric latency`` reads the budgets as ``--keep-latency`` fractions: each
row then also has the rewrite's measured and predicted speed-up (batch 1,
its own closed loop), and the plot is accuracy against measured speed-up.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx_alds  # noqa: E402
from models.data import load_digits_split  # noqa: E402

ERRORS = ("paper", "spectral", "frobenius", "data")


def model_path(name: str) -> Path:
    if name == "resnet20":
        return ROOT / "models" / "resnet20_digits.onnx"
    return ROOT / "artifacts" / "onnx" / f"{name}.onnx"


def evaluate(model, x, y, ref=None):
    import onnxruntime as ort

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: x})[0]
    acc = float((out.argmax(1) == y).mean())
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if ref is not None else 0.0
    return acc, rel, out


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs."""
    import math

    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(preds: dict, y) -> list[dict]:
    """alds against uniform on the same images, per model, error model and budget."""
    rows = []
    for (name, err, method, keep), p in sorted(preds.items()):
        other = preds.get((name, err, "uniform", keep))
        if method != "alds" or other is None:
            continue
        a_right, u_right = p == y[name], other == y[name]
        b, c = int((a_right & ~u_right).sum()), int((~a_right & u_right).sum())
        rows.append(dict(model=name, error=err, keep=keep, alds_minus_uniform=round(100 * (b - c) / len(p), 2),
                         only_alds_right=b, only_uniform_right=c, mcnemar_p=round(mcnemar_p(b, c), 4)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg_small", "mobilenet_small",
                                                   "transformer_small"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.3, 0.15])
    p.add_argument("--errors", nargs="+", default=list(ERRORS))
    p.add_argument("--methods", nargs="+", default=["alds", "uniform"])
    p.add_argument("--calibration", type=int, default=256, help="training images used as calibration data")
    p.add_argument("--allow-slower", action="store_true", help="rewrite without the speed guard")
    p.add_argument("--metric", choices=["params", "latency"], default="params",
                   help="what the budgets keep: parameters (--keep-params) or latency (--keep-latency)")
    p.add_argument("--out", default=str(ROOT / "artifacts" / "oneshot"))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, preds, labels = [], {}, {}
    for name in a.models:
        path = model_path(name)
        if not path.exists():
            print(f"{name}: {path} is missing (python tools/train_models.py makes it); skipped", flush=True)
            continue
        meta_path = path.with_suffix(".json")
        size = json.loads(meta_path.read_text())["input"]["shape"][2] if meta_path.exists() else 16
        x_tr, _, x_te, y_te = load_digits_split(size=size, seed=0)
        x_te, y_te = x_te.numpy(), y_te.numpy()
        cal = {onnx_alds.io.load_model(path).graph.input[0].name: x_tr.numpy()[: a.calibration]}
        acc0, _, ref = evaluate(path, x_te, y_te)
        labels[name] = y_te
        print(f"{name}: original test accuracy {100 * acc0:.2f} %", flush=True)
        for err in a.errors:
            for method in a.methods:
                for keep in a.budgets:
                    t0 = time.perf_counter()
                    try:
                        budget = {f"keep_{a.metric}": keep}
                        new, rep = onnx_alds.rewrite(path, **budget, method=method, error=err,
                                                     calibration=cal if err == "data" else None,
                                                     validate=False, compare=False, provider="cpu",
                                                     allow_slower=a.allow_slower)
                    except onnx_alds.errors.AldsError as e:
                        print(f"  {err:9} {method:7} keep {keep}: {e}", flush=True)
                        continue
                    wall = time.perf_counter() - t0
                    acc, rel, out_te = evaluate(new, x_te, y_te, ref)
                    preds[(name, err, method, keep)] = out_te.argmax(1)
                    row = dict(model=name, error=err, method=method, keep=keep,
                               params_kept=round(rep.params_fraction, 4), original=round(100 * acc0, 2),
                               one_shot=round(100 * acc, 2), test_rel_l2=round(rel, 4),
                               max_predicted=round(rep.max_rel_error, 4),
                               max_measured=round(rep.max_measured_error or 0.0, 4),
                               calibration_s=round(rep.timings_s.get("calibrate", 0.0), 2), wall_s=round(wall, 2),
                               metric=a.metric, measured_speedup=rep.budget.get("measured_speedup"),
                               predicted_speedup=rep.budget.get("predicted_speedup"))
                    rows.append(row)
                    speed = (f"  measured {row['measured_speedup']:.2f}x (predicted {row['predicted_speedup']:.2f}x)"
                             if a.metric == "latency" else "")
                    print(f"  {err:9} {method:7} keep {keep:<4} params {row['params_kept']:.3f}  one-shot "
                          f"{row['one_shot']:6.2f} %  test rel L2 {rel:.3f}  max ε {row['max_predicted']:.3f} "
                          f"(measured {row['max_measured']:.3f})  calibration {row['calibration_s']} s{speed}",
                          flush=True)
    if not rows:
        return 1
    with open(out / "oneshot.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pairs = paired(preds, labels)
    if pairs:
        print("alds against uniform on the same test images (points; images only one gets right; exact McNemar p):")
        for r in pairs:
            print(f"  {r['model']:18} {r['error']:9} keep {r['keep']:<4} {r['alds_minus_uniform']:+6.2f}  "
                  f"({r['only_alds_right']} vs {r['only_uniform_right']}, p = {r['mcnemar_p']:.3g})")
        with open(out / "pairs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(pairs[0]))
            w.writeheader()
            w.writerows(pairs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for err in a.errors:
            for method in a.methods:
                x = "measured_speedup" if a.metric == "latency" else "params_kept"
                pts = sorted((r[x], r["one_shot"]) for r in rows
                             if r["model"] == name and r["error"] == err and r["method"] == method)
                if pts:
                    ax.plot(*zip(*pts), marker="o", ls="-" if method == "alds" else "--", label=f"{err} / {method}")
        ax.axhline(next(r["original"] for r in rows if r["model"] == name), color="k", lw=0.8, label="original")
        ax.set_title(name)
        ax.set_xlabel("measured speed-up (batch 1)" if a.metric == "latency" else "parameters kept")
        ax.set_ylabel("one-shot test accuracy (%)")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "oneshot.png", dpi=110)
    print(f"wrote {out / 'oneshot.csv'} and {out / 'oneshot.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency benchmark: --keep-params, --keep-flops and --keep-latency side by
side, on the shipped models and a ResNet-50-sized layout.

    python tools/bench_latency.py                      # models/*.onnx + ResNet-50, budgets 0.3 0.5 0.7
    python tools/bench_latency.py models/resnet20_digits.onnx --budgets 0.5 --plot artifacts/latency.png

For every model and budget F it rewrites with each of the three budgets at F,
then measures the original and all rewritten models in one interleaved
onnxruntime run (batch 1, fixed threads) and prints kept FLOPs, predicted
speed-up (FLOPs ratio for params/FLOPs budgets, the latency table's
prediction for the latency budget), measured speed-up and max ε.  It also
prints, at equal max ε, the measured speed-up of --keep-latency against
--keep-params (interpolated along each budget's curve), and plots measured
speed-up against max ε.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from onnx_alds import rewrite  # noqa: E402
from onnx_alds.api import analyze  # noqa: E402
from onnx_alds.bench import bench  # noqa: E402
from onnx_alds.measure.latency_table import LatencyTable  # noqa: E402

METRICS = ("params", "flops", "latency")


def run_model(path: Path, budgets, *, provider, threads, repeats, k_max, cache_dir, workdir: Path):
    model = onnx.load(str(path))
    _, _, info = analyze(model)
    print(f"... {path.name}: latency table", file=sys.stderr)
    table = LatencyTable.for_model(model, info, provider=provider, threads=threads, k_max=k_max,
                                   progress=sys.stderr.isatty())
    print(f"    {table.measured} measured, {table.cached} cached; model {table.model_ms:.3f} ms", file=sys.stderr)
    rows, paths = [], [path]
    for frac in budgets:
        for metric in METRICS:
            kw = {f"keep_{metric}": frac}
            try:
                new, rep = rewrite(model, **kw, k_max=k_max, latency_table=table, validate=False, compare=False,
                                   cache_dir=cache_dir)
            except Exception as e:
                print(f"    {metric} at {frac}: {e}", file=sys.stderr)
                continue
            out = workdir / f"{path.stem}_{metric}_{frac}.onnx"
            onnx.save(new, str(out))
            pred = (table.model_ms / rep.budget["predicted_ms"] if metric == "latency"
                    else 1.0 / rep.flops_fraction)
            rows.append({"model": path.stem, "budget": frac, "metric": metric, "kept_params": rep.params_fraction,
                         "kept_flops": rep.flops_fraction, "predicted_speedup": pred,
                         "max_rel_error": rep.max_rel_error, "file": str(out)})
            paths.append(out)
    print(f"... {path.name}: timing {len(paths)} models interleaved", file=sys.stderr)
    res = bench(paths, provider=provider, batches=[1], repeats=repeats, warmup=3, threads=threads)
    by_file = {r["model"]: r for r in res}
    for r in rows:
        r["measured_speedup"] = by_file[r["file"]]["speedup"]
        r["median_ms"] = by_file[r["file"]]["median_ms"]
    return rows, by_file[str(path)]["median_ms"], table.provider


def speedup_at_equal_error(rows, model):
    """Measured speed-up of latency vs params budgets at the same max ε (interpolated)."""
    def curve(metric):
        pts = sorted((r["max_rel_error"], r["measured_speedup"]) for r in rows
                     if r["model"] == model and r["metric"] == metric)
        return np.array(pts).T if pts else None

    lat, par = curve("latency"), curve("params")
    if lat is None or par is None:
        return []
    out = []
    for e, s_lat in zip(*lat):
        if par[0].min() <= e <= par[0].max():
            s_par = float(np.interp(e, par[0], par[1]))
            out.append((float(e), float(s_lat), s_par, float(s_lat / s_par)))
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        for metric, style in zip(METRICS, ("o-", "s--", "^-")):
            pts = sorted((r["max_rel_error"], r["measured_speedup"]) for r in rows
                         if r["model"] == m and r["metric"] == metric)
            if pts:
                ax.plot(*zip(*pts), style, label=f"--keep-{metric}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("max relative error ε")
        ax.set_ylabel("measured speed-up")
        ax.set_title(m)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.15, 0.3, 0.5, 0.7, 0.85, 0.95])
    ap.add_argument("--provider", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--k-max", type=int, default=16)
    ap.add_argument("--no-resnet50", action="store_true")
    ap.add_argument("--plot", default=str(ROOT / "artifacts" / "latency_vs_error.png"))
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    paths = [Path(p) for p in a.models] or sorted((ROOT / "models").glob("*.onnx"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not a.no_resnet50:
            from synthetic_models import resnet50

            p = tmp / "resnet50_random.onnx"
            onnx.save(resnet50(seed=0), str(p))
            paths.append(p)
        rows = []
        for p in paths:
            r, base_ms, prov = run_model(p, a.budgets, provider=a.provider, threads=a.threads, repeats=a.repeats,
                                         k_max=a.k_max, cache_dir=tmp / "spectra", workdir=tmp)
            print(f"    {p.stem}: original {base_ms:.3f} ms on {prov}", file=sys.stderr)
            rows += r
    print(f"provider {prov}, batch 1, {a.threads} threads; speed-ups measured side by side in one run")
    print(f"{'model':<22} {'budget':>6} {'metric':<8} {'kept params':>11} {'kept FLOPs':>10} "
          f"{'pred. x':>8} {'meas. x':>8} {'max ε':>8}")
    for r in rows:
        print(f"{r['model']:<22} {r['budget']:>6.2f} {r['metric']:<8} {r['kept_params']:>11.3f} "
              f"{r['kept_flops']:>10.3f} {r['predicted_speedup']:>8.2f} {r['measured_speedup']:>8.2f} "
              f"{r['max_rel_error']:>8.4f}")
    for m in sorted({r["model"] for r in rows}):
        for e, s_lat, s_par, ratio in speedup_at_equal_error(rows, m):
            print(f"{m}: at max ε {e:.4f}: --keep-latency {s_lat:.2f}x vs --keep-params {s_par:.2f}x "
                  f"(ratio {ratio:.2f})")
    if a.plot:
        Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
        plot(rows, a.plot)
        print(f"plot: {a.plot}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

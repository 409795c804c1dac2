"""Benchmark the CLI's rewrites on real architectures: predicted against
measured speed-up, and output error, per budget setting.  Never run in CI.

    python tools/bench_real.py                                   # every model and setting (hours on 2 cores)
    python tools/bench_real.py --models resnet18 resnet20 --settings default params0.5 latency0.6
    python tools/bench_real.py --skip-export --repeats 30
    python tools/bench_real.py --models swin_t fcn_resnet50 --settings default params0.5 default+cal --repeats 0

Models: torchvision's resnet18, mobilenet_v2, efficientnet_b0, convnext_tiny
and vit_b_16 with random weights (exported by ``tools/export_torchvision.py``
in its own venv, ``--tv-python``; 1×3×224×224, dynamic batch), the shipped
``models/resnet20_digits.onnx`` (trained) and the ResNet-50 layout of
``tools/synthetic_models.py`` (random); any other classifier of
``torchvision.models`` by name, and the segmentation models that
``export_torchvision.py`` lists (graph coverage).  Random weights have flat
spectra: the output errors of those say little about accuracy; the speed-ups
hold.

Settings: ``default`` (the CLI's default budget), ``latency0.8``,
``latency0.6``, ``latency0.4`` (``--keep-latency F``) and ``params0.5``
(``--keep-params 0.5``); any ``paramsF``/``flopsF``/``latencyF`` works, and
``+cal`` after a setting adds ``--calibration`` with 32 seeded random images
(or the model's own input shape; random data exercises the data-aware path,
it says nothing about accuracy).  Each
rewrite runs as ``onnx-alds rewrite IN OUT --report R.json`` in a
subprocess; a rewrite that fails is a row with its exit code and error
sentence, and every row checks that the input file is byte for byte as it was.  The predicted speed-up is the report's ``budget.predicted_speedup``
(latency budgets only); the rewrite's own whole-model check is
``budget.measured_speedup``.  Then the original and every rewrite are timed
interleaved (``onnx_alds.bench.bench``, onnxruntime CPU, ``--threads`` 2) at
batch 1 and 8, and the output rel L2 against the original is taken on the
same seeded inputs (batch 8); ``--repeats 0`` skips the timing (a coverage run: exit codes,
params, the rewrite's own validation).  ``--int8`` adds an int8 copy of the
original and of each rewrite (``onnx-alds quantize``, random calibration) to
the same interleaved run, with their speed-up over the int8 original.  Table on stdout; CSV, JSON and a plot of
measured against predicted speed-up in ``artifacts/bench_real/``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnx_alds.bench import bench  # noqa: E402

TORCHVISION = ("resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16")
MODELS = TORCHVISION + ("resnet20", "resnet50")
LOCAL = ("resnet20", "resnet50")  # not exported from torchvision
SETTINGS = ("default", "latency0.8", "latency0.6", "latency0.4", "params0.5")


def model_path(name: str, onnx_dir: Path) -> Path:
    if name == "resnet20":
        return ROOT / "models" / "resnet20_digits.onnx"
    if name == "resnet50":
        return onnx_dir / "resnet50_random.onnx"
    return onnx_dir / f"{name}.onnx"


def ensure_models(names, onnx_dir: Path, tv_python: str, skip_export: bool) -> dict[str, Path]:
    onnx_dir.mkdir(parents=True, exist_ok=True)
    todo = [n for n in names if n not in LOCAL and not model_path(n, onnx_dir).exists()]
    if todo and not skip_export:
        print(f"... exporting {' '.join(todo)} with {tv_python}", file=sys.stderr)
        subprocess.run([tv_python, str(ROOT / "tools" / "export_torchvision.py"), *todo, "--out", str(onnx_dir)],
                       check=False)
    if "resnet50" in names and not model_path("resnet50", onnx_dir).exists() and not skip_export:
        subprocess.run([sys.executable, str(ROOT / "tools" / "synthetic_models.py"), "resnet50",
                        str(model_path("resnet50", onnx_dir))], check=False)
    found = {}
    for n in names:
        p = model_path(n, onnx_dir)
        if p.exists():
            found[n] = p
        else:
            print(f"!!! {n}: {p} is missing (export failed, or --skip-export); skipped", file=sys.stderr)
    return found


def setting_flags(setting: str, calibration: Path | None = None) -> list[str]:
    if setting.endswith("+cal"):
        return setting_flags(setting.removesuffix("+cal")) + ["--calibration", str(calibration or "CAL.npz")]
    if setting == "default":
        return []
    for metric in ("params", "flops", "latency"):
        if setting.startswith(metric):
            try:
                float(setting[len(metric):])
            except ValueError:
                break
            return [f"--keep-{metric}", setting[len(metric):]]
    raise SystemExit(f"unknown setting {setting!r} (use default, paramsF, flopsF or latencyF, each optionally +cal)")


def random_calibration(src: Path, workdir: Path, samples: int = 32) -> Path:
    """``samples`` seeded standard-normal inputs at the model's input shape (open dims: 224), saved as an npz
    named after the model, for the ``+cal`` settings."""
    import numpy as np
    import onnx

    path = workdir / f"{src.stem}.cal.npz"
    if not path.exists():
        inp = onnx.load(str(src), load_external_data=False).graph.input[0]
        dims = [d.dim_value if d.dim_value > 0 else 224 for d in inp.type.tensor_type.shape.dim[1:]]
        x = np.random.default_rng(0).standard_normal((samples, *dims)).astype(np.float32)
        np.savez(path, **{inp.name: x})
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_rewrite(src: Path, setting: str, workdir: Path, timeout: float) -> dict:
    out = workdir / f"{src.stem}_{setting}.onnx"
    rep = workdir / f"{src.stem}_{setting}.report.json"
    for stale in (out, rep):
        stale.unlink(missing_ok=True)
    cal = random_calibration(src, workdir) if setting.endswith("+cal") else None
    before = digest(src)
    cmd = [sys.executable, "-m", "onnx_alds", "rewrite", str(src), str(out), *setting_flags(setting, cal),
           "--report", str(rep), "-q"]
    row = {"setting": setting, "command": " ".join(["onnx-alds"] + cmd[3:]), "file": str(out)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        row["exit_code"], err = p.returncode, p.stderr
    except subprocess.TimeoutExpired as e:
        row["exit_code"] = "timeout"
        err = f"onnx-alds: error: no result after {timeout:.0f} s"
        if e.stderr:
            err = (e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr) + "\n" + err
    row["rewrite_s"] = round(time.perf_counter() - t0, 1)
    row["input_unchanged"] = digest(src) == before
    row["error"] = None
    if row["exit_code"] != 0:
        lines = [l for l in (err or "").splitlines() if l.strip()]
        said = [l for l in lines if l.startswith("onnx-alds:")]
        row["error"] = (said or lines or ["(no message)"])[-1].removeprefix("onnx-alds: ").removeprefix("error: ")
    if row["exit_code"] == 0 and rep.exists():
        r = json.loads(rep.read_text())
        b = r.get("budget") or {}
        row.update(params_kept=r["params_after"] / r["params_before"] if r.get("params_before") else None,
                   flops_kept=(r["flops_after"] / r["flops_before"]
                               if r.get("flops_before") and r.get("flops_after") is not None else None),
                   max_rel_error=r.get("max_rel_error"), predicted_speedup=b.get("predicted_speedup"),
                   rewrite_measured_speedup=b.get("measured_speedup"),
                   validation_rel_l2=(r.get("validation") or {}).get("rel_l2"),
                   validation_speedup=_ratio((r.get("validation") or {}).get("latency_ms_before"),
                                             (r.get("validation") or {}).get("latency_ms_after")))
    return row


def _ratio(a, b):
    return a / b if a and b else None


def quantize_rows(rows: list[dict], workdir: Path) -> list[dict]:
    """An int8 copy (onnx_alds.quantize, random calibration) of the original
    and of every rewrite that succeeded; a failure is a row with the sentence."""
    from onnx_alds.errors import AldsError
    from onnx_alds.quantize import quantize

    out = []
    for r in rows:
        if r["exit_code"] != 0:
            continue
        src = Path(r["file"])
        q = workdir / f"{r['model']}_{r['setting']}.int8.onnx"
        row = {"model": r["model"], "setting": f"{r['setting']} int8", "file": str(q),
               "params_kept": r.get("params_kept"), "predicted_speedup": None, "int8": True}
        t0 = time.perf_counter()
        try:
            res = quantize(src, q)
            row.update(exit_code=0, error=None, int8_rel_l2_vs_fp32=res.rel_l2)
        except AldsError as e:
            row.update(exit_code=e.exit_code, error=str(e))
        row["quantize_s"] = round(time.perf_counter() - t0, 1)
        out.append(row)
    return out


def bench_model(name: str, src: Path, rows: list[dict], *, batches, repeats: int, threads: int) -> None:
    ok = [r for r in rows[1:] if r["exit_code"] == 0]  # rows[0] is the original
    paths = [src] + [Path(r["file"]) for r in ok]
    print(f"... {name}: timing {len(paths)} models interleaved at batch {','.join(map(str, batches))}",
          file=sys.stderr)
    res = bench(paths, batches=batches, repeats=repeats, warmup=3, threads=threads,
                labels=["original"] + [r["setting"] for r in ok])
    by_label = {"original": rows[0], **{r["setting"]: r for r in ok}}
    for r in res:
        target = by_label[r["model"]]
        target[f"ms_b{r['batch']}"] = r["median_ms"]
        target[f"speedup_b{r['batch']}"] = r["speedup"]
        if r["batch"] == max(batches):
            target["rel_l2_vs_original"] = r["rel_l2_vs_first"]
    base8 = by_label.get("original int8")
    for r in by_label.values():
        for b in batches:
            if r.get("int8") and base8 and r.get(f"ms_b{b}"):
                r[f"vs_int8_original_b{b}"] = base8[f"ms_b{b}"] / r[f"ms_b{b}"]


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def format_table(rows: list[dict], batches) -> str:
    int8 = any(r.get("int8") for r in rows)
    cols = ["model", "setting", "params kept", "pred. speed-up"] + [f"meas. b{b}" for b in batches] + \
           ([f"vs int8 orig b{b}" for b in batches] if int8 else []) + \
        ["rel L2 vs orig", "rewrite's speed-up", "rewrite s", "input kept", "exit", "error"]
    lines = []
    for r in rows:
        cells = [r["model"], r["setting"], _fmt(r.get("params_kept"), ".3f"), _fmt(r.get("predicted_speedup"), ".2f")]
        cells += [_fmt(r.get(f"speedup_b{b}"), ".2f") for b in batches]
        if int8:
            cells += [_fmt(r.get(f"vs_int8_original_b{b}"), ".2f") for b in batches]
        rel = r.get("rel_l2_vs_original", r.get("validation_rel_l2"))
        kept = {True: "yes", False: "NO"}.get(r.get("input_unchanged"), "-")
        cells += [_fmt(rel, ".3g"), _fmt(r.get("validation_speedup"), ".2f"), _fmt(r.get("rewrite_s"), ".0f"), kept,
                  str(r.get("exit_code", "")), r.get("error") or ""]
        lines.append(cells)
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(cols)]
    widths[-1] = len(cols[-1])  # the error sentence is not padded
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    settings = sorted({r["setting"] for r in rows if r["setting"] != "original"})
    hi = 1.5
    for i, s in enumerate(settings):
        pts = [(r["predicted_speedup"], r["speedup_b1"], r["model"]) for r in rows
               if r["setting"] == s and r.get("predicted_speedup") and r.get("speedup_b1")]
        flops = [(1 / r["flops_kept"], r["speedup_b1"], r["model"]) for r in rows
                 if r["setting"] == s and not r.get("predicted_speedup") and r.get("flops_kept")
                 and r.get("speedup_b1")]
        color = f"C{i}"
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=f"{s} (latency table)")
        if flops:
            ax.scatter([p[0] for p in flops], [p[1] for p in flops], facecolors="none", edgecolors=color,
                       label=f"{s} (FLOPs ratio)")
        for x, y, m in pts + flops:
            ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            hi = max(hi, x, y)
    ax.plot([0, hi * 1.05], [0, hi * 1.05], "k--", lw=0.8, label="measured = predicted")
    ax.axhline(1.0, color="grey", lw=0.6)
    ax.set_xlabel("predicted speed-up (latency table; open: 1 / kept FLOPs)")
    ax.set_ylabel("measured speed-up, batch 1 (onnxruntime CPU)")
    ax.set_title("onnx-alds rewrites: measured against predicted")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME",
                    help=f"default: {' '.join(MODELS)}; any other torchvision model export_torchvision.py takes")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), metavar="S",
                    help=f"default: {' '.join(SETTINGS)}")
    ap.add_argument("--repeats", type=int, default=20,
                    help="timed runs per model and batch (interleaved); 0: no timing (coverage)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-export", action="store_true", help="use only the ONNX files already there")
    ap.add_argument("--onnx-dir", default=str(ROOT / "artifacts" / "onnx"))
    ap.add_argument("--out", default=str(ROOT / "artifacts" / "bench_real"))
    ap.add_argument("--tv-python", default=os.environ.get("TV_PYTHON", "/work/tv-venv/bin/python"),
                    help="python of the torchvision venv, for the export")
    ap.add_argument("--int8", action="store_true",
                    help="also time an int8 copy (onnx-alds quantize, random calibration) of the original and "
                         "of each rewrite")
    ap.add_argument("--rewrite-timeout", type=float, default=3600, help="seconds per rewrite")
    a = ap.parse_args(argv)
    for s in a.settings:
        setting_flags(s)  # unknown settings fail before any work
    batches = [int(b) for b in a.batches.split(",") if b]
    out = Path(a.out)
    workdir = out / "models"
    workdir.mkdir(parents=True, exist_ok=True)
    models = ensure_models(a.models, Path(a.onnx_dir), a.tv_python, a.skip_export)
    all_rows = []
    for name, src in models.items():
        rows = [{"model": name, "setting": "original", "exit_code": 0, "params_kept": 1.0, "file": str(src)}]
        for s in a.settings:
            print(f"... {name}: rewrite {s}", file=sys.stderr)
            r = run_rewrite(src, s, workdir, a.rewrite_timeout)
            r["model"] = name
            print(f"    exit {r['exit_code']} in {r['rewrite_s']} s" + (f": {r['error']}" if r.get("error") else ""),
                  file=sys.stderr)
            rows.append(r)
        if a.int8:
            print(f"... {name}: int8 copies", file=sys.stderr)
            rows += quantize_rows(rows, workdir)
        if a.repeats > 0:
            bench_model(name, src, rows, batches=batches, repeats=a.repeats, threads=a.threads)
        all_rows += rows
        # written after every model, so that a long run leaves what it has
        (out / "bench_real.json").write_text(json.dumps(all_rows, indent=2) + "\n")
    keys = list(dict.fromkeys(k for r in all_rows for k in r))
    with open(out / "bench_real.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(all_rows)
    (out / "bench_real.json").write_text(json.dumps(all_rows, indent=2) + "\n")
    print(format_table(all_rows, batches))
    try:
        plot(all_rows, out / "bench_real.png")
        print(f"wrote {out / 'bench_real.csv'}, {out / 'bench_real.json'}, {out / 'bench_real.png'}")
    except ImportError:
        print(f"wrote {out / 'bench_real.csv'}, {out / 'bench_real.json'} (no matplotlib: no plot)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

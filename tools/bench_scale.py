"""Where a rewrite's time and memory go, stage by stage, as models grow.

For each model, ``onnx-alds rewrite`` runs in a fresh process under
``/usr/bin/time -v`` (peak RSS), weight-only and with calibration data
(random, seeded; sequential calibration on), and the report's ``timings_s`` are printed as one
markdown table (seconds per stage; the stages are the pipeline's: extract,
calibrate = moments, errors = spectra / data-aware errors, select,
candidates, factorize = factors and the sequential fit, emit, validate).

    python tools/bench_scale.py --work artifacts/scale
    python tools/bench_scale.py --models resnet20,chain5000 --samples 32

Models: ``resnet20`` (the shipped models/resnet20_digits.onnx), ``resnet50``
(tools/synthetic_models.py, random weights), ``bert`` (a 12-layer
BERT-base-sized ``nn.TransformerEncoder``, random weights, exported with
``onnx_alds.torch.export``), ``encN`` (the same with N layers 128 wide, 4 heads, for depth:
``--models enc2,enc8 --samples 64``), ``chainN`` (N 1×1 convs), and one large layer:
``gemmN`` (an N×N Gemm, ``gemm4096``: 64 MB of float32) and ``convCkK`` (a C×C
Conv with a K×K kernel, ``conv1024k4``: 64 MB), seeded normal weights scaled
by 1/√fan-in.  Peak RSS is also given less the imports' (``python`` importing
every module a rewrite imports, measured once), and for one-layer models as a
multiple of the weight's bytes (docs/scale.md, "Memory bounded by the weights"):

    python tools/bench_scale.py --models gemm4096,conv1024k4 --calibration off \
        --rewrite-args "--keep-params 0.5"

A benchmark, never a test: times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
log = logging.getLogger("bench_scale")

STAGES = ("extract", "calibrate", "errors", "select", "candidates", "factorize", "emit", "check", "validate")
DEFAULT_MODELS = "resnet20,resnet50,bert,chain5000"


def _encoder(path: Path, layers: int = 12, width: int = 768, heads: int = 12, ffn: int = 3072) -> None:
    """An ``nn.TransformerEncoder`` (random weights, seed 0) exported with ``onnx_alds.torch.export``."""
    import torch
    from torch import nn

    from onnx_alds.torch import export

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, x):
            return self.enc(x)

    torch.manual_seed(0)
    export(Encoder().eval(), (torch.randn(2, 32, width),), path)


def single_layer(name: str) -> onnx.ModelProto | None:
    """``gemmN`` (x: N×?, Gemm with transB, weight N×N) or ``convCkK`` (x: C×8×8, a K×K Conv from C
    to C channels); weights ``standard_normal / √fan-in`` in float32, seed 0."""
    from onnx import TensorProto, helper, numpy_helper

    m = re.fullmatch(r"gemm(\d+)|conv(\d+)k(\d+)", name)
    if m is None:
        return None
    rng = np.random.default_rng(0)
    if m.group(1):
        n = int(m.group(1))
        w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
        node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
        shape = ["N", n]
    else:
        c, k = int(m.group(2)), int(m.group(3))
        w = (rng.standard_normal((c, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[k, k])
        shape = ["N", c, 8, 8]
    out = shape if m.group(1) else ["N", c, 9 - k, 9 - k]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)], [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def model_path(name: str, work: Path) -> Path:
    """The model's file, built once into ``work``."""
    import onnx
    import synthetic_models

    if name == "resnet20":
        return ROOT / "models" / "resnet20_digits.onnx"
    path = work / f"{name}.onnx"
    if path.exists():
        return path
    work.mkdir(parents=True, exist_ok=True)
    if name == "bert":
        _encoder(path)
    elif re.fullmatch(r"enc\d+", name):
        _encoder(path, layers=int(name[3:]), width=128, heads=4, ffn=512)
    elif name.startswith("chain"):
        onnx.save(synthetic_models.chain(int(name[5:] or 400)), str(path))
    elif name == "resnet50":
        onnx.save(synthetic_models.resnet50(), str(path))
    elif single_layer(name) is not None:
        onnx.save(single_layer(name), str(path))
    else:
        raise SystemExit(f"unknown model {name!r}")
    return path


def calibration_file(model: Path, samples: int, work: Path) -> Path:
    """Seeded normal inputs for every graph input, symbolic dimensions from the first axis on."""
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    rng = np.random.default_rng(0)
    arrays = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 32 for d in i.type.tensor_type.shape.dim]
        arrays[i.name] = rng.standard_normal([samples] + dims[1:]).astype(np.float32)
    path = work / f"{model.stem}.cal{samples}.npz"
    np.savez(path, **arrays)
    return path


def weight_bytes(model: Path) -> int:
    """Bytes of the model's initializers (its weights)."""
    import onnx

    m = onnx.load(str(model))
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in m.graph.initializer)


def import_baseline_mb(modules: list[str]) -> float:
    """Peak RSS (MB) of a Python that imports ``modules`` (what a rewrite imports) and does nothing."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n" \
           "    except Exception:\n        pass\n"
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, *modules], capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return int(rss.group(1)) / 1024 if rss else float("nan")


IMPORTS = ["numpy", "scipy.linalg", "onnx", "onnx_graphsurgeon", "onnxruntime", "threadpoolctl", "tqdm.auto",
           "onnx_alds.cli", "onnx_alds.api", "onnx_alds.spectra", "onnx_alds.validate"]


def run_one(model: Path, out_dir: Path, cal: Path | None, extra: list[str]) -> dict:
    report = out_dir / f"{model.stem}.{'cal' if cal else 'w'}.json"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "onnx_alds", "rewrite", str(model),
           str(out_dir / f"{model.stem}.out.onnx"), "--report", str(report), "-q", *extra]
    if cal is not None:
        cmd += ["--calibration", str(cal), "--sequential"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    row = {"wall_s": wall, "rss_mb": int(rss.group(1)) / 1024 if rss else None, "rc": p.returncode}
    if p.returncode == 0 and report.exists():
        row["timings"] = json.loads(report.read_text()).get("timings_s", {})
    else:
        row["error"] = next((ln for ln in p.stderr.splitlines() if "error" in ln), p.stderr[-200:])
    return row


def table(rows: list[tuple[str, str, dict]], baseline: float | None = None) -> str:
    head = "| model | calibration | " + " | ".join(STAGES) + " | other | total s | peak RSS MB |"
    lines = [head, "|" + "---|" * (len(STAGES) + 5)]
    if baseline is not None:
        lines[0] += " less imports MB | x weight (raw / less imports) |"
        lines[1] += "---|---|"
    for name, mode, r in rows:
        if "timings" not in r:
            lines.append(f"| {name} | {mode} | failed (exit {r['rc']}): {r.get('error', '')[:80]} |")
            continue
        t = r["timings"]
        other = sum(v for k, v in t.items() if k not in STAGES)
        cells = [f"{t[s]:.2f}" if s in t else "" for s in STAGES]
        line = f"| {name} | {mode} | " + " | ".join(cells) + f" | {other:.2f} | {r['wall_s']:.1f} | {r['rss_mb']:.0f} |"
        if baseline is not None:
            w = r["weight_mb"]
            line += f" {r['rss_mb'] - baseline:.0f} | {r['rss_mb'] / w:.1f} / {(r['rss_mb'] - baseline) / w:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--work", type=Path, default=ROOT / "artifacts" / "scale")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples")
    ap.add_argument("--calibration", choices=("both", "on", "off"), default="both")
    ap.add_argument("--rewrite-args", default="--keep-params 0.5 --allow-slower",
                    help="extra arguments for onnx-alds rewrite")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    a.work.mkdir(parents=True, exist_ok=True)
    baseline = import_baseline_mb(IMPORTS)
    log.info("imports alone: %.0f MB peak RSS", baseline)
    rows = []
    for name in a.models.split(","):
        model = model_path(name, a.work)
        modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.calibration]
        for with_cal in modes:
            cal = calibration_file(model, a.samples, a.work) if with_cal else None
            r = run_one(model, a.work, cal, a.rewrite_args.split())
            r["weight_mb"] = weight_bytes(model) / 2 ** 20
            mode = f"{a.samples} samples" if with_cal else "weight-only"
            log.info("%s, %s: %.1f s, %s MB peak%s", name, mode, r["wall_s"], r["rss_mb"],
                     "" if r["rc"] == 0 else f" (exit {r['rc']})")
            rows.append((name, mode, r))
    sys.stdout.write(table(rows, baseline) + "\n")
    sys.stdout.write(f"\n(imports alone: {baseline:.0f} MB peak RSS)\n")
    sys.stdout.write(f"\n(command: {' '.join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

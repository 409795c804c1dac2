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
``onnx_alds.torch.export``), ``chainN`` (N 1×1 convs).  A benchmark, never a
test: numbers depend on the machine and its load.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
log = logging.getLogger("bench_scale")

STAGES = ("extract", "calibrate", "errors", "select", "candidates", "factorize", "emit", "check", "validate")
DEFAULT_MODELS = "resnet20,resnet50,bert,chain5000"


def _bert(path: Path) -> None:
    import torch
    from torch import nn

    from onnx_alds.torch import export

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(768, 12, 3072, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)

        def forward(self, x):
            return self.enc(x)

    torch.manual_seed(0)
    export(Encoder().eval(), (torch.randn(2, 32, 768),), path)


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
        _bert(path)
    elif name.startswith("chain"):
        onnx.save(synthetic_models.chain(int(name[5:] or 400)), str(path))
    elif name == "resnet50":
        onnx.save(synthetic_models.resnet50(), str(path))
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


def table(rows: list[tuple[str, str, dict]]) -> str:
    head = "| model | calibration | " + " | ".join(STAGES) + " | other | total s | peak RSS MB |"
    lines = [head, "|" + "---|" * (len(STAGES) + 5)]
    for name, mode, r in rows:
        if "timings" not in r:
            lines.append(f"| {name} | {mode} | failed (exit {r['rc']}): {r.get('error', '')[:80]} |")
            continue
        t = r["timings"]
        other = sum(v for k, v in t.items() if k not in STAGES)
        cells = [f"{t[s]:.2f}" if s in t else "" for s in STAGES]
        lines.append(f"| {name} | {mode} | " + " | ".join(cells)
                     + f" | {other:.2f} | {r['wall_s']:.1f} | {r['rss_mb']:.0f} |")
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
    rows = []
    for name in a.models.split(","):
        model = model_path(name, a.work)
        modes = {"both": (False, True), "on": (True,), "off": (False,)}[a.calibration]
        for with_cal in modes:
            cal = calibration_file(model, a.samples, a.work) if with_cal else None
            r = run_one(model, a.work, cal, a.rewrite_args.split())
            mode = f"{a.samples} samples" if with_cal else "weight-only"
            log.info("%s, %s: %.1f s, %s MB peak%s", name, mode, r["wall_s"], r["rss_mb"],
                     "" if r["rc"] == 0 else f" (exit {r['rc']})")
            rows.append((name, mode, r))
    sys.stdout.write(table(rows) + "\n")
    sys.stdout.write(f"\n(command: {' '.join([Path(sys.argv[0]).name] + (argv or sys.argv[1:]))})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Where a model's time goes, inside the model: the share of its compressible layers (what
``--keep-latency`` can make faster), of grouped and depthwise convs (not compressible), and of
everything else, from onnxruntime's profiler (``onnx_alds.measure.profile.layer_times``, each node that
onnxruntime runs after its fusions given to the conv or matmul it computes).  A floor that
``--keep-latency`` refuses at is often explained here.  Never run in CI.

    python tools/time_shares.py artifacts/onnx/mobilenet_v2.onnx models/resnet20_digits.onnx [--threads 2]

Measured on this project's 2-core machine: mobilenet_v2 spends 23 % in depthwise convs and 76 % in
its 1×1 convs and classifier; efficientnet_b0 14 %, 57 % and 29 % outside convs (SiLU, the
squeeze-excitation gates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402

from onnx_alds.api import analyze  # noqa: E402
from onnx_alds.measure.profile import layer_times  # noqa: E402
from onnx_alds.runtime import CPU  # noqa: E402


def shares(path: str, threads: int) -> dict:
    model = onnx.load(path)
    _, _, info = analyze(model)
    compressible = {l.name for l in info.candidates}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.name]
    grouped = {n.name for n in layers if any(a.name == "group" and a.i > 1 for a in n.attribute)}
    prof = layer_times([model], [n.name for n in layers], [CPU], threads)[0]
    per = prof["layers"]
    # on a 0.2 ms model the profiler's own cost, taken off each kernel, is only approximate: the
    # layers can add up to a little more than the unprofiled wall time
    wall = max(prof["wall"], sum(per.values()))
    c = sum(v for k, v in per.items() if k in compressible)
    g = sum(v for k, v in per.items() if k in grouped)
    other = max(sum(per.values()) - c - g, 0.0)
    return {"model": path, "wall_ms": wall, "compressible": c / wall, "grouped": g / wall,
            "other_layers": other / wall, "rest": max(wall - sum(per.values()), 0.0) / wall,
            "n_compressible": len(compressible), "n_grouped": len(grouped)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    print(f"{'model':<40} {'ms':>7} {'compressible':>13} {'grouped/dw':>11} {'other convs':>12} {'rest':>6}")
    for path in a.models:
        s = shares(path, a.threads)
        print(f"{Path(path).name:<40} {s['wall_ms']:7.3f} {s['compressible']:12.0%} {s['grouped']:11.0%} "
              f"{s['other_layers']:12.0%} {s['rest']:6.0%}   ({s['n_compressible']} compressible, "
              f"{s['n_grouped']} grouped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The speed guard's thin-product terms, A/B: the default rewrite (``--keep-params 0.5``) selected
once with the measured speed model and once with the same model without the thin-product costs
(``thin_in``/``thin_out`` empty: the guard before they existed), then the original and both rewrites
timed interleaved (onnxruntime CPU, 2 threads) at batch 1 and 8.  Never run in CI.

    python tools/bench_guard.py models/resnet20_digits.onnx artifacts/onnx/mobilenet_v2.onnx [--rounds 3]

Each round measures the speed model afresh, so the rounds show how much the guard and the timings move
with the machine's load; read the means of several rounds, not one ratio.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx_alds  # noqa: E402
from onnx_alds import api  # noqa: E402
from onnx_alds.policy import guarded  # noqa: E402
from onnx_alds.runtime import session  # noqa: E402
from onnx_alds.measure.speed import SpeedModel  # noqa: E402
from onnx_alds.measure.inputs import random_inputs  # noqa: E402
from onnx_alds.measure.timing import interleaved_latency  # noqa: E402


def one_round(paths, threads: int, repeats: int) -> list[dict]:
    with_thin = SpeedModel.measure("cpu", threads)
    guards = {"without thin terms": replace(with_thin, thin_in={}, thin_out={}), "with thin terms": with_thin}
    rows = []
    for path in paths:
        model, _, info = api.analyze(path)
        outs = {}
        for tag, guard in guards.items():
            guarded.speed_guard = lambda provider="auto", threads=2, g=guard: g  # this round's guard
            new, rep = onnx_alds.rewrite(path, keep_params=0.5, validate=False, compare=False, provider="cpu")
            outs[tag] = (new, rep.params_fraction, sum(l.status == "decomposed" for l in rep.layers))
        sessions = [session(model, ["CPUExecutionProvider"], threads)]
        sessions += [session(o[0], ["CPUExecutionProvider"], threads) for o in outs.values()]
        for batch in (1, 8):
            feeds = random_inputs(sessions[0], info.input_shapes, batch=batch)
            times = interleaved_latency(sessions, [feeds] * len(sessions), warmup=5, repeats=repeats)
            med = [float(np.median(t)) for t in times]
            for i, (tag, (_, frac, layers)) in enumerate(outs.items()):
                rows.append(dict(model=Path(path).stem, batch=batch, guard=tag, params=frac, layers=layers,
                                 speedup=med[0] / med[i + 1]))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args(argv)
    rows = []
    for r in range(a.rounds):
        got = one_round(a.models, a.threads, a.repeats)
        for row in got:
            print(f"round {r + 1}  {row['model']:20} b{row['batch']}  {row['guard']:19} params {row['params']:.3f} "
                  f"layers {row['layers']:3}  speed-up {row['speedup']:.2f}", flush=True)
        rows += got
    print("mean speed-up over the rounds:")
    for key in sorted({(r["model"], r["batch"], r["guard"]) for r in rows}):
        vals = [r["speedup"] for r in rows if (r["model"], r["batch"], r["guard"]) == key]
        print(f"  {key[0]:20} b{key[1]}  {key[2]:19} {np.mean(vals):.2f}  ({', '.join(f'{v:.2f}' for v in vals)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

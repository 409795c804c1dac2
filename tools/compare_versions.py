"""Run the same ``onnx-alds rewrite`` command with two checkouts of the code
and say whether they chose the same plan and wrote the same outputs.

    python tools/compare_versions.py /work/v-before /work/main models/resnet20_digits.onnx \\
        -- --keep-params 0.5 --allow-slower

Each checkout runs as ``python -m onnx_alds rewrite MODEL OUT ARGS --plan P --report R``
with its directory first on PYTHONPATH, from a scratch directory (the current
directory would shadow it, and an editable install comes after PYTHONPATH); the
tool checks that the module imported is the checkout's own.  The speed guard and
``--keep-latency`` depend on times kept in ``$ONNX_ALDS_CACHE`` (the speed model,
the latency table and its closed loop's correction): with ``--cache-root DIR`` each
run gets its own copy of DIR, so both start from the same measurements and
neither sees what the other wrote; without it each run starts from an empty cache.
``--runner SCRIPT`` runs ``python SCRIPT rewrite ...`` instead of ``python -m onnx_alds
rewrite ...`` (e.g. a script that patches the timing before calling ``onnx_alds.cli.main``).
``--b-args="..."`` adds arguments to the second run only (a flag the first version lacks).

Plans are equal when every decomposed layer has the same (name, k, scheme,
rank).  Outputs are compared on seeded normal inputs with onnxruntime:
``np.allclose(b, a, rtol=1e-4, atol=1e-4 * max|a|)``.  Exit status: 0 when both
hold (or both runs failed with the same status), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RTOL = 1e-4


def run_version(code: Path, model: Path, extra: list[str], work: Path, tag: str, seed_cache: Path | None,
                runner: Path | None = None) -> dict:
    """Rewrite ``model`` with the checkout ``code``; its plan, report, output path, status and time."""
    cache = work / f"{tag}_cache"
    shutil.rmtree(cache, ignore_errors=True)
    if seed_cache is not None:
        shutil.copytree(seed_cache, cache)
    env = dict(os.environ, PYTHONPATH=str(code.resolve()), ONNX_ALDS_CACHE=str(cache.resolve()))
    where = subprocess.run([sys.executable, "-c", "import onnx_alds; print(onnx_alds.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(code.resolve()):
        sys.exit(f"{code}: python imports onnx_alds from {where}, not from this checkout")
    out, plan, report = (work / f"{tag}{s}" for s in (".onnx", "_plan.json", "_report.json"))
    entry = [str(runner.resolve())] if runner else ["-m", "onnx_alds"]
    cmd = [sys.executable, *entry, "rewrite", str(model.resolve()), str(out), *extra,
           "--plan", str(plan), "--report", str(report)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    rep = json.loads(report.read_text()) if report.exists() else {}
    if plan.exists():
        layers = json.loads(plan.read_text())["layers"]
    else:  # no plan written (e.g. nothing decomposed): the report's decomposed layers
        layers = [x for x in rep.get("layers", []) if x.get("status") == "decomposed"]
    return {"rc": p.returncode, "seconds": seconds, "stderr": p.stderr.strip(),
            "plan": sorted((x["name"], x["k"], x["scheme"], x["rank"]) for x in layers),
            "model": out if out.exists() else None, "max_rel_error": rep.get("max_rel_error"),
            "params_fraction": rep.get("params_fraction"), "flops_fraction": rep.get("flops_fraction")}


def outputs(path: Path, seed: int, batch: int) -> list[np.ndarray]:
    """The model's outputs on seeded normal inputs (open dims set to ``batch``), one CPU thread."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    dtypes = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}
    feed = {i.name: rng.standard_normal([d if isinstance(d, int) else batch for d in i.shape])
            .astype(dtypes[i.type]) for i in sess.get_inputs()}
    return sess.run(None, feed)


def compare_outputs(a: Path, b: Path, seed: int, batch: int) -> tuple[bool, float]:
    """Whether every output of ``b`` is close to ``a``'s, and the largest absolute difference."""
    close, diff = True, 0.0
    for ya, yb in zip(outputs(a, seed, batch), outputs(b, seed, batch), strict=True):
        ya, yb = ya.astype(np.float64), yb.astype(np.float64)
        close &= ya.shape == yb.shape and bool(np.allclose(yb, ya, rtol=RTOL, atol=RTOL * np.abs(ya).max()))
        diff = max(diff, float(np.abs(yb - ya).max())) if ya.shape == yb.shape else float("inf")
    return close, diff


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(usage="%(prog)s [options] CODE_A CODE_B MODEL -- REWRITE_ARGS...",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("code_a", type=Path, help="first checkout (the directory holding onnx_alds/)")
    ap.add_argument("code_b", type=Path, help="second checkout")
    ap.add_argument("model", type=Path, help="input .onnx")
    ap.add_argument("--workdir", type=Path, help="keep the runs' files here (default: a temporary directory)")
    ap.add_argument("--cache-root", type=Path, help="each run's $ONNX_ALDS_CACHE starts as a copy of this "
                    "(default: empty)")
    ap.add_argument("--runner", type=Path, help="run 'python RUNNER rewrite ...' instead of 'python -m onnx_alds'")
    ap.add_argument("--b-args", default="", help="extra rewrite arguments for the second run only, one string: --b-args='--no-hold-out'")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument("--batch", type=int, default=2, help="size of the inputs' open dimensions")
    ap.add_argument("--json", type=Path, help="also write the result here")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        work = (a.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        ra = run_version(a.code_a, a.model, extra, work, "a", a.cache_root, a.runner)
        rb = run_version(a.code_b, a.model, extra + shlex.split(a.b_args), work, "b", a.cache_root, a.runner)
        same_plan = ra["plan"] == rb["plan"]
        close, diff = (compare_outputs(ra["model"], rb["model"], a.seed, a.batch)
                       if ra["model"] and rb["model"] else (ra["model"] is rb["model"], float("nan")))

    for tag, r, code in (("A", ra, a.code_a), ("B", rb, a.code_b)):
        print(f"{tag} {code}: exit {r['rc']}, {r['seconds']:.1f} s, {len(r['plan'])} layers decomposed, "
              f"params {r['params_fraction']}, flops {r['flops_fraction']}, max rel error {r['max_rel_error']}")
        if r["rc"] != 0:
            print("   " + r["stderr"].splitlines()[-1] if r["stderr"] else "   (no stderr)")
    print(f"same plan: {same_plan}")
    pa, pb = ({x[0]: x[1:] for x in r["plan"]} for r in (ra, rb))
    for name in sorted(pa.keys() | pb.keys()):
        if pa.get(name) != pb.get(name):  # (k, scheme, rank), None where not decomposed
            print(f"   {name}: A {pa.get(name)}  B {pb.get(name)}")
    print(f"outputs close (rtol {RTOL}, atol {RTOL}*max|y|): {close}, max abs diff {diff:.3g}")
    if a.json:
        keep = ("rc", "seconds", "plan", "max_rel_error", "params_fraction", "flops_fraction")
        a.json.write_text(json.dumps({"args": extra, "b_args": a.b_args, "same_plan": same_plan, "outputs_close": close,
                                      "max_abs_diff": diff, "a": {k: ra[k] for k in keep},
                                      "b": {k: rb[k] for k in keep}}, indent=1))
    ok = same_plan and close and ra["rc"] == rb["rc"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

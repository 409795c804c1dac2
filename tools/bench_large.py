"""Peak memory of rewriting a model with more than 2 GB of weights.

    python tools/bench_large.py --gb 2.2 --workdir /tmp/large

Builds an MLP of Gemm layers (1024↔4096) whose weights total ``--gb`` GB,
saved with ONNX external data, rewrites it with the CLI in a subprocess and
prints the wall time and the subprocess's peak resident memory against the
size of the weights.  The input files' checksums are compared before and
after.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(path: Path, gb: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    per = 4096 * 1024 * 4
    n = int(np.ceil(gb * 1e9 / per))
    nodes, inits, h = [], [], "x"
    for i in range(n):
        fin, fout = (1024, 4096) if i % 2 == 0 else (4096, 1024)
        # a decaying spectrum, like trained weights, so a budget has something to choose
        w = (rng.standard_normal((fout, fin), dtype=np.float32) * 0.02).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"fc{i}.weight"))
        del w
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [h, f"fc{i}.weight"], [out], name=f"fc{i}", transB=1))
        h = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024])
    y = helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", 1024 if n % 2 == 0 else 4096])
    m = helper.make_model(helper.make_graph(nodes, "large", [x], [y], initializer=inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data")
    return n * per


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.2)
    ap.add_argument("--workdir", default="artifacts/large")
    ap.add_argument("--keep-params", default="0.5")
    a = ap.parse_args(argv)
    wd = Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    src = wd / "large.onnx"
    t0 = time.time()
    weight_bytes = build(src, a.gb)
    print(f"built {src} ({weight_bytes / 1e9:.2f} GB of weights) in {time.time() - t0:.0f} s", flush=True)
    before = {p.name: digest(p) for p in (src, wd / "large.onnx.data")}
    out = wd / "large_alds.onnx"
    cmd = [sys.executable, "-m", "onnx_alds", "rewrite", str(src), str(out), "--keep-params", a.keep_params,
           "--k-max", "1", "--no-compare", "--report", str(wd / "large_report.json")]
    t0 = time.time()
    # the child's own high-water mark (VmHWM restarts at exec; getrusage would count the
    # parent's pages that a fork shares before the exec)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _hwm(p.pid))
        time.sleep(0.1)
    out, err = p.communicate()
    wall = time.time() - t0
    print(out.strip())
    if p.returncode:
        print(err.strip())
    after = {q.name: digest(q) for q in (src, wd / "large.onnx.data")}
    print(f"exit code {p.returncode}; wall {wall:.0f} s; peak RSS {peak / 1e9:.2f} GB = "
          f"{peak / weight_bytes:.2f}x the weights; input unchanged: {before == after}")
    outs = sorted(q.name for q in wd.iterdir() if q.name.startswith("large_alds"))
    print("outputs:", ", ".join(f"{q} ({(wd / q).stat().st_size / 1e9:.2f} GB)" for q in outs))
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())

"""Red-team the CLI with hostile inputs (issue 21): every case is a real
``python -m onnx_alds`` process with the exit code it must give, and the
check that no file the user gave changed (SHA-256 before and after).

    python tools/redteam.py [--only NAME,...] [--keep DIR]

Prints a table: case, expected exit code, the one it gave, OK.  A case that
runs past its time limit shows ``hang``.  Fixtures (a small CNN, calibration
data, a data-aware plan with its factors sidecar, a torch factory) are built
in a temporary directory first; that takes a minute on two cores.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.graphs import _parse, cnn_model, conv_model, gemm_model  # noqa: E402

log = logging.getLogger("redteam")

NET_PY = '''
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
'''


@dataclass
class Case:
    name: str
    args: list
    expect: int
    protect: list = field(default_factory=list)  # files that must be byte-identical afterwards
    check: object = None  # callable(stdout, stderr, dir) -> str | None (a problem)
    timeout: float = 120


MEMORY_LIMIT = 6 << 30  # address space of each CLI process: a memory bomb fails instead of taking the machine


def _limit():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


CODE = {"dir": None}  # --code: the onnx_alds to red-team (default: the installed one)


def run(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=CODE["dir"]) if CODE["dir"] else None
    p = subprocess.run([sys.executable, "-m", "onnx_alds", *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, preexec_fn=_limit, env=env)
    return p.returncode, p.stdout, p.stderr


def digest(p: Path):
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    except OSError:
        return None


def _save(model, path):
    onnx.save(model, str(path))


def _resave_sidecar(d: Path, plan: str, side: str, arrays: dict, new_plan: str):
    """Write ``arrays`` as the sidecar of a copy of ``plan`` (its SHA-256 updated, as a tamperer would)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (d / side).write_bytes(buf.getvalue())
    doc = json.loads((d / plan).read_text())
    doc["factors"] = {**doc["factors"], "file": side, "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    (d / new_plan).write_text(json.dumps(doc))


def _plan_with_sidecar(d: Path, plan: str, side: str, new_plan: str):
    doc = json.loads((d / plan).read_text())
    doc["factors"] = {"file": side}
    (d / new_plan).write_text(json.dumps(doc))


def _bomb_npz(path: Path, member: str, nbytes: int, others: dict | None = None):
    """A zip whose .npy member ``member`` deflates ``nbytes`` of zeros (a few MB on disk), beside ``others``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                   "shape": (nbytes // 4,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, a in (others or {}).items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(a), allow_pickle=False)
            z.writestr(name + ".npy", buf.getvalue())
        with z.open(member + ".npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            chunk = bytes(64 << 20)
            for _ in range(nbytes // len(chunk)):
                f.write(chunk)


def _header_npz(path: Path, member: str, shape, data_bytes: int = 1 << 20):
    """An .npz whose member declares ``shape`` (float32) but holds ``data_bytes`` of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member + ".npy", header.getvalue() + bytes(data_bytes))


def _gather_model():
    rng = np.random.default_rng(0)
    return _parse("""g (int64[N, 6] ids) => (float[N, 6, 4] y) {
        [emb] e = Gather (table, ids)
        [fc] y = MatMul (e, "fc.weight")
    }""", {"table": rng.standard_normal((10, 8)).astype(np.float32),
           "fc.weight": rng.standard_normal((8, 4)).astype(np.float32)})


def _fixed_batch_model():
    m = cnn_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    m.graph.output[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    return m


def fixtures(d: Path) -> None:
    """Everything the cases read, built with the CLI where a user would."""
    rng = np.random.default_rng(0)
    _save(cnn_model(), d / "m.onnx")
    _save(cnn_model(seed=1), d / "m2.onnx")
    np.savez(d / "cal.npz", x=rng.standard_normal((32, 3, 16, 16)).astype(np.float32))
    for model, plan in (("m.onnx", "p.json"), ("m2.onnx", "p2.json")):
        rc, _, err = run(["rewrite", model, f"o_{plan}.onnx", "--keep-params", "0.6", "--calibration", "cal.npz",
                          "--plan", plan, "--no-validate", "--no-compare", "--no-sequential", "--allow-slower",
                          "-q"], d)
        if rc:
            raise SystemExit(f"fixture {plan}: {err}")
    side = dict(np.load(d / "p.factors.npz"))
    first = next(k for k in side if k.endswith("|encoder"))
    name = first.split("|")[0]
    bad = dict(side)
    bad[first] = side[first][: len(side[first]) // 2]  # fewer ranks than the plan says
    _resave_sidecar(d, "p.json", "rank.factors.npz", bad, "rank.json")
    bad = dict(side)
    bad[f"{name}|bias_delta"] = np.float32(1e3)  # a scalar broadcast into every bias
    _resave_sidecar(d, "p.json", "bias.factors.npz", bad, "bias.json")
    _resave_sidecar(d, "p.json", "f64.factors.npz", {k: v.astype(np.float64) if v.dtype.kind == "f" else v
                                                     for k, v in side.items()}, "f64.json")
    shutil.copy(d / "p2.factors.npz", d / "other.factors.npz")
    _plan_with_sidecar(d, "p.json", "other.factors.npz", "other.json")  # another model's factors, same names
    os.mkfifo(d / "fifo.factors.npz")
    _plan_with_sidecar(d, "p.json", "fifo.factors.npz", "fifo.json")
    os.symlink("/dev/zero", d / "zero.factors.npz")
    _plan_with_sidecar(d, "p.json", "zero.factors.npz", "zero.json")
    _bomb_npz(d / "bomb.factors.npz", f"{name}|encoder", 2 << 30,
              {k: v for k, v in side.items() if k != f"{name}|encoder"})
    _plan_with_sidecar(d, "p.json", "bomb.factors.npz", "bomb.json")
    _bomb_npz(d / "calbomb.npz", "x", 2 << 30)
    _header_npz(d / "calhdr.npz", "x", (700_000, 3, 16, 16))
    (d / "net.py").write_text(NET_PY)
    rc, _, err = run(["export", "net.py:make", "net.onnx", "--input-shape", "1,3,8,8"], d)
    if rc:
        raise SystemExit(f"fixture net.onnx: {err}")
    shutil.copy(d / "net.onnx", d / "teacher.onnx")
    rc, _, err = run(["rewrite", "net.onnx", "net_small.onnx", "--keep-params", "0.6", "--plan", "np.json",
                      "--no-validate", "--no-compare", "--allow-slower", "-q"], d)
    if rc:
        raise SystemExit(f"fixture np.json: {err}")
    np.savez(d / "d.npz", x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 10, 16))
    import torch

    torch.save(torch.nn.Conv2d(1, 1, 1).state_dict(), d / "ck.pt")
    torch.save({"model": {}, "extra": argparse.Namespace(a=1)}, d / "evil.pt")  # weights_only refuses the object
    os.link(d / "m.onnx", d / "hard.onnx")
    _save(_gather_model(), d / "gather.onnx")
    np.savez(d / "ids_big.npz", ids=np.full((8, 6), 1000, np.int64))
    np.savez(d / "ids_u64.npz", ids=np.full((8, 6), 2**63 + 5, np.uint64))
    _save(_fixed_batch_model(), d / "b1.onnx")
    _save(conv_model(dtype=np.float64), d / "f64.onnx")
    np.savez(d / "cal_g.npz", x=rng.standard_normal((64, 24)))
    huge = gemm_model(f=16, c=24, dtype=np.float64)
    w = onnx.numpy_helper.to_array(huge.graph.initializer[0]) * 1e200
    huge.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "fc.weight"))
    _save(huge, d / "huge.onnx")
    ti = cnn_model()
    ti.training_info.add().algorithm.name = "train"
    _save(ti, d / "ti.onnx")
    os.mkfifo(d / "fifo_teacher.onnx")
    _header_npz(d / "dhdr.npz", "x", (1 << 22, 1, 8, 8))  # 1 GiB declared, 1 channel for a 3-channel net


def _finite_weights(path):
    def check(out, err, d):
        p = d / path
        if not p.is_file():
            return None  # refused: fine
        m = onnx.load(str(p))
        bad = [t.name for t in m.graph.initializer if t.data_type in (1, 11)
               and not np.isfinite(onnx.numpy_helper.to_array(t)).all()]
        return f"the written model has NaN/Inf weights ({', '.join(bad)})" if bad else None
    return check


def _finite_report(path):
    def check(out, err, d):
        text = (d / path).read_text() if (d / path).is_file() else ""
        return "the report holds NaN/Infinity" if "NaN" in text or "Infinity" in text else \
            ("overflow warned" if "overflow" in err else None)
    return check


def _not_in(text, where="stderr"):
    def check(out, err, d):
        return f"{where} says {text!r}" if text in (err if where == "stderr" else out) else None
    return check


def _has(text):
    def check(out, err, d):
        return None if text in out + err else f"does not say {text!r}"
    return check


def _absent(path):
    def check(out, err, d):
        return f"{path} exists afterwards (written or made)" if (d / path).exists() else None
    return check


def _all(*checks):
    def check(out, err, d):
        return "; ".join(p for p in (c(out, err, d) for c in checks) if p) or None
    return check


def _training_info_kept_or_said(out, err, d):
    m = onnx.load(str(d / "ti_out.onnx"))
    return None if m.training_info or "training_info" in err + out else "training_info dropped silently"


def _pristine(d: Path) -> dict:
    """Regular files of the fixtures: name → (sha256, bytes), to put back after a case changed them."""
    return {p.name: (digest(p), p.read_bytes()) for p in d.iterdir()
            if p.is_file() and not p.is_symlink() and p.stat().st_size < 64 << 20}


def _restore(d: Path, pristine: dict, names: set) -> None:
    for p in d.iterdir():  # what a case wrote (an output, a cache dir): the next case starts without it
        if p.name not in names:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for name, (sha, data) in pristine.items():
        p = d / name
        if p.is_symlink() or not p.is_file() or digest(p) != sha:
            p.unlink(missing_ok=True)
            p.write_bytes(data)
    if not os.path.samefile(d / "hard.onnx", d / "m.onnx"):
        (d / "hard.onnx").unlink()
        os.link(d / "m.onnx", d / "hard.onnx")


def cases() -> list[Case]:
    nv = ["--no-validate", "--no-compare", "-q"]
    ft = ["finetune", "net.py:make", "--plan", "np.json", "--data", "d.npz", "--epochs", "1"]
    return [
        # 1. no file the user gave is ever overwritten
        Case("quantize OUT=--calibration", ["quantize", "m.onnx", "cal.npz", "--calibration", "cal.npz"], 2,
             ["m.onnx", "cal.npz"]),
        Case("quantize --json=IN", ["quantize", "m.onnx", "q.onnx", "--json", "m.onnx"], 2, ["m.onnx"]),
        Case("quantize --json=OUT", ["quantize", "m.onnx", "q.onnx", "--json", "q.onnx"], 2, ["m.onnx"]),
        Case("bench --json=--calibration", ["bench", "m.onnx", "--int8", "--calibration", "cal.npz", "--json",
                                             "cal.npz", "--repeats", "2"], 2, ["m.onnx", "cal.npz"]),
        Case("export OUT=--checkpoint", ["export", "net.py:make", "ck.pt", "--checkpoint", "ck.pt",
                                         "--input-shape", "1,3,8,8"], 2, ["ck.pt", "net.py"]),
        Case("export OUT=source file", ["export", "net.py:make", "net.py", "--input-shape", "1,3,8,8"], 2,
             ["net.py"]),
        Case("finetune --out=--teacher-onnx", ft + ["--out", "teacher.onnx", "--teacher-onnx", "teacher.onnx"], 2,
             ["teacher.onnx", "np.json", "d.npz"]),
        Case("finetune --checkpoint-dir=--data", ft + ["--out", "ft.onnx", "--checkpoint-dir", "d.npz"], 2,
             ["d.npz"]),
        Case("rewrite OUT=plan sidecar", ["rewrite", "m.onnx", "p.factors.npz", "--apply-plan", "p.json"] + nv, 2,
             ["m.onnx", "p.json", "p.factors.npz"]),
        Case("rewrite --report=plan sidecar", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "p.json", "--report",
                                               "p.factors.npz"] + nv, 2, ["m.onnx", "p.json", "p.factors.npz"]),
        Case("rewrite OUT=hard link of IN", ["rewrite", "m.onnx", "hard.onnx"] + nv, 2, ["m.onnx"]),
        Case("rewrite --plot=--calibration", ["rewrite", "m.onnx", "o.onnx", "--calibration", "cal.npz", "--plot",
                                              "cal.npz"] + nv, 2, ["m.onnx", "cal.npz"]),
        Case("rewrite --report=--cache-dir", ["rewrite", "m.onnx", "o.onnx", "--report", "r.json", "--cache-dir",
                                              "r.json"] + nv, 2, ["m.onnx"], _absent("o.onnx")),
        Case("finetune --out=--checkpoint-dir", ft + ["--out", "ft.onnx", "--checkpoint-dir", "ft.onnx"], 2,
             ["np.json", "d.npz"], _absent("ft.onnx")),
        # 4. gates and numeric options
        Case("rewrite --max-output-error nan", ["rewrite", "m.onnx", "o.onnx", "--max-output-error", "nan",
                                                "--no-compare", "-q"], 2, ["m.onnx"]),
        Case("rewrite --min-speedup nan", ["rewrite", "m.onnx", "o.onnx", "--min-speedup", "nan", "-q"], 2,
             ["m.onnx"]),
        Case("rewrite --max-output-error -1", ["rewrite", "m.onnx", "o.onnx", "--max-output-error", "-1", "-q"], 2,
             ["m.onnx"]),
        Case("rewrite --min-speedup inf", ["rewrite", "m.onnx", "o.onnx", "--min-speedup", "inf", "-q"], 2,
             ["m.onnx"]),
        Case("rewrite --keep-params inf", ["rewrite", "m.onnx", "o.onnx", "--keep-params", "inf"], 2, ["m.onnx"]),
        Case("finetune --lr nan", ft + ["--out", "ft.onnx", "--lr", "nan"], 2, ["np.json", "d.npz"]),
        Case("finetune --lr -1", ft + ["--out", "ft.onnx", "--lr", "-1"], 2, ["np.json", "d.npz"]),
        # 2. the factors sidecar is untrusted
        Case("sidecar ranks differ", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "rank.json"] + nv, 2,
             ["m.onnx", "rank.json", "rank.factors.npz"]),
        Case("sidecar scalar bias_delta", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "bias.json"] + nv, 2,
             ["m.onnx", "bias.json"]),
        Case("sidecar float64", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "f64.json"] + nv, 2,
             ["m.onnx"], _has("factors")),
        Case("sidecar of another model", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "other.json"] + nv, 2,
             ["m.onnx"]),
        Case("sidecar FIFO", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "fifo.json"] + nv, 2, ["m.onnx"],
             timeout=30),
        Case("sidecar /dev/zero", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "zero.json"] + nv, 2,
             ["m.onnx"], timeout=30),
        Case("sidecar zip bomb", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "bomb.json"] + nv, 2, ["m.onnx"],
             timeout=30),
        Case("apply-plan + calibration + --error data", ["rewrite", "m.onnx", "o.onnx", "--apply-plan", "p.json",
                                                         "--calibration", "cal.npz", "--error", "data"] + nv, 0,
             ["m.onnx", "p.json", "cal.npz"], _not_in("needs calibration inputs")),
        # 3. calibration data
        Case("calibration npz bomb (2 GB deflated)", ["rewrite", "m.onnx", "o.onnx", "--calibration", "calbomb.npz"]
             + nv, 2, ["m.onnx"], timeout=30),
        Case("calibration header declares 2 GB", ["rewrite", "m.onnx", "o.onnx", "--calibration", "calhdr.npz"]
             + nv, 2, ["m.onnx"], timeout=30),
        Case("token ids beyond vocabulary (rewrite)", ["rewrite", "gather.onnx", "o.onnx", "--calibration",
                                                       "ids_big.npz"] + nv, 2, ["gather.onnx"]),
        Case("token ids beyond vocabulary (quantize)", ["quantize", "gather.onnx", "q.onnx", "--calibration",
                                                        "ids_big.npz"], 2, ["gather.onnx"]),
        Case("uint64 ids that wrap (rewrite)", ["rewrite", "gather.onnx", "o.onnx", "--calibration", "ids_u64.npz"]
             + nv, 2, ["gather.onnx"]),
        Case("fixed batch 1, 32 samples (sequential)", ["rewrite", "b1.onnx", "o.onnx", "--calibration", "cal.npz",
                                                        "--sequential", "-q"], 0, ["b1.onnx", "cal.npz"]),
        Case("fixed batch 1, 32 samples (--no-sequential)", ["rewrite", "b1.onnx", "o.onnx", "--calibration",
                                                             "cal.npz", "--no-sequential", "-q"], 0, ["b1.onnx"]),
        Case("fixed batch 1, 32 samples (quantize)", ["quantize", "b1.onnx", "q.onnx", "--calibration", "cal.npz"],
             0, ["b1.onnx", "cal.npz"]),
        Case("quantize --samples 100000000", ["quantize", "m.onnx", "q.onnx", "--samples", "100000000"], 0,
             ["m.onnx"], _has("samples"), timeout=120),
        Case("finetune --data declaring 1 GiB of the wrong shape", ft[:5] + ["dhdr.npz", "--epochs", "1", "--out",
                                                                            "ft.onnx"], 2,
             ["dhdr.npz"], _has("does not fit the model"), timeout=60),
        Case("finetune --teacher-onnx FIFO", ft + ["--out", "ft.onnx", "--teacher-onnx", "fifo_teacher.onnx"], 2,
             ["np.json", "d.npz"], timeout=60),
        Case("export --input-shape past the limit", ["export", "net.py:make", "e.onnx", "--input-shape",
                                                     "100000,3,1000,1000"], 2, ["net.py"]),
        Case("finetune --threads 100000", ft + ["--out", "ft.onnx", "--threads", "100000"], 2, ["np.json", "d.npz"],
             _has("--threads"), timeout=60),
        # 6. int8 tells the truth
        Case("quantize a float64 model", ["quantize", "f64.onnx", "q.onnx"], 2, ["f64.onnx"]),
        Case("rewrite --int8 of a float64 model", ["rewrite", "f64.onnx", "o.onnx", "--int8", "-q"], 2,
             ["f64.onnx"]),
        # 8, 9. left from the first round, smaller items
        Case("float64 weights near 1e200", ["rewrite", "huge.onnx", "huge_out.onnx", "--keep-params", "0.7",
                                            "--allow-slower", "-q"], 0, ["huge.onnx"],
             _finite_weights("huge_out.onnx")),
        Case("float64 weights near 1e200 (data-aware)", ["rewrite", "huge.onnx", "huge_out.onnx", "--keep-params",
                                                         "0.7", "--allow-slower", "--calibration", "cal_g.npz",
                                                         "--report", "huge.json", "-q"], 0, ["huge.onnx"],
             _finite_report("huge.json")),
        Case("training_info kept or said", ["rewrite", "ti.onnx", "ti_out.onnx", "--no-validate"], 0,
             ["ti.onnx"], _training_info_kept_or_said),
        Case("--keep-latency 1 writes the model unchanged", ["rewrite", "m.onnx", "o.onnx", "--keep-latency", "1"],
             0, ["m.onnx"], _all(_not_in("slower than the input"), _has("written unchanged")), timeout=300),
        Case("hostile checkpoint advice", ["export", "net.py:make", "e.onnx", "--checkpoint", "evil.pt",
                                           "--input-shape", "1,3,8,8"], 2, ["evil.pt"],
             _not_in("weights_only")),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated substrings of case names")
    ap.add_argument("--keep", metavar="DIR", help="build the fixtures here and keep them")
    ap.add_argument("--code", metavar="DIR", help="red-team the onnx_alds package under DIR (e.g. an older "
                                                  "checkout: git archive HEAD | tar -x -C DIR)")
    a = ap.parse_args(argv)
    CODE["dir"] = str(Path(a.code).resolve()) if a.code else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    d = Path(a.keep or tempfile.mkdtemp(prefix="redteam-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.time()
        if not (d / "ti.onnx").exists():
            fixtures(d)
        log.info("fixtures built in %.0f s in %s", time.time() - t0, d)
        rows = []
        pristine, names = _pristine(d), {p.name for p in d.iterdir()}
        for c in cases():
            if a.only and not any(s in c.name for s in a.only.split(",")):
                continue
            before = {f: digest(d / f) for f in c.protect}
            t = time.time()
            try:
                rc, out, err = run(c.args, d, timeout=c.timeout)
                got = str(rc)
            except subprocess.TimeoutExpired:
                rc, out, err, got = None, "", "", "hang"
            problems = [f"{f} changed" for f in c.protect if digest(d / f) != before[f]]
            if rc is not None and c.check is not None:
                try:
                    problems += [p for p in [c.check(out, err, d)] if p]
                except Exception as e:  # noqa: BLE001 - the check itself failed: a problem to show
                    problems.append(f"check failed: {type(e).__name__}: {str(e)[:80]}")
            ok = rc == c.expect and not problems
            last = (err.strip().splitlines() or [""])[-1][:110]
            _restore(d, pristine, names)
            rows.append((c.name, c.expect, got, "OK" if ok else "FAIL", f"{time.time() - t:.0f}s",
                         "; ".join(problems) or last))
            log.info("%-46s %s %-4s %-4s %s", c.name, c.expect, got, rows[-1][3], rows[-1][5])
        print(f"\n| case | expected | got | OK | time | note |\n|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(str(x).replace("|", "/") for x in r) + " |")
        print(f"\n{sum(r[3] == 'OK' for r in rows)} of {len(rows)} OK")
        return 0 if all(r[3] == "OK" for r in rows) else 1
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

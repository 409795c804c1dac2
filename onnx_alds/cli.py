"""Command line: arguments, exit codes, nothing else.

Exit codes: 0 success, 1 internal error (a bug: please report it), 2 usage
error, 3 unreadable or invalid model, 4 infeasible budget, 5 the rewritten
model failed validation.  Errors are one sentence on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import AldsError, UsageError

log = logging.getLogger("onnx_alds")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"the kept fraction must be in (0, 1], got {text}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnx-alds", description=__doc__.split("\n\n")[0],
                                epilog="exit codes: 0 ok, 1 internal error, 2 usage, 3 bad model, "
                                       "4 infeasible budget, 5 validation failed")
    p.add_argument("--version", action="version", version=f"onnx-alds {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("rewrite", help="compress a model with low-rank factorizations")
    r.add_argument("input", help="input .onnx (never modified)")
    r.add_argument("output", help="output .onnx (written atomically)")
    b = r.add_mutually_exclusive_group()
    b.add_argument("--keep-params", type=_fraction, metavar="F",
                   help="keep this fraction of the model's parameters (default 0.5)")
    b.add_argument("--keep-flops", type=_fraction, metavar="F",
                   help="keep this fraction of the multiply-accumulates")
    b.add_argument("--keep-latency", type=_fraction, metavar="F",
                   help="keep this fraction of the measured latency on --provider")
    r.add_argument("--method", choices=["alds", "alds-paper", "uniform"], default="alds",
                   help="alds: exact min-max solver (default); alds-paper: the paper's heuristic; "
                        "uniform: same rank fraction everywhere, k=1")
    r.add_argument("--schemes", default=None, metavar="S,...",
                   help="folding schemes to consider (default all: s0,s1,s2,s3; s0 alone is the paper's ALDS)")
    r.add_argument("--k-max", type=int, default=None, metavar="K", help="largest number of channel groups")
    r.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...",
                   help="fix a dynamic input shape (for FLOPs and validation); repeatable")
    r.add_argument("--report", metavar="REPORT.json", help="write the report as JSON")
    pl = r.add_mutually_exclusive_group()
    pl.add_argument("--plan", metavar="PLAN.json", help="write the chosen plan")
    pl.add_argument("--apply-plan", metavar="PLAN.json", help="apply this plan as given, without selection")
    r.add_argument("--plot", metavar="PLOT.png", help="plot per-layer error and kept fraction")
    r.add_argument("--cache-dir", metavar="DIR",
                   help="keep the layers' singular values here, keyed by weight bytes, for later runs")
    r.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                   help="onnxruntime provider for validation and latency (auto: CUDA when present)")
    r.add_argument("--no-validate", action="store_true", help="skip the onnxruntime comparison")
    r.add_argument("--no-compare", action="store_true",
                   help="do not run the baseline selectors for comparison in the report")
    r.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")

    i = sub.add_parser("inspect", help="list layers, params, FLOPs and why a layer is not compressible")
    i.add_argument("input")
    i.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")

    be = sub.add_parser("bench", help="latency of whole models, interleaved, median of repeats")
    be.add_argument("models", nargs="+", help="the first model is the baseline for speed-ups")
    be.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    be.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    be.add_argument("--repeats", type=int, default=30)
    be.add_argument("--warmup", type=int, default=5)
    be.add_argument("--threads", type=int, default=2, help="intra-op threads (default 2)")
    be.add_argument("--input-shape", action="append", metavar="NAME:D1,D2,...")
    be.add_argument("--json", metavar="OUT.json", help="also write the table as JSON")

    e = sub.add_parser("export", help="export a PyTorch model defined in Python to ONNX (needs torch)")
    e.add_argument("factory", help="module.path:callable or path/to/file.py:callable")
    e.add_argument("output")
    e.add_argument("--checkpoint", help="state_dict (or a dict with 'model') to load")
    e.add_argument("--input-shape", action="append", required=True, metavar="D1,D2,...",
                   help="example input shape, batch included; repeat for several inputs")
    e.add_argument("--opset", type=int, default=None)
    from .torch.finetune_cli import add_finetune_parser  # argparse only; torch is imported when it runs

    add_finetune_parser(sub)
    return p


def _shapes(specs):
    from .extract import parse_input_shapes

    return parse_input_shapes(specs)


def cmd_rewrite(a) -> int:
    from .api import rewrite
    from .io import check_output_path, save_model
    from .report import plot_report

    out = check_output_path(a.input, a.output)
    for extra in (a.report, a.plan, a.plot):
        if extra:
            check_output_path(a.input, extra)
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'onnx-alds[plot]'") from None
    if a.k_max is not None and a.k_max < 1:
        raise UsageError("--k-max must be at least 1")
    schemes = [s.strip() for s in a.schemes.split(",") if s.strip()] if a.schemes else None
    new, report = rewrite(a.input, keep_params=a.keep_params, keep_flops=a.keep_flops,
                          keep_latency=a.keep_latency, method=a.method, plan=a.apply_plan, schemes=schemes,
                          k_max=a.k_max, input_shapes=_shapes(a.input_shape), provider=a.provider,
                          validate=not a.no_validate, compare=not a.no_compare,
                          progress=sys.stderr.isatty(), cache_dir=a.cache_dir)
    report.output = str(out)
    written = save_model(new, out)
    if a.report:
        report.save(a.report)
    if a.plan and report.plan is not None:
        report.plan.save(a.plan)
    if a.plot:
        plot_report(report, a.plot)
    if not a.quiet:
        print(report.summary())
        print(f"wrote {', '.join(str(w) for w in written)}")
    return 0


def cmd_inspect(a) -> int:
    from .api import inspect

    info = inspect(a.input, _shapes(a.input_shape))
    if a.json:
        rows = [{"name": l.name, "op": l.op, "weight": l.weight_name, "weight_shape": list(l.weight_shape),
                 "status": "compressible" if l.status == "candidate" else "skipped", "reason": l.reason,
                 "params": l.params + l.bias_params, "flops": l.flops,
                 "schemes": list(l.schemes)} for l in info.layers]
        print(json.dumps({"params": info.params_total, "flops": info.flops_total,
                          "input_shapes": info.input_shapes, "layers": rows}, indent=2))
        return 0
    w = max([len(l.name) for l in info.layers] + [5])
    print(f"{'layer':<{w}}  {'op':<6} {'weight':<18} {'params':>10} {'MACs':>13}  status")
    for l in info.layers:
        fl = f"{l.flops:,}" if l.flops is not None else "?"
        status = "compressible" if l.status == "candidate" else f"skipped: {l.reason}"
        shape = "x".join(str(d) for d in l.weight_shape) or "-"
        print(f"{l.name:<{w}}  {l.op:<6} {shape:<18} {l.params + l.bias_params:>10,} {fl:>13}  {status}")
    n = len(info.candidates)
    fl = f"{info.flops_total:,}" if info.flops_total is not None else "unknown (give --input-shape)"
    print(f"\n{n} of {len(info.layers)} layers compressible; model params {info.params_total:,}; "
          f"MACs {fl} at input shapes {info.input_shapes}")
    return 0


def cmd_bench(a) -> int:
    from .bench import bench, format_table

    try:
        batches = [int(b) for b in str(a.batch).split(",") if b]
    except ValueError:
        raise UsageError(f"--batch {a.batch!r} is not a comma-separated list of integers") from None
    if not batches or min(batches) < 1 or a.repeats < 1 or a.warmup < 0 or a.threads < 1:
        raise UsageError("--batch, --repeats and --threads must be positive, --warmup not negative")
    rows = bench(a.models, provider=a.provider, batches=batches, repeats=a.repeats, warmup=a.warmup,
                 threads=a.threads, input_shapes=_shapes(a.input_shape))
    print(format_table(rows))
    if a.json:
        from .io import atomic_write_bytes

        atomic_write_bytes(a.json, (json.dumps(rows, indent=2) + "\n").encode())
    return 0


def cmd_export(a) -> int:
    try:
        from .torch.export import export_from_factory
    except ImportError:
        raise UsageError("export needs torch: pip install 'onnx-alds[torch]'") from None
    shapes = []
    for s in a.input_shape:
        try:
            shapes.append(tuple(int(d) for d in s.replace("x", ",").split(",") if d))
        except ValueError:
            raise UsageError(f"--input-shape {s!r} is not a comma-separated list of integers") from None
    out = Path(a.output)
    from .io import check_output_path

    check_output_path(None, out)
    try:
        export_from_factory(a.factory, out, checkpoint=a.checkpoint, input_shapes=shapes, opset=a.opset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out}")
    return 0


def cmd_finetune(a) -> int:
    from .torch.finetune_cli import cmd_finetune as run

    return run(a)


COMMANDS = {"rewrite": cmd_rewrite, "inspect": cmd_inspect, "bench": cmd_bench, "export": cmd_export,
            "finetune": cmd_finetune}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .io import large_allocations_to_os

    large_allocations_to_os()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # graphsurgeon prints its warnings ("[W] ...") on stdout
        from onnx_graphsurgeon.logger import G_LOGGER

        G_LOGGER.severity = G_LOGGER.ERROR
    try:
        return COMMANDS[args.command](args)
    except AldsError as e:
        print(f"onnx-alds: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnx-alds: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("onnx-alds: error: out of memory", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one sentence, and the traceback only with -v
        if args.verbose:
            raise
        first = (str(e).splitlines() or [""])[0][:300]
        print(f"onnx-alds: internal error ({type(e).__name__}: {first}); rerun with -v and report it",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

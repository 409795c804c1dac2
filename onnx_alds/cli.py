"""Command line: arguments, exit codes, nothing else.

Exit codes: 0 success, 1 internal error (a bug: please report it), 2 usage
error (also an output that cannot be written, e.g. a full disk), 3 unreadable
or invalid model, 4 infeasible budget, 5 the rewritten model failed
validation, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 stdout
closed early (``| head``).  Errors are one sentence on stderr; temporary files
are removed on every one of these exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .argtypes import MAX_THREADS, bounded_int, fraction as _fraction, non_negative, positive
from .errors import AldsError, UsageError, first_line

log = logging.getLogger("onnx_alds")


def _rewrite_parser(sub) -> None:
    """rewrite IN OUT [budget] [selection] [data] [gates]: the main job."""
    r = sub.add_parser("rewrite", help="compress a model with low-rank factorizations")
    r.add_argument("input", help="input .onnx (never modified)")
    r.add_argument("output", help="output .onnx (written atomically)")
    b = r.add_mutually_exclusive_group()
    b.add_argument("--keep-params", type=_fraction, metavar="F",
                   help="keep this fraction of the model's parameters (no budget: the smallest plan within "
                        "--max-output-error, see docs/cli.md)")
    b.add_argument("--keep-flops", type=_fraction, metavar="F",
                   help="keep this fraction of the multiply-accumulates")
    b.add_argument("--keep-latency", type=_fraction, metavar="F",
                   help="keep this fraction of the measured latency on --provider")
    r.add_argument("--method", choices=["alds", "alds-paper", "uniform"], default=None,
                   help="alds: exact min-max solver (default); alds-paper: the paper's heuristic; "
                        "uniform: same rank fraction everywhere, k=1")
    r.add_argument("--objective", choices=["max", "sum", "best"], default=None,
                   help="what alds minimises: max, the largest layer error (the paper's); sum, the sum of "
                        "squared layer errors; best, the min-max, min-sum and uniform plans each run on the "
                        "calibration data and the lowest output error kept (default: best with --calibration "
                        "under a parameter or FLOP budget, else max)")
    r.add_argument("--schemes", default=None, metavar="S,...",
                   help="folding schemes to consider (default all: s0,s1,s2,s3; s0 alone is the paper's ALDS)")
    r.add_argument("--k-max", type=bounded_int(1), default=None, metavar="K", help="largest number of channel groups")
    r.add_argument("--input-shape", action="extend", nargs="+", metavar="NAME:D1,D2,...",
                   help="fix dynamic input shapes (for FLOPs and validation): NAME:D1,D2 [NAME:D1,D2 ...]")
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
    cal = r.add_mutually_exclusive_group()
    cal.add_argument("--calibration", metavar="CAL.npz",
                     help="calibration inputs: one array per graph input name, samples first; drives the "
                          "data-aware error, the data-aware factors and the validation inputs")
    cal.add_argument("--data-loader-script", metavar="FILE.py[:FUNC]",
                     help="calibration inputs from your own Python function (default name load_data) that "
                          "returns an iterable of feed dicts (input name -> array, samples first)")
    r.add_argument("--no-hold-out", action="store_true",
                   help="judge the rewrite on the calibration samples it was fitted on (default: a quarter of "
                        "a calibration file, at least 16 samples, is held back to judge it)")
    r.add_argument("--sensitivity", action="store_true",
                   help="with --calibration: weigh each layer's error by how much of it reaches the outputs "
                        "(one probe run of the model per layer), so that the selector spares the layers the "
                        "outputs depend on most")
    r.add_argument("--output-kind", action="extend", nargs="+", metavar="NAME:KIND",
                   help="how an output is judged: scores (top-1 agreement), embedding (cosine) or map "
                        "(relative L2 only); default: scores for a 2-D float output, else map")
    r.add_argument("--error", choices=["spectral", "data", "frobenius", "paper"], default=None,
                   help="error model (default: data with --calibration, else spectral; paper = the "
                        "ALDS paper's surrogate)")
    seq = r.add_mutually_exclusive_group()
    seq.add_argument("--sequential", dest="sequential", action="store_const", const=True, default=None,
                     help="refit data-aware factors layer by layer on the compressed prefix's inputs (default: "
                          "on while it is cheap: samples × layers × MACs ≤ 5e11)")
    seq.add_argument("--no-sequential", dest="sequential", action="store_const", const=False)
    r.add_argument("--no-bias-correction", action="store_true",
                   help="data-aware factors without the closed-form bias correction")
    _gate_arguments(r)
    r.add_argument("--int8", action="store_true",
                   help="for a pipeline that quantizes the rewrite: time the int8 QDQ models that 'onnx-alds "
                        "quantize' makes (validation's latency, the speed guard's retries and the default "
                        "budget's relaxation; with --keep-latency also its table and closed loop)")
    r.add_argument("--best-effort", action="store_true",
                   help="with --keep-latency: write the rewrite measured closest to 1/F even when it is more "
                        "than 15 %% short of it (with a warning) instead of exit 4")
    r.add_argument("--allow-slower", action="store_true",
                   help="let the selector pick factorizations that the latency model says are slower "
                        "than the dense layer")
    r.add_argument("--no-compare", action="store_true",
                   help="do not run the baseline selectors for comparison in the report")
    r.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing on success: no summary, and no progress on stderr (otherwise a bar on a "
                        "terminal, 'INFO onnx_alds.progress: ...' lines in a log)")


def _gate_arguments(r) -> None:
    """rewrite's gates: output error, speed and the task metric."""
    r.add_argument("--max-output-error", type=non_negative, metavar="X",
                   help="exit 5 and write nothing when an output's relative L2 error exceeds X")
    r.add_argument("--min-speedup", type=positive, metavar="X",
                   help="exit 5 and write nothing when the rewritten model is not X times as fast")
    r.add_argument("--metric-script", metavar="FILE.py[:FUNC]",
                   help="your task metric: a function (default name evaluate) of a model file's path that "
                        "returns a number, higher is better, on your own validation data; with no budget the "
                        "smallest plan within --max-metric-drop is searched, and the report gives the score")
    r.add_argument("--max-metric-drop", type=non_negative, metavar="D",
                   help="the largest drop of the --metric-script score accepted, in its units (default: 1 %% of "
                        "the original's score with no budget); past it exit 5 and nothing is written")


def _inspect_parser(sub) -> None:
    """inspect IN: compressible layers, params, MACs, reasons."""
    i = sub.add_parser("inspect", help="list layers, params, FLOPs and why a layer is not compressible")
    i.add_argument("input")
    i.add_argument("--input-shape", action="extend", nargs="+", metavar="NAME:D1,D2,...")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--plot", metavar="PLOT.png",
                   help="plot each compressible layer's error against the fraction of its parameters kept, from "
                        "its singular values, and what each layer costs at errors 0.1 and 0.3")
    i.add_argument("--cache-dir", metavar="DIR", help="keep the layers' singular values here, as rewrite does")
    ical = i.add_mutually_exclusive_group()
    ical.add_argument("--calibration", metavar="CAL.npz",
                      help="with --plot: the data-aware error on these samples (what rewrite --calibration selects "
                           "with) instead of the weights' spectrum")
    ical.add_argument("--data-loader-script", metavar="FILE.py[:FUNC]", help="the same samples from your own function")
    i.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                   help="onnxruntime provider for the calibration pass (auto: CUDA when present)")


def _bench_parser(sub) -> None:
    """bench A [B ...]: interleaved whole-model latency."""
    be = sub.add_parser("bench", help="latency of whole models, interleaved, median of repeats")
    be.add_argument("models", nargs="+", help="the first model is the baseline for speed-ups")
    be.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu")
    be.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    be.add_argument("--repeats", type=bounded_int(1), default=30)
    be.add_argument("--warmup", type=bounded_int(0), default=5)
    be.add_argument("--threads", type=bounded_int(1, MAX_THREADS), default=2, help="intra-op threads (default 2)")
    be.add_argument("--spinning", action="store_true",
                    help="let onnxruntime's idle threads spin (faster runs, but interleaved models then take "
                         "each other's cores: ratios become noisy)")
    be.add_argument("--input-shape", action="extend", nargs="+", metavar="NAME:D1,D2,...")
    be.add_argument("--json", metavar="OUT.json", help="also write the table as JSON")
    be.add_argument("--int8", action="store_true",
                    help="also bench an int8 (static QDQ) copy of each model, quantized into a temp dir")
    bcal = be.add_mutually_exclusive_group()
    bcal.add_argument("--calibration", metavar="CAL.npz",
                      help="your samples (one array per input name): the models are timed on the first BATCH of "
                           "them and compared on up to 256, each output judged by its kind (top-1 agreement, "
                           "cosine); --int8 calibrates on them (default: seeded random inputs)")
    bcal.add_argument("--data-loader-script", metavar="FILE.py[:FUNC]",
                      help="the same samples from your own function (see rewrite --help)")
    be.add_argument("--output-kind", action="extend", nargs="+", metavar="NAME:KIND",
                    help="how an output is compared: scores (top-1 agreement), embedding (cosine) or map "
                         "(relative L2 only); default: scores for a 2-D float output, else map")
    be.add_argument("--per-tensor", action="store_true", help="--int8 with per-tensor weight scales")


def _quantize_parser(sub) -> None:
    """quantize IN OUT: static int8 (QDQ) with onnxruntime."""
    q = sub.add_parser("quantize", help="static int8 quantization (QDQ) with onnxruntime, e.g. after rewrite")
    q.add_argument("input", help="input .onnx (never modified)")
    q.add_argument("output", help="output .onnx (written atomically)")
    qcal = q.add_mutually_exclusive_group()
    qcal.add_argument("--calibration", metavar="CAL.npz",
                      help="one array per graph input name, first axis = samples (default: seeded random inputs)")
    qcal.add_argument("--data-loader-script", metavar="FILE.py[:FUNC]",
                      help="calibration samples from your own function (see rewrite --help)")
    q.add_argument("--per-tensor", action="store_true", help="one scale per weight instead of per output channel")
    q.add_argument("--samples", type=bounded_int(1), default=None,
                   help="calibrate on the first N of the given samples (default: all), or on N seeded random "
                        "samples without data (default 32); at most 4096 are used")
    q.add_argument("--input-shape", action="extend", nargs="+", metavar="NAME:D1,D2,...")
    q.add_argument("--json", metavar="OUT.json", help="also write what was done as JSON")


def _export_parser(sub) -> None:
    """export FACTORY OUT: a PyTorch model to ONNX."""
    e = sub.add_parser("export", help="export a PyTorch model defined in Python to ONNX (needs torch)")
    e.add_argument("factory", help="module.path:callable or path/to/file.py:callable")
    e.add_argument("output")
    e.add_argument("--checkpoint", help="state_dict (or a dict with 'model') to load")
    e.add_argument("--input-shape", action="append", required=True, metavar="D1,D2,...[:DTYPE]",
                   help="example input shape, batch included, and its dtype (float32 unless given: float16, "
                        "int64, int32, bool; token ids are int64); repeat for several inputs, in the order the "
                        "model's forward takes them")
    e.add_argument("--opset", type=bounded_int(1), default=None)

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onnx-alds", description=__doc__.split("\n\n")[0],
                                epilog="exit codes: 0 ok, 1 internal error, 2 usage (or unwritable output), "
                                       "3 bad model, 4 infeasible budget, 5 validation failed, "
                                       "130 interrupted, 143 terminated, 141 stdout closed")
    p.add_argument("--version", action="version", version=f"onnx-alds {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    sub = p.add_subparsers(dest="command", required=True)

    for add in (_rewrite_parser, _inspect_parser, _bench_parser, _quantize_parser, _export_parser):
        add(sub)
    from .torch.finetune_cli import add_finetune_parser  # argparse only; torch is imported when it runs

    add_finetune_parser(sub)
    return p


# validation feeds two samples of every input (random_inputs' batch of 2): refuse shapes whose
# inputs alone would not fit, before anything is allocated
from .runtime import MAX_INPUT_BYTES  # noqa: E402 (a light module)


def _shapes(specs, batch: int = 2):
    """``--input-shape`` values as ``{name: dims}``: every dimension a positive
    integer, and all inputs together small enough to be generated."""
    from .extract import parse_input_shapes

    shapes = parse_input_shapes(specs)
    total = 0
    for name, dims in shapes.items():  # (parse_input_shapes refuses dimensions below 1)
        n = max(dims[0], batch)  # validation replaces a dynamic batch by `batch`
        for d in dims[1:]:
            n *= d
        total += n * 4
    _check_input_bytes(total)
    return shapes


def _check_input_bytes(total: int) -> None:
    """Refuse ``--input-shape`` values whose float32 inputs take ``total`` bytes, past the limit."""
    if total > MAX_INPUT_BYTES:
        raise UsageError(f"--input-shape asks for about {total / 2**30:.1f} GiB of float32 input data, over the "
                         f"{MAX_INPUT_BYTES >> 30} GiB limit; give smaller shapes")


def _need_matplotlib(flag: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{flag} needs matplotlib: pip install 'onnx-alds[plot]'") from None


def _calibration(a):
    """``--calibration CAL.npz`` as given, or the function of ``--data-loader-script`` (None: neither)."""
    if getattr(a, "data_loader_script", None):
        from .calibration import data_loader

        return data_loader(a.data_loader_script)
    return a.calibration


def _script_path(a, flag: str = "data_loader_script"):
    """The file of a ``FILE.py[:FUNC]`` option (an input no output may overwrite), or None."""
    from .script import script_file

    spec = getattr(a, flag, None)
    return script_file(spec) if spec else None


def _output_kinds(specs) -> dict | None:
    """``--output-kind NAME:KIND ...`` as ``{name: kind}``."""
    from .compare import OUTPUT_KINDS

    kinds = {}
    for spec in specs or []:
        name, sep, kind = str(spec).rpartition(":")
        if not sep or not name or kind not in OUTPUT_KINDS:
            raise UsageError(f"--output-kind {spec!r} is not NAME:KIND with KIND one of {', '.join(OUTPUT_KINDS)}")
        kinds[name] = kind
    return kinds or None


SELECTION_OPTIONS = (("keep_params", "--keep-params"), ("keep_flops", "--keep-flops"),
                     ("keep_latency", "--keep-latency"), ("method", "--method"), ("schemes", "--schemes"),
                     ("k_max", "--k-max"), ("objective", "--objective"))


def _check_runtime(a) -> None:
    """Validation and latency budgets need onnxruntime: say so before any work."""
    from .runtime import ort

    if a.no_validate and a.keep_latency is None:
        return
    try:
        ort()
    except UsageError:
        why = "a latency budget" if a.keep_latency is not None else "validation"
        raise UsageError(f"{why} needs onnxruntime, which is not installed: pip install 'onnx-alds[cpu]' "
                         f"(or 'onnx-alds[gpu]')" + ("" if a.keep_latency is not None else
                                                     ", or pass --no-validate to skip the check")) from None


def _check_int8(path) -> None:
    """--int8 times int8 copies: refuse a model that quantization would leave in float64."""
    import onnx

    from .quantize import float64_reason

    try:
        why = float64_reason(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - an unreadable model is reported by the rewrite with its own sentence
        return
    if why:
        raise UsageError(f"--int8 times int8 copies, but {why} and int8 quantization takes float32 models (the "
                         f"copies would stay float64); drop --int8 or convert the model to float32")


def _weight_digests(path, plan) -> dict:
    """Digests of the weights that a plan's factors belong to (the input model read once more)."""
    from .io import load_model
    from .plan import weight_digests

    return weight_digests(load_model(path, check=False), [l.weight for l in plan.layers])


def cmd_rewrite(a) -> int:
    from .api import rewrite
    from .options import RewriteOptions
    from .cache import usable_dir
    from .io import check_outputs, save_model
    from .plan import Plan
    from .report import plot_report

    if a.apply_plan:
        given = [flag for attr, flag in SELECTION_OPTIONS if getattr(a, attr) is not None]
        if given:
            raise UsageError(f"--apply-plan applies a plan as given, so {', '.join(given)} would be ignored; "
                             f"leave {'it' if len(given) == 1 else 'them'} out")
    if a.k_max is not None and a.k_max < 1:
        raise UsageError("--k-max must be at least 1")
    out = Path(a.output)
    outputs = [("the output", out), ("the output's external data file", out.with_name(out.name + ".data")),
               ("--report", a.report), ("--plan", a.plan), ("--plot", a.plot),
               ("--plan's factors file", Plan.factors_path(a.plan) if a.plan else None)]
    others = [("--apply-plan", a.apply_plan), ("--apply-plan's factors file", Plan.sidecar_of(a.apply_plan)),
              ("--calibration", a.calibration), ("--data-loader-script", _script_path(a)),
              ("--metric-script", _script_path(a, "metric_script"))]
    check_outputs(a.input, outputs, other_inputs=others, out_dirs=[("--cache-dir", a.cache_dir)])
    plan = Plan.load(a.apply_plan) if a.apply_plan else None
    if plan is not None and plan.factors:
        plan.check_weights(_weight_digests(a.input, plan))
    if a.int8:
        _check_int8(a.input)
    if a.plot:
        _need_matplotlib("--plot")
    if a.cache_dir is not None:
        usable_dir(a.cache_dir)
    input_shapes = _shapes(a.input_shape)
    _check_runtime(a)
    schemes = [s.strip() for s in a.schemes.split(",") if s.strip()] if a.schemes else None
    options = RewriteOptions.from_kwargs(
        a.keep_params, a.keep_flops, a.keep_latency, a.method or "alds", plan=plan, schemes=schemes, k_max=a.k_max,
        input_shapes=input_shapes, provider=a.provider, validate=not a.no_validate, compare=not a.no_compare,
        progress=not a.quiet, cache_dir=a.cache_dir, error=a.error,
        calibration=_calibration(a),
        bias_correction=not a.no_bias_correction, max_output_error=a.max_output_error, min_speedup=a.min_speedup,
        allow_slower=a.allow_slower, sequential=a.sequential, int8=a.int8, objective=a.objective,
        best_effort=a.best_effort, output_kinds=_output_kinds(a.output_kind), hold_out=not a.no_hold_out,
        sensitivity=a.sensitivity,
        metric=a.metric_script, max_metric_drop=a.max_metric_drop)
    new, report = rewrite(a.input, options=options)
    report.output = str(out)
    written = save_model(new, out)
    if a.report:
        report.save(a.report)
        written.append(a.report)
    if a.plan and report.plan is not None:
        written += report.plan.save(a.plan, weights=_weight_digests(a.input, report.plan)
                                    if report.plan.factors else None)
    if a.plot:
        plot_report(report, a.plot)
        written.append(a.plot)
    for w in report.warnings:
        print(f"onnx-alds: warning: {w}", file=sys.stderr)
    if not a.quiet:
        print(report.summary())
        print(f"wrote {', '.join(str(w) for w in written)}")
    return 0


def cmd_inspect(a) -> int:
    from .api import analyze

    data_source = _calibration(a)
    if data_source is not None and not a.plot:
        raise UsageError("--calibration and --data-loader-script set the error --plot draws; give --plot too")
    if a.plot:
        from .io import check_outputs

        check_outputs(a.input, [("--plot", a.plot)], other_inputs=[("--calibration", a.calibration),
                                                                   ("--data-loader-script", _script_path(a))],
                      out_dirs=[("--cache-dir", a.cache_dir)])
        _need_matplotlib("--plot")
    from .io import Source

    source, shapes, data = Source.load(a.input), _shapes(a.input_shape), None  # the model is read once
    if data_source is not None:
        from .calibration import load_checked
        from .pipeline.stages import shapes_from_data

        data = load_checked(data_source, source.model, shapes)
        shapes = shapes_from_data(source.model, shapes, data)
    _, source, info = analyze(source, shapes)
    print(_inspect_json(info) if a.json else _inspect_table(info))
    if a.plot:
        from .spectra_plot import data_curves, layer_curves, plot_spectra

        if data is None:
            curves = layer_curves(source, info, cache_dir=a.cache_dir, progress=not a.json)
            what, error = "ε = σ_{j+1} / σ_1", "spectral error"
        else:
            curves = data_curves(source, info, data, provider=a.provider, progress=not a.json)
            what, error = "ε = ‖(W − Ŵ) X‖ / ‖W X‖", "data-aware error on the calibration samples"
        plot_spectra(curves, a.plot, title=f"{Path(a.input).name}: {len(curves)} compressible layers, {error}",
                     what=what)
        print(f"wrote {a.plot}", file=sys.stderr if a.json else sys.stdout)  # stdout stays JSON with --json
    return 0


def _inspect_json(info) -> str:
    rows = [{"name": l.name, "op": l.op, "weight": l.weight_name, "weight_shape": list(l.weight_shape),
             "status": "compressible" if l.status == "candidate" else "skipped", "reason": l.reason,
             "params": l.params + l.bias_params, "flops": l.flops,
             "schemes": list(l.schemes)} for l in info.layers]
    return json.dumps({"params": info.params_total, "flops": info.flops_total,  # escapes every control character
                       "input_shapes": info.input_shapes, "layers": rows}, indent=2)


def _inspect_table(info) -> str:
    from .io import printable

    names = [printable(l.name) for l in info.layers]
    w = max([len(n) for n in names] + [5])
    lines = [f"{'layer':<{w}}  {'op':<6} {'weight':<18} {'params':>10} {'MACs':>13}  status"]
    for name, l in zip(names, info.layers):
        fl = f"{l.flops:,}" if l.flops is not None else "?"
        status = "compressible" if l.status == "candidate" else f"skipped: {printable(l.reason)}"
        shape = "x".join(str(d) for d in l.weight_shape) or "-"
        lines.append(f"{name:<{w}}  {printable(l.op):<6} {shape:<18} {l.params + l.bias_params:>10,} {fl:>13}  "
                     f"{status}")
    fl = f"{info.flops_total:,}" if info.flops_total is not None else "unknown (give --input-shape)"
    lines.append(f"\n{len(info.candidates)} of {len(info.layers)} layers compressible; model params "
                 f"{info.params_total:,}; MACs {fl} at input shapes {printable(info.input_shapes)}")
    return "\n".join(lines)


def _bench_data(a, shapes):
    """bench's ``--calibration`` / ``--data-loader-script`` samples, checked against the first model's
    inputs and ``--input-shape`` (None: neither given)."""
    source = _calibration(a)
    if source is None:
        return None
    from .bench import COMPARE_SAMPLES
    from .calibration import first_samples, load_checked
    from .io import load_model

    return first_samples(load_checked(source, load_model(a.models[0]), shapes, "the given data"), COMPARE_SAMPLES)


def cmd_bench(a) -> int:
    from .bench import bench, format_table

    try:
        batches = [int(b) for b in str(a.batch).split(",") if b]
    except ValueError:
        raise UsageError(f"--batch {a.batch!r} is not a comma-separated list of integers") from None
    if not batches or min(batches) < 1 or a.repeats < 1 or a.warmup < 0 or a.threads < 1:
        raise UsageError("--batch, --repeats and --threads must be positive, --warmup not negative")
    if a.per_tensor and not a.int8:
        raise UsageError("--per-tensor applies to --int8 only")
    if a.json:
        from .io import check_outputs

        check_outputs(list(a.models), [("--json", a.json)], other_inputs=[("--calibration", a.calibration),
                                                                          ("--data-loader-script", _script_path(a))])
    shapes = _shapes(a.input_shape, batch=max(batches))
    data = _bench_data(a, shapes)
    from .io import temp_dir

    with temp_dir("onnx-alds-bench-") as tmp:
        paths, labels = a.models, None
        if a.int8:
            from .bench import with_int8

            paths, labels, done = with_int8(a.models, tmp, _calibration(a), per_channel=not a.per_tensor,
                                            input_shapes=shapes)
            for m, r in zip(a.models, done):
                print(f"{m}: {r.summary()}")
        rows = bench(paths, provider=a.provider, batches=batches, repeats=a.repeats, warmup=a.warmup,
                     threads=a.threads, input_shapes=shapes, labels=labels, spinning=a.spinning, data=data,
                     kinds=_output_kinds(a.output_kind))
    print(format_table(rows))
    if a.json:
        from .io import atomic_write_bytes

        atomic_write_bytes(a.json, (json.dumps(rows, indent=2) + "\n").encode())
    return 0


def cmd_quantize(a) -> int:
    from .quantize import quantize

    from .io import check_outputs

    out = Path(a.output)
    check_outputs(a.input, [("the output", out), ("the output's external data file", out.with_name(out.name + ".data")),
                            ("--json", a.json)], other_inputs=[("--calibration", a.calibration),
                                                               ("--data-loader-script", _script_path(a))])
    r = quantize(a.input, a.output, _calibration(a), per_channel=not a.per_tensor, samples=a.samples,
                 input_shapes=_shapes(a.input_shape))
    if a.json:
        from .io import atomic_write_bytes

        atomic_write_bytes(a.json, (json.dumps(r.to_dict(), indent=2) + "\n").encode())
    print(r.summary())
    print(f"wrote {', '.join(r.written)}")
    return 0


def cmd_export(a) -> int:
    try:
        from .torch.export import export_from_factory
    except ImportError:
        raise UsageError("export needs torch: pip install 'onnx-alds[torch]'") from None
    from .torch.export import EXAMPLE_DTYPES

    shapes, dtypes = [], []
    for s in a.input_shape:
        dims, _, dtype = s.partition(":")
        if dtype and dtype not in EXAMPLE_DTYPES:
            raise UsageError(f"--input-shape {s!r}: the dtype must be one of {', '.join(EXAMPLE_DTYPES)}")
        try:
            shapes.append(tuple(int(d) for d in dims.replace("x", ",").split(",") if d))
        except ValueError:
            raise UsageError(f"--input-shape {s!r} is not a comma-separated list of integers, with an optional "
                             f":DTYPE") from None
        dtypes.append(dtype or "float32")
    _check_input_bytes(sum(4 * math.prod(s) for s in shapes if min(s, default=1) > 0))  # (others: refused below)
    out = Path(a.output)
    from .io import check_outputs

    from .torch.export import factory_file

    check_outputs(None, [("the output", out)], other_inputs=[("--checkpoint", a.checkpoint),
                                                             ("the factory's source file", factory_file(a.factory))])
    try:
        export_from_factory(a.factory, out, checkpoint=a.checkpoint, input_shapes=shapes, input_dtypes=dtypes,
                            opset=a.opset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote {out}")
    return 0


def cmd_finetune(a) -> int:
    from .torch.finetune_cli import cmd_finetune as run

    return run(a)


COMMANDS = {"rewrite": cmd_rewrite, "inspect": cmd_inspect, "bench": cmd_bench, "quantize": cmd_quantize,
            "export": cmd_export, "finetune": cmd_finetune}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks and context
    managers remove temporary files and directories, as on Ctrl-C."""


_signals: list[int] = []  # received while main ran (an extension module may turn the exception into another)


def _on_signal(signum, frame):
    _signals.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _install_signal_handlers() -> dict:
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
                continue  # Ctrl-C ignored or handled by whoever called us
            previous[sig] = signal.signal(sig, _on_signal)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def _watch_signals(handled):
    """Python runs a signal handler only once the main thread is back from C: a long onnxruntime run
    would delay the exit until it ends.  So the signal's number is also written to a pipe
    (``signal.set_wakeup_fd``) whose reader thread stops every run in flight
    (:func:`onnx_alds.runtime.cancel_runs`), and the handler raises as soon as the run returns.
    Returns the function that undoes it (None where signals are not ours to watch)."""
    if not handled:
        return None
    import threading

    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        before = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
        os.close(r)
        os.close(w)
        return None

    def reader():
        while data := os.read(r, 64):
            if any(b in handled for b in data):
                from .runtime import cancel_runs

                cancel_runs()
        os.close(r)

    threading.Thread(target=reader, name="onnx-alds-signals", daemon=True).start()

    def undo():
        from .runtime import allow_runs

        signal.set_wakeup_fd(before)
        os.close(w)  # the reader sees the end of the pipe and stops
        allow_runs()

    return undo


def _interrupted() -> int:
    term = signal.SIGTERM in _signals
    print("onnx-alds: terminated" if term else "onnx-alds: interrupted", file=sys.stderr)
    return 143 if term else 130


class _PrintableFormatter(logging.Formatter):
    """Log lines carry names from the model: escape their control characters."""

    def format(self, record):
        from .io import printable

        return printable(super().format(record))


def main(argv=None) -> int:
    _signals.clear()
    previous = _install_signal_handlers()
    unwatch = _watch_signals(set(previous))
    verbose = False
    try:
        args = _parser().parse_args(argv)
        verbose = args.verbose
        # heavy imports inside the try: Ctrl-C while they load is a clean exit 130
        from .io import large_allocations_to_os

        large_allocations_to_os()
        handler = logging.StreamHandler()
        handler.setFormatter(_PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
        logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
        if not verbose:  # graphsurgeon prints its warnings ("[W] ...") on stdout
            from onnx_graphsurgeon.logger import G_LOGGER

            G_LOGGER.severity = G_LOGGER.ERROR
        rc = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except (KeyboardInterrupt, Terminated):
        return _interrupted()
    except AldsError as e:
        if _signals:
            return _interrupted()
        from .io import printable

        print(f"onnx-alds: error: {printable(e)}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `onnx-alds inspect --json | head`: the reader has all it wanted
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush into the closed pipe at exit
        except (OSError, ValueError):
            pass
        return 141
    except MemoryError:
        print("onnx-alds: error: out of memory", file=sys.stderr)
        return 1
    except Exception as e:  # a bug: one sentence, and the traceback only with -v
        if _signals:
            return _interrupted()
        if verbose:
            raise
        from .io import printable

        print(f"onnx-alds: internal error ({type(e).__name__}: {printable(first_line(e))}); rerun with -v and "
              f"report it",
              file=sys.stderr)
        return 1
    finally:
        if unwatch is not None:
            unwatch()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())

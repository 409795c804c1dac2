#!/usr/bin/env python
"""Test accuracy of trained models before compression, after one-shot compression and after a short fine-tune.

    python tools/accuracy_table.py                                   # resnet20 and vgg_small
    python tools/accuracy_table.py --models resnet20 vgg_small mobilenet_small resnet56 transformer_small
    python tools/accuracy_table.py --keeps 0.5 --methods alds --epochs 1 --out-dir /tmp/acc

For each model (trained checkpoint ``ARTIFACTS/checkpoints/NAME.pt``; trained
here with tools/train_models.py's recipe when missing), each kept fraction of
the parameters and each method (alds, alds-paper, uniform):

1. the checkpoint is exported (BatchNorm folded) to ``OUT/onnx/NAME.onnx``;
2. ``onnx_alds.rewrite`` compresses that file to the budget; the result is
   written to ``OUT/onnx/NAME-METHOD-KEEP.onnx`` and its plan to
   ``OUT/plans/``: that is the one-shot model;
3. the same plan is applied to the torch model (``onnx_alds.torch.apply_plan``),
   fine-tuned on the digits training split with ``onnx_alds.torch.finetune``
   (tools/finetune_model.py's recipe: distillation from the original unless
   ``--no-teacher``, SGD, warm-up + cosine lr, random shifts of up to 2 pixels of the
   training images (``--shift``), fixed seed, BatchNorm
   re-inserted after each factorized conv while training and folded back at
   the end; per-epoch checkpoints under ``OUT/runs/``, so a rerun resumes) and
   exported to ``OUT/onnx/NAME-METHOD-KEEP-ft.onnx``.

Every accuracy is measured through onnxruntime (CPUExecutionProvider) on an
exported ONNX file, on the digits test split (450 images). A budget a method
cannot reach is recorded with status ``infeasible``, not raised.

Output: a table on stdout, ``OUT/accuracy.csv`` (accuracies as fractions in
[0, 1]; ``params_kept`` is the fraction of the model's parameters the
compressed ONNX file holds, ``max_eps`` the largest per-layer relative error)
and ``OUT/accuracy.png`` (accuracy against parameters kept, one panel per
model, one colour per method, one-shot dashed, fine-tuned solid).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tools"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import finetune_model as ftm  # noqa: E402

log = logging.getLogger("accuracy_table")

DEFAULT_MODELS = ["resnet20", "vgg_small"]
DEFAULT_KEEPS = [0.7, 0.5, 0.3, 0.15]
METHODS = ["alds", "alds-paper", "uniform"]
COLUMNS = ["model", "keep", "method", "status", "params_kept", "max_eps", "acc_original", "acc_oneshot",
           "acc_finetuned", "params_before", "params_after", "epochs", "lr", "teacher", "loss", "threads", "note",
           "rewrite_s", "finetune_s"]
IMAGE_SIZE = ftm.IMAGE_SIZE


def ensure_checkpoint(name: str, artifacts: Path, train_epochs: int | None, seed: int,
                      progress: bool) -> tuple[Path, Path | None]:
    """``ARTIFACTS/checkpoints/NAME.pt``, trained with tools/train_models.py's recipe when missing; with
    the ONNX file that training exported from it (None when the checkpoint was already there)."""
    ckpt = artifacts / "checkpoints" / f"{name}.pt"
    if ckpt.is_file():
        return ckpt, None
    shipped = ftm.SHIPPED_CHECKPOINTS.get(name)
    if train_epochs is None and shipped is not None and shipped.is_file():
        print(f"{name}: no checkpoint at {ckpt}; using the shipped {shipped}", flush=True)
        return shipped, None
    import train_models

    print(f"{name}: no checkpoint at {ckpt}; training it (tools/train_models.py recipe"
          + (f", {train_epochs} epochs" if train_epochs else "") + ")", flush=True)
    (artifacts / "checkpoints").mkdir(parents=True, exist_ok=True)
    (artifacts / "onnx").mkdir(parents=True, exist_ok=True)
    args = SimpleNamespace(epochs=train_epochs, seed=seed, out=artifacts, fresh=False, no_progress=not progress,
                           opset=None)
    r = train_models.train_one(name, args)
    print(f"{name}: trained, test accuracy {r['ort_acc']:.4f} through onnxruntime", flush=True)
    return ckpt, Path(r["onnx_path"])


def _tag(keep: float) -> str:
    return f"{keep:g}".replace(".", "p")


def run_model(name: str, args, data, rows_out: list, counter: list) -> None:
    from onnx_alds import rewrite
    from onnx_alds.errors import InfeasibleBudget
    from onnx_alds.extract import count_params
    from onnx_alds.io import save_model
    from onnx_alds.torch import export

    import onnx

    x_tr, y_tr, x_te, y_te = data
    ckpt, exported = ensure_checkpoint(name, args.artifacts, args.train_epochs, args.seed, not args.no_progress)
    model = ftm.load_trained(name, ckpt)
    onnx_dir = args.out_dir / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "plans").mkdir(parents=True, exist_ok=True)
    orig_path = onnx_dir / f"{name}.onnx"
    if exported is not None:  # just trained and exported from this very checkpoint
        shutil.copyfile(exported, orig_path)
    else:
        export(model, x_te[:8], orig_path, output_names=["logits"])
    acc_orig, provider = ftm.ort_accuracy(orig_path, x_te, y_te, threads=args.threads)
    params_before = count_params(onnx.load(str(orig_path)))
    print(f"{name}: {params_before:,} params, original test accuracy {acc_orig:.4f} through onnxruntime "
          f"({provider})", flush=True)
    for keep in args.keeps:
        for method in args.methods:
            counter[0] += 1
            label = f"[{counter[0]}/{counter[1]}] {name} keep {keep:g} {method}"
            row = dict(model=name, keep=keep, method=method, acc_original=acc_orig, params_before=params_before,
                       epochs=args.epochs, lr=args.lr, teacher=not args.no_teacher, note="")
            stem = f"{name}-{method}-{_tag(keep)}"
            t0 = time.perf_counter()
            try:
                cal = {onnx.load(str(orig_path)).graph.input[0].name: x_tr[: args.calibration].numpy()} \
                    if args.calibration > 0 else None
                new, rep = rewrite(orig_path, keep_params=keep, method=method, validate=False, compare=False,
                                   calibration=cal, allow_slower=args.allow_slower)
            except InfeasibleBudget as e:
                row.update(status="infeasible", note=str(e), rewrite_s=time.perf_counter() - t0)
                rows_out.append(row)
                print(f"{label}: infeasible ({e})", flush=True)
                continue
            row["rewrite_s"] = time.perf_counter() - t0
            oneshot_path = onnx_dir / f"{stem}.onnx"
            save_model(new, oneshot_path)
            rep.plan.save(args.out_dir / "plans" / f"{stem}.json")
            acc_one, _ = ftm.ort_accuracy(oneshot_path, x_te, y_te, threads=args.threads)
            row.update(status="ok", params_kept=rep.params_fraction, max_eps=rep.max_rel_error,
                       params_after=rep.params_after, acc_oneshot=acc_one)
            # fine-tune the same plan in torch, export, measure through onnxruntime
            t0 = time.perf_counter()
            compressed = ftm.compress(model, rep.plan, x_te[:8], batchnorm=False)
            train_loader = ftm.train_loader(args.batch_size, args.seed, args.shift)
            ftm.seed_everything(args.seed)
            hist = ftm.finetune_compressed(compressed, train_loader, epochs=args.epochs, lr=args.lr,
                                           optimizer=args.optimizer, weight_decay=args.weight_decay,
                                           checkpoint_dir=args.out_dir / "runs" / stem,
                                           progress=not args.no_progress,
                                           teacher=None if args.no_teacher else model, batchnorm=not args.no_bn,
                                           threads=args.threads, warmup=args.warmup)
            row.update(loss=hist["loss"], threads=hist["threads"])
            compressed.cpu().eval()
            ft_path = onnx_dir / f"{stem}-ft.onnx"
            export(compressed, x_te[:8], ft_path, output_names=["logits"])
            row["finetune_s"] = time.perf_counter() - t0
            acc_ft, _ = ftm.ort_accuracy(ft_path, x_te, y_te, threads=args.threads)
            row["acc_finetuned"] = acc_ft
            ft_params = count_params(onnx.load(str(ft_path)))
            if ft_params != rep.params_after:  # the export must give the plan's structure back
                row["note"] = f"fine-tuned file has {ft_params} params, the rewrite {rep.params_after}"
                log.warning("%s: %s", stem, row["note"])
            if any(math.isnan(v) for v in hist["train_loss"]):
                row["note"] = (row["note"] + "; " if row["note"] else "") + "training loss became NaN"
            rows_out.append(row)
            print(f"{label}: params {rep.params_fraction:.3f}, max eps {rep.max_rel_error:.3f}, acc "
                  f"{acc_orig:.4f} -> one-shot {acc_one:.4f} -> fine-tuned {acc_ft:.4f}  "
                  f"(rewrite {row['rewrite_s']:.1f}s, fine-tune+export {row['finetune_s']:.1f}s"
                  f"{', resumed' if hist['resumed_from'] else ''})", flush=True)


def _fmt(v, spec):
    return "" if v is None or v == "" else format(v, spec)


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<16} {'keep':>5} {'method':<11} {'params':>7} {'max ε':>7} {'orig %':>7} {'1-shot %':>9} " \
           f"{'fine-tuned %':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['model']:<16} {r['keep']:>5g} {r['method']:<11} {'-':>7} {'-':>7} "
                         f"{100 * r['acc_original']:>7.2f} {'infeasible: ' + r['note']}")
            continue
        lines.append(f"{r['model']:<16} {r['keep']:>5g} {r['method']:<11} {r['params_kept']:>7.3f} "
                     f"{r['max_eps']:>7.3f} {100 * r['acc_original']:>7.2f} {100 * r['acc_oneshot']:>9.2f} "
                     f"{100 * r['acc_finetuned']:>12.2f}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            out = {}
            for c in COLUMNS:
                v = r.get(c, "")
                out[c] = f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)
            w.writerow(out)
    tmp.replace(path)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    colors = {"alds": "tab:blue", "alds-paper": "tab:orange", "uniform": "tab:green"}
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [r for r in rows if r["model"] == name]
        orig = mine[0]["acc_original"]
        ax.axhline(100 * orig, color="grey", lw=1, ls=":", label=f"original ({100 * orig:.1f}%)")
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["params_kept"], r["acc_oneshot"], r["acc_finetuned"]) for r in mine
                         if r["method"] == method and r["status"] == "ok")
            if not pts:
                continue
            xs = [100 * p[0] for p in pts]
            c = colors.get(method)
            ax.plot(xs, [100 * p[2] for p in pts], "-o", color=c, ms=4, label=f"{method} fine-tuned")
            ax.plot(xs, [100 * p[1] for p in pts], "--s", color=c, ms=3, alpha=0.8, label=f"{method} one-shot")
        ax.set_title(name)
        ax.set_xlabel("parameters kept (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("digits test accuracy through onnxruntime: one-shot (dashed) and fine-tuned (solid)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    import models

    r = ftm.RECIPE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(models.MODELS))
    p.add_argument("--keeps", nargs="+", type=float, default=DEFAULT_KEEPS, help="kept fractions of the params")
    p.add_argument("--allow-slower", action="store_true",
                   help="rewrite without the speed guard (budgets it cannot meet are rows marked infeasible)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--epochs", type=int, default=r["epochs"], help="fine-tuning epochs")
    p.add_argument("--lr", type=float, default=r["lr"])
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=r["optimizer"])
    p.add_argument("--weight-decay", type=float, default=r["weight_decay"])
    p.add_argument("--batch-size", type=int, default=r["batch_size"])
    p.add_argument("--shift", type=int, default=r["shift"],
                   help="move the training images by up to this many pixels at random (0: none)")
    p.add_argument("--calibration", type=int, default=256,
                   help="training images given to the rewrite as calibration data (data-aware errors and "
                        "factors; 0: weight-only, the rewrite without --calibration)")
    p.add_argument("--no-bn", action="store_true", help="fine-tune without re-inserted BatchNorm")
    p.add_argument("--no-teacher", action="store_true", help="fine-tune on the labels only, no distillation")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps (0: plain cosine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--artifacts", type=Path, default=REPO / "artifacts",
                   help="where checkpoints/NAME.pt are read (and trained when missing)")
    p.add_argument("--train-epochs", type=int, default=None,
                   help="epochs for training a missing checkpoint (default: the train_models recipe)")
    p.add_argument("--out-dir", type=Path, default=REPO / "artifacts" / "accuracy")
    p.add_argument("--threads", type=int, default=1, help=ftm.THREADS_HELP.replace("default: ", "default 1, "))
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for k in args.keeps:
        if not 0.0 < k <= 1.0:
            p.error(f"--keeps values must be in (0, 1], got {k:g}")
    if args.epochs < 0:
        p.error("--epochs must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads_before)


def _main(args) -> int:
    ftm.quiet_exporter_logs()
    from models.data import load_digits_split

    t_start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(size=IMAGE_SIZE, seed=0)
    rows: list[dict] = []
    counter = [0, len(args.models) * len(args.keeps) * len(args.methods)]
    try:
        for name in args.models:
            run_model(name, args, data, rows, counter)
            write_csv(rows, args.out_dir / "accuracy.csv")  # partial results survive an interruption
    except ftm.CliError as e:
        print(f"error: {e}.", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t_start
    print()
    print(format_table(rows))
    csv_path = args.out_dir / "accuracy.csv"
    write_csv(rows, csv_path)
    print(f"\nwrote {csv_path}", end="")
    if not args.no_plot:
        png = args.out_dir / "accuracy.png"
        plot(rows, png)
        print(f" and {png}", end="")
    print(f"; wall time {wall:.0f}s ({args.epochs} fine-tuning epochs, lr {args.lr:g}, {args.optimizer}, "
          f"{'no BN' if args.no_bn else 'BN re-inserted'}, {'no teacher' if args.no_teacher else 'teacher'}, "
          f"warm-up {args.warmup:g}, shift {args.shift}, seed {args.seed}, {args.threads} threads)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Fine-tune a compressed zoo model on digits, export it to ONNX, print its test accuracy.

    python tools/train_models.py --models resnet20          # artifacts/checkpoints/resnet20.pt, artifacts/onnx/resnet20.onnx
    onnx-alds rewrite artifacts/onnx/resnet20.onnx r20_alds.onnx --keep-params 0.3 --plan plan.json
    python tools/finetune_model.py --model resnet20 --plan plan.json --epochs 5 --out r20_alds_ft.onnx

The model is built from ``models.MODELS``, loads the trained state dict
(``--checkpoint``, default ``artifacts/checkpoints/NAME.pt``), and the plan
(the JSON ``onnx-alds rewrite --plan`` writes) is applied with
``onnx_alds.torch.apply_plan``: BatchNorm is folded first, exactly as in the
ONNX export, so the compressed module computes what the rewritten ONNX file
computes.

Recipe (the defaults): 8 epochs of SGD with Nesterov momentum 0.9, lr 0.02
with a cosine to 0 over all steps, weight decay 5e-4, batch 64, fixed seed, on
the digits training split. Because the plan refers to BN-folded weights, the
compressed network has no BatchNorm left, and a deep BN-free ResNet fine-tunes
badly (ResNet20 at lr 0.02 diverged to 10% test accuracy even at 70% of its
parameters, at lr 0.01 to NaN at 50%). So, unless ``--no-bn``, a BatchNorm is
put back after every factorized convolution for the duration of the
fine-tune, initialised to the identity in eval mode (running statistics and
affine parameters from the factorized layer's outputs on the training split);
the export folds it into the decoder conv again, so the ONNX file has exactly
the plan's structure and parameter count.

With ``--checkpoint-dir`` every epoch is saved there and a rerun resumes after
the last one. The fine-tuned model is exported with ``onnx_alds.torch.export``
and the printed test accuracy is measured on the exported file through
onnxruntime (CPUExecutionProvider). Errors are one sentence on stderr, exit
code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("finetune_model")

IMAGE_SIZE = 16
DEFAULT_CHECKPOINTS = REPO / "artifacts" / "checkpoints"
# the fine-tuning recipe used by this tool and by tools/accuracy_table.py
RECIPE = dict(epochs=8, lr=0.02, optimizer="sgd", batch_size=64, weight_decay=5e-4, batchnorm=True)


# torch/onnxruntime threads. One by default: these convs are tiny, so two threads gain little on an idle
# 2-core machine, and when anything else shares the cores every parallel region waits for a descheduled
# thread (one fine-tuning epoch of ResNet20 measured 2.6 s with 1 thread, 128 s with 2).
THREADS_HELP = "torch and onnxruntime threads (default 1: much faster than 2 when other work shares the cores)"


class CliError(Exception):
    """A one-sentence error for the user (exit code 2)."""


def quiet_exporter_logs() -> None:
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", module=r"onnxscript.*")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_trained(name: str, checkpoint: str | os.PathLike):
    """``models.MODELS[name]`` with the state dict in ``checkpoint`` loaded, in eval mode."""
    import torch

    import models

    if name not in models.MODELS:
        raise CliError(f"unknown model {name!r}; choose one of {', '.join(sorted(models.MODELS))}")
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise CliError(f"checkpoint {str(ckpt)!r} does not exist (train it with: python tools/train_models.py "
                       f"--models {name})")
    model = models.build(name)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CliError(f"cannot read checkpoint {str(ckpt)!r} ({type(e).__name__})") from None
    if isinstance(state, dict) and "model" in state and "epoch" in state:  # a per-epoch training checkpoint
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        raise CliError(f"checkpoint {str(ckpt)!r} does not hold the weights of {name}") from None
    return model.eval()


def load_plan(path: str | os.PathLike):
    from onnx_alds.errors import UsageError
    from onnx_alds.plan import Plan

    p = Path(path)
    if not p.is_file():
        raise CliError(f"plan file {str(p)!r} does not exist (write one with: onnx-alds rewrite IN.onnx OUT.onnx "
                       f"--plan {p.name})")
    try:
        return Plan.load(p)
    except UsageError as e:
        raise CliError(str(e)) from None


def compress(model, plan, example_inputs, *, batchnorm: bool, calibration_x=None):
    """``apply_plan`` with BatchNorm folded first; with ``batchnorm``, BN re-inserted for fine-tuning."""
    from onnx_alds.errors import AldsError
    from onnx_alds.torch import apply_plan

    try:
        compressed = apply_plan(model, plan, example_inputs=example_inputs)
    except (KeyError, ValueError, AldsError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise CliError(f"the plan does not fit this model: {msg}") from None
    if batchnorm:
        from onnx_alds.torch import with_batchnorm

        compressed = with_batchnorm(compressed, calibration_x if calibration_x is not None else example_inputs)
    return compressed


def ort_accuracy(onnx_path: str | os.PathLike, x, y, threads: int | None = None) -> tuple[float, str]:
    """Accuracy of an ONNX classifier on (x, y) through onnxruntime's CPU provider, and the provider used."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    xs = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    logits = np.concatenate([sess.run(None, {name: xs[i : i + 256]})[0] for i in range(0, len(xs), 256)])
    ys = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
    return float((logits.argmax(1) == ys).mean()), sess.get_providers()[0]


def finetune_compressed(model, train_loader, *, epochs: int, lr: float, optimizer: str, weight_decay: float,
                        checkpoint_dir=None, progress: bool = True) -> dict:
    """``onnx_alds.torch.finetune`` on the CPU; a checkpoint dir of another run is a CliError."""
    from onnx_alds.torch import finetune

    try:
        return finetune(model, train_loader, epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                        checkpoint_dir=checkpoint_dir, resume=True, device="cpu", progress=progress)
    except RuntimeError as e:
        if checkpoint_dir is not None and ("state_dict" in str(e) or "size mismatch" in str(e)):
            raise CliError(f"the checkpoint directory {str(checkpoint_dir)!r} holds a run of another model or "
                           f"plan; give a fresh --checkpoint-dir") from None
        raise


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a name in models.MODELS (resnet20, vgg_small, ...)")
    p.add_argument("--plan", required=True, type=Path, help="plan JSON written by onnx-alds rewrite --plan")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="trained state dict (default artifacts/checkpoints/MODEL.pt)")
    p.add_argument("--out", required=True, type=Path, help="fine-tuned ONNX file to write")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=RECIPE["optimizer"])
    p.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--no-bn", action="store_true", help="fine-tune without re-inserted BatchNorm")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="per-epoch checkpoints; a rerun resumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run(args) -> dict:
    import models

    if args.model not in models.MODELS:
        raise CliError(f"unknown model {args.model!r}; choose one of {', '.join(sorted(models.MODELS))}")
    if args.epochs < 0:
        raise CliError(f"--epochs must be 0 or more, got {args.epochs}")
    if args.lr <= 0 or args.batch_size < 1:
        raise CliError("--lr must be positive and --batch-size at least 1")
    if args.out.suffix != ".onnx":
        raise CliError(f"--out must name an .onnx file, got {str(args.out)!r}")
    if args.out.exists() and args.out.is_dir():
        raise CliError(f"--out {str(args.out)!r} is a directory")
    plan = load_plan(args.plan)
    checkpoint = args.checkpoint or DEFAULT_CHECKPOINTS / f"{args.model}.pt"

    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, plan, checkpoint)
    finally:
        torch.set_num_threads(threads_before)


def _run(args, plan, checkpoint) -> dict:
    quiet_exporter_logs()
    from models.data import digits_loaders, load_digits_split
    from onnx_alds.torch import evaluate, export

    model = load_trained(args.model, checkpoint)
    x_tr, _, x_te, y_te = load_digits_split(size=IMAGE_SIZE, seed=0)
    compressed = compress(model, plan, x_te[:8], batchnorm=not args.no_bn, calibration_x=x_tr)
    train_loader, test_loader = digits_loaders(batch_size=args.batch_size, size=IMAGE_SIZE, seed=0,
                                               shuffle_seed=args.seed)
    _, acc_before = evaluate(compressed, test_loader)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    hist = finetune_compressed(compressed, train_loader, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                               weight_decay=args.weight_decay, checkpoint_dir=args.checkpoint_dir,
                               progress=not args.no_progress)
    ft_s = time.perf_counter() - t0
    compressed.cpu().eval()
    try:
        export(compressed, x_te[:8], args.out, output_names=["logits"])
    except OSError as e:
        raise CliError(f"cannot write {str(args.out)!r}: {e.strerror or e}") from None
    acc, provider = ort_accuracy(args.out, x_te, y_te, threads=args.threads)
    return dict(acc_oneshot_torch=acc_before, acc=acc, provider=provider, epochs=args.epochs, finetune_s=ft_s,
                resumed_from=hist["resumed_from"], out=str(args.out))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        r = run(args)
    except CliError as e:
        print(f"error: {e}.", file=sys.stderr)
        return 2
    print(f"{args.model}: one-shot test accuracy {r['acc_oneshot_torch']:.4f} (torch); after {r['epochs']} epochs "
          f"of fine-tuning ({r['finetune_s']:.0f}s{', resumed' if r['resumed_from'] else ''}) "
          f"{r['acc']:.4f} through onnxruntime ({r['provider']}) on {r['out']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

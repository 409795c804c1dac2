#!/usr/bin/env python
"""Fine-tune a compressed zoo model on digits, export it to ONNX, print its test accuracy.

    onnx-alds rewrite models/resnet20_digits.onnx r20_alds.onnx --keep-params 0.15 --plan plan.json
    python tools/finetune_model.py --model resnet20 --plan plan.json --out r20_ft.onnx       # 5 epochs
    python -m torch.distributed.run --nproc_per_node=2 tools/finetune_model.py --model resnet20 \
        --plan plan.json --epochs 1 --out r20_ft.onnx                                          # 2 processes

The model is built from ``models.MODELS`` and loads its trained state dict
(``--checkpoint``; default ``artifacts/checkpoints/NAME.pt``, for resnet20
the shipped ``models/resnet20_digits.pt`` when that is missing; train the
others with tools/train_models.py). The plan (the JSON ``onnx-alds rewrite
--plan`` writes) is applied with ``onnx_alds.torch.apply_plan``: BatchNorm is
folded first, exactly as in the ONNX export, so the compressed module
computes what the rewritten ONNX file computes.

Recipe (the defaults): ``onnx_alds.torch.finetune``'s — distillation from the
original model (KL at T=2 mixed half and half with cross-entropy, plus
feature matching at the factorized layers; ``--no-teacher`` for labels only,
``--teacher-onnx`` to distil from an ONNX file through onnxruntime), SGD
with Nesterov momentum, lr 0.02 with a linear warm-up over the first 10 % of
the steps and a cosine to 0, weight decay 5e-4, batch 64, fixed seed, 5
epochs, training images moved by up to 2 pixels at random along each axis
(``--shift 2``: one pixel of the 8 x 8 original; this is the tool's data
pipeline, not finetune's), BatchNorm put back after every factorized conv
for the fine-tune and folded into it again at the end (``--no-bn`` to
train without), so the ONNX file has exactly the plan's structure and
parameter count.

Under torchrun each process trains its share of every batch (the batch
stays the global one) and rank 0 alone writes checkpoints, the ONNX file and
the printout. With ``--checkpoint-dir`` every epoch is saved there and a
rerun resumes after the last one (the shifts come from torch's RNG, which
the checkpoints restore; under torchrun each rank draws its own). The
printed test accuracy is measured on the exported file through onnxruntime
(CPUExecutionProvider). Errors are one sentence on stderr, exit code 2.
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
SHIPPED_CHECKPOINTS = {"resnet20": REPO / "models" / "resnet20_digits.pt"}
# the fine-tuning recipe used by this tool and by tools/accuracy_table.py: onnx_alds.torch.finetune's defaults
# ``shift``: the training images move by up to this many pixels at random (RandomShift; measured in the README,
# "PyTorch models": ResNet20 at keep 0.15 within a point of the original after 4 and 5 epochs on seeds 0-4).
RECIPE = dict(epochs=5, lr=0.02, optimizer="sgd", batch_size=64, weight_decay=5e-4, batchnorm=True, teacher=True,
              shift=2)


# torch/onnxruntime threads. One per process by default (finetune's "auto" for these models): the convs are
# tiny, so two threads gain little on an idle 2-core machine, and when anything else shares the cores every
# parallel region waits for a descheduled thread (5 epochs of ResNet20: 41 s with 1 thread, 548 s with 2).
THREADS_HELP = "torch and onnxruntime threads per process (default: onnx_alds.torch.finetune's auto, 1 here)"


def default_checkpoint(name: str) -> Path:
    own = DEFAULT_CHECKPOINTS / f"{name}.pt"
    return own if own.is_file() or name not in SHIPPED_CHECKPOINTS else SHIPPED_CHECKPOINTS[name]


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


class RandomShift:
    """A dataset of ``(image, label)`` whose images move by a random whole number of pixels in
    ``[-shift, shift]`` along each axis (independently per sample and per draw, from torch's global RNG),
    the uncovered border filled with ``fill``, the value of a blank pixel.

    A digit moved by a pixel is the same digit: with 1 347 training images a fine-tune of a few epochs
    otherwise learns the training set's exact pixel positions. 1 px of the 16 x 16 input is half a pixel of
    the 8 x 8 original.
    """

    def __init__(self, x, y, shift: int, fill: float):
        self.x, self.y, self.shift, self.fill = x, y, int(shift), float(fill)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        import torch
        import torch.nn.functional as F

        x, d = self.x[i], self.shift
        if d > 0:
            dx, dy = (int(v) for v in torch.randint(-d, d + 1, (2,)))
            h, w = x.shape[-2:]
            x = F.pad(x, (d, d, d, d), value=self.fill)[..., d + dy : d + dy + h, d + dx : d + dx + w]
        return x, self.y[i]


def train_loader(batch_size: int, seed: int, shift: int):
    """The digits training split (``models.data.load_digits_split(IMAGE_SIZE, seed=0)``), shuffled with a
    generator seeded by ``seed``, with :class:`RandomShift` of ``shift`` pixels (0: the images as they are)."""
    import torch
    from torch.utils.data import DataLoader

    from models.data import digits_loaders, digits_normalization

    loader, _ = digits_loaders(batch_size=batch_size, size=IMAGE_SIZE, seed=0, shuffle_seed=seed)
    if shift <= 0:
        return loader
    x, y = loader.dataset.tensors
    norm = digits_normalization(0)
    blank = (0.0 - norm.mean) / norm.std  # a pixel of value 0, normalized as the model's inputs are
    g = torch.Generator().manual_seed(seed)
    return DataLoader(RandomShift(x, y, shift, blank), batch_size=batch_size, shuffle=True, generator=g)


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
                        checkpoint_dir=None, progress: bool = True, teacher=None, batchnorm=True,
                        threads=None, **kwargs) -> dict:
    """``onnx_alds.torch.finetune`` on the CPU (``batchnorm``: inserted for the fine-tune and folded back;
    ``threads`` None: finetune's auto); its usage errors become CliErrors."""
    from onnx_alds.errors import UsageError
    from onnx_alds.torch import finetune

    try:
        return finetune(model, train_loader, epochs=epochs, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                        teacher=teacher, batchnorm="auto" if batchnorm else False,
                        threads="auto" if threads is None else threads, checkpoint_dir=checkpoint_dir, resume=True,
                        device="cpu", progress=progress, **kwargs)
    except UsageError as e:
        raise CliError(str(e)) from None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a name in models.MODELS (resnet20, vgg_small, ...)")
    p.add_argument("--plan", required=True, type=Path, help="plan JSON written by onnx-alds rewrite --plan")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="trained state dict (default artifacts/checkpoints/MODEL.pt; for resnet20 the shipped "
                        "models/resnet20_digits.pt when that is missing)")
    p.add_argument("--out", required=True, type=Path, help="fine-tuned ONNX file to write")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"])
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default=RECIPE["optimizer"])
    p.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--shift", type=int, default=RECIPE["shift"],
                   help="move the training images by up to this many pixels at random (default %(default)s; 0 for "
                        "none)")
    p.add_argument("--no-bn", action="store_true", help="fine-tune without re-inserted BatchNorm")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--no-teacher", action="store_true", help="cross-entropy on the labels only, no distillation")
    t.add_argument("--teacher-onnx", type=Path, default=None,
                   help="distil from this ONNX file through onnxruntime instead of the torch original")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="per-epoch checkpoints; a rerun resumes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
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
    if args.shift < 0:
        raise CliError(f"--shift must be 0 or more, got {args.shift}")
    if args.out.suffix != ".onnx":
        raise CliError(f"--out must name an .onnx file, got {str(args.out)!r}")
    if args.out.exists() and args.out.is_dir():
        raise CliError(f"--out {str(args.out)!r} is a directory")
    plan = load_plan(args.plan)
    if args.teacher_onnx is not None and not args.teacher_onnx.is_file():
        raise CliError(f"--teacher-onnx {str(args.teacher_onnx)!r} does not exist")
    checkpoint = args.checkpoint or default_checkpoint(args.model)
    return _run(args, plan, checkpoint)


def _run(args, plan, checkpoint) -> dict:
    quiet_exporter_logs()
    from models.data import digits_loaders, load_digits_split
    from onnx_alds.torch import evaluate, export

    model = load_trained(args.model, checkpoint)
    _, _, x_te, y_te = load_digits_split(size=IMAGE_SIZE, seed=0)
    compressed = compress(model, plan, x_te[:8], batchnorm=False)
    _, test_loader = digits_loaders(batch_size=args.batch_size, size=IMAGE_SIZE, seed=0)
    train = train_loader(args.batch_size, args.seed, args.shift)
    _, acc_before = evaluate(compressed, test_loader)
    teacher = None if args.no_teacher else (args.teacher_onnx or model)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    hist = finetune_compressed(compressed, train, epochs=args.epochs, lr=args.lr, optimizer=args.optimizer,
                               weight_decay=args.weight_decay, checkpoint_dir=args.checkpoint_dir,
                               progress=not args.no_progress, teacher=teacher, batchnorm=not args.no_bn,
                               threads=args.threads)
    ft_s = time.perf_counter() - t0
    compressed.cpu().eval()
    result = dict(acc_oneshot_torch=acc_before, epochs=args.epochs, finetune_s=ft_s, rank=hist["rank"],
                  world_size=hist["world_size"], threads=hist["threads"], loss=hist["loss"],
                  resumed_from=hist["resumed_from"], out=str(args.out), acc=None, provider=None)
    if hist["rank"] != 0:  # rank 0 alone exports and measures
        return result
    try:
        export(compressed, x_te[:8], args.out, output_names=["logits"])
    except OSError as e:
        raise CliError(f"cannot write {str(args.out)!r}: {e.strerror or e}") from None
    result["acc"], result["provider"] = ort_accuracy(args.out, x_te, y_te, threads=hist["threads"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        r = run(args)
    except CliError as e:
        print(f"error: {e}.", file=sys.stderr)
        return 2
    if r["rank"] != 0:
        return 0
    print(f"{args.model}: one-shot test accuracy {r['acc_oneshot_torch']:.4f} (torch); after {r['epochs']} epochs "
          f"of fine-tuning ({r['loss']} loss, {r['finetune_s']:.0f}s, {r['world_size']} process(es) x "
          f"{r['threads']} thread(s){', resumed' if r['resumed_from'] else ''}) "
          f"{r['acc']:.4f} through onnxruntime ({r['provider']}) on {r['out']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``onnx-alds finetune``: from a model factory (+ checkpoint) and a plan to a fine-tuned ONNX file.

    onnx-alds finetune models:resnet20 --checkpoint models/resnet20_digits.pt --plan plan.json \\
        --data train.npz [--val val.npz] --out small_ft.onnx [--epochs 5] [--checkpoint-dir ckpt]

``--data`` is an ``.npz`` with ``x`` (inputs, first axis = samples, the
model's layout) and optionally ``y`` (integer class labels, or float targets
of the output's shape); without ``y`` the original model is the only target.
The original (factory + checkpoint, BatchNorm as trained) is the teacher
unless ``--no-teacher``; ``--teacher-onnx IN.onnx`` uses an ONNX file run
through onnxruntime instead. Under torchrun
(``python -m torch.distributed.run --nproc_per_node=N -m onnx_alds finetune ...``)
every rank trains its share and rank 0 alone writes checkpoints and the ONNX file.
A rerun with the same ``--checkpoint-dir`` resumes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ..argtypes import MAX_THREADS, bounded_int, positive
from ..errors import ModelError, UsageError, first_line

AUTO_RECONSTRUCT = 1024  # samples --reconstruct takes by default for a weight-only plan

log = logging.getLogger(__name__)

__all__ = ["add_finetune_parser", "cmd_finetune", "compress_and_finetune"]


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    f = subparsers.add_parser("finetune", help="apply a plan to a PyTorch model, fine-tune it, export ONNX "
                                               "(needs torch)")
    f.add_argument("factory", help="module.path:callable or path/to/file.py:callable building the original model")
    f.add_argument("--checkpoint", help="the original's trained state dict (or a finetune checkpoint)")
    f.add_argument("--plan", required=True, metavar="PLAN.json", help="written by onnx-alds rewrite --plan")
    f.add_argument("--data", required=True, metavar="TRAIN.npz",
                   help="the inputs: an array x, or for a model whose forward takes several, one array per "
                        "parameter of its forward, by name (input_ids, attention_mask); optionally labels y")
    f.add_argument("--val", metavar="VAL.npz", help="validation arrays: keep the best epoch, stop early")
    f.add_argument("--out", required=True, metavar="OUT.onnx")
    f.add_argument("--epochs", type=int, default=5)
    f.add_argument("--batch-size", type=int, default=64, help="global batch, split over torchrun's ranks")
    f.add_argument("--lr", type=positive, default=None, help="peak learning rate (default onnx_alds.torch.finetune's)")
    f.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    t = f.add_mutually_exclusive_group()
    t.add_argument("--no-teacher", action="store_true", help="labels only, no distillation")
    t.add_argument("--teacher-onnx", metavar="IN.onnx", help="distil from this ONNX file through onnxruntime")
    f.add_argument("--no-bn", action="store_true", help="do not insert BatchNorm for the fine-tune")
    f.add_argument("--reconstruct", type=bounded_int(0, 1 << 30), default=None, metavar="N",
                   help="before the fine-tune, reconstruct the compressed model block by block on the first N "
                        "samples of --data (inputs only; see onnx_alds.torch.reconstruct); 0: off; default: "
                        f"{AUTO_RECONSTRUCT} for a plan whose factors came from the weights alone, off for a data-aware "
                        "plan")
    f.add_argument("--checkpoint-dir", metavar="DIR", help="per-epoch checkpoints; a rerun resumes")
    f.add_argument("--threads", type=bounded_int(1, MAX_THREADS), default=None,
                   help="torch threads (default: auto, see finetune)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--opset", type=int, default=None)
    return f


def _tensor(a):
    """An array as training takes it: floats as float32, integers as they are."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(a))
    return x.float() if x.is_floating_point() else x


def _check_declared(z, model, path: str, what: str) -> None:
    """x, as its .npy header declares it, fits the model and y has as many samples: checked before any
    array is read, so a small file declaring gigabytes of the wrong shape is refused at once."""
    import numpy as np

    from ..calibration.data import npy_header
    from ..runtime import MAX_INPUT_BYTES

    try:
        shape, dtype = npy_header(z, "x.npy")
        y_shape = npy_header(z, "y.npy")[0] if "y" in z.files else None
    except Exception:  # noqa: BLE001 - not an .npy member: reading it reports the problem
        return
    if dtype.kind not in "biuf" or not shape or not shape[0]:
        return  # reading it says what is wrong
    if y_shape and y_shape[0] != shape[0]:
        raise UsageError(f"{what} file {path!r}: x has {shape[0]} samples, y {y_shape[0]}")
    sample = int(np.prod(shape[1:], dtype=object)) * dtype.itemsize
    if sample > MAX_INPUT_BYTES:
        raise UsageError(f"{what} file {path!r}: x declares samples of {sample / 2**30:.1f} GiB each, over the "
                         f"{MAX_INPUT_BYTES >> 30} GiB limit")
    _check_fit(model, _tensor(np.zeros((1, *shape[1:]), dtype)), None, what, shape=shape)


def _load_npz(path: str, what: str, model=None):
    import numpy as np
    import torch

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} file {path!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            if model is not None and "x" in z.files:
                _check_declared(z, model, path, what)
            arrays = {k: z[k] for k in z.files}
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - zip and format errors come in many types
        raise UsageError(f"{what} file {path!r} is not a readable .npz ({type(e).__name__})") from None
    names = _input_names(arrays, model, path, what)
    for name in (*names, "y"):
        a = arrays.get(name)
        if a is not None and (a.dtype.kind not in "biuf" or a.ndim == 0):
            raise UsageError(f"{what} file {path!r}: {name} must be a numeric array with a sample axis, not "
                             f"{a.dtype} of shape {a.shape}")
        if a is not None and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise UsageError(f"{what} file {path!r}: {name} holds NaN or inf values; training on them would "
                             f"turn the model's weights into NaN")
    xs = tuple(_tensor(arrays[n]) for n in names)
    counts = {n: len(t) for n, t in zip(names, xs)}
    if len(set(counts.values())) > 1:
        raise UsageError(f"{what} file {path!r}: the inputs hold different numbers of samples "
                         f"({', '.join(f'{n} {c}' for n, c in counts.items())})")
    x = xs[0] if len(xs) == 1 else xs
    y = arrays.get("y")
    if y is not None:
        y = torch.from_numpy(np.ascontiguousarray(y))
        y = y.long() if not y.is_floating_point() else y.float()
        if len(y) != len(xs[0]):
            raise UsageError(f"{what} file {path!r}: {names[0]} has {len(xs[0])} samples, y {len(y)}")
    if len(xs[0]) == 0:
        raise UsageError(f"{what} file {path!r} holds no samples")
    return x, y


def _input_names(arrays: dict, model, path: str, what: str) -> list[str]:
    """The arrays that are the model's inputs, in its forward's order: ``x`` for a model of one input;
    else one array per parameter of ``model.forward``, named as the parameter (the arrays a tokenizer
    gives: ``input_ids``, ``attention_mask``), the first ones required and the rest where given."""
    if "x" in arrays:
        return ["x"]
    from .export import forward_params

    params = forward_params(model) if model is not None else []
    given = [p for p in params if p in arrays]
    unknown = sorted(set(arrays) - set(given) - {"y"})
    if not given or unknown:
        takes = f"its forward takes {', '.join(params)}" if params else "its forward's parameters are not named"
        raise UsageError(f"{what} file {path!r} has no array named x, nor one per input of the model ({takes}; the "
                         f"file has {', '.join(sorted(arrays)) or 'nothing'})")
    missing = [p for p in params[:params.index(given[-1])] if p not in arrays]
    if missing:
        raise UsageError(f"{what} file {path!r} has {given[-1]} but not {missing[0]}, which the model's forward "
                         f"takes before it")
    return given


def _check_fit(model, x, y, what: str, shape=None) -> None:
    """One sentence unless ``model`` runs on ``x`` and integer labels ``y`` index its class scores
    (``shape``: the one to name, where ``x`` stands for an array not read yet)."""
    import torch

    from .finetune_data import inputs_of

    xs = inputs_of(x)
    try:
        with torch.no_grad():
            out = model(*(t[:2] for t in xs))
    except Exception as e:  # noqa: BLE001 - a shape or dtype mismatch is raised by whichever layer meets it
        if len(xs) > 1:
            fed = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in xs)
            raise UsageError(f"{what}'s inputs ({fed}) do not fit the model ({first_line(e)})") from None
        hint = "; it holds integers, and most models take float inputs" if not x.is_floating_point() else ""
        raise UsageError(f"{what}'s x (shape {tuple(shape or x.shape)}, {str(x.dtype).replace('torch.', '')}) does "
                         f"not fit the model ({first_line(e)}){hint}") from None
    if y is not None and not y.is_floating_point() and isinstance(out, torch.Tensor) and out.dim() == 2:
        classes = out.shape[1]
        if int(y.min()) < 0 or int(y.max()) >= classes:
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise UsageError(f"{what}'s y holds the label {bad}, but the model has {classes} class scores "
                             f"(labels 0 to {classes - 1})")


def _check_weights(model, what: str) -> None:
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"{what} holds NaN or inf values in {name!r}; a model fine-tuned from it would "
                             f"output NaN")


def _loader(x, y, batch_size: int, shuffle: bool, seed: int):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    if isinstance(x, tuple):  # several inputs: batches {"input": [x0, x1, ...], "target": y}
        ds = _Inputs(x, y)
    else:
        ds = TensorDataset(x, y) if y is not None else TensorDataset(x)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None)


class _Inputs:
    """A dataset of several input tensors (and labels): each item ``{"input": (x0[i], x1[i], ...),
    "target": y[i]}``, as :func:`~onnx_alds.torch.finetune_data.batch_xy` reads a batch."""

    def __init__(self, xs: tuple, y):
        self.xs, self.y = xs, y

    def __len__(self) -> int:
        return len(self.xs[0])

    def __getitem__(self, i):
        item = {"input": tuple(t[i] for t in self.xs)}
        if self.y is not None:
            item["target"] = self.y[i]
        return item


def compress_and_finetune(original, plan, train_loader, *, example_inputs, out=None, teacher: Any = "original",
                          output_names=None, opset=None, reconstruct: int = 0, **finetune_kwargs) -> tuple[Any, dict]:
    """``apply_plan``, then with ``reconstruct`` > 0 :func:`~onnx_alds.torch.reconstruct` on the first
    ``reconstruct`` inputs of ``train_loader``, then :func:`~onnx_alds.torch.finetune`, then (rank 0
    only) export to ``out``.

    ``teacher``: ``"original"`` (the model given, BatchNorm as trained), None,
    or anything :func:`finetune` takes. Returns the fine-tuned student (on the
    CPU, eval mode) and the history; ``history["exported"]`` is the path
    written, or None (no ``out``, or a rank other than 0); ``history["reconstruct"]``
    what the reconstruction did (or None).
    """
    from .export import export, input_names_for
    from .finetune import finetune
    from .finetune_data import inputs_of
    from .modules import apply_plan

    try:
        student = apply_plan(original, plan, example_inputs=example_inputs)
    except (KeyError, ValueError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise UsageError(f"the plan does not fit this model: {msg}") from None
    _check_weights(student, "the compressed model (the plan's factors)")
    rec = None
    if reconstruct:
        from .reconstruct import reconstruct as reconstruct_blocks

        rec = reconstruct_blocks(student, original, train_loader, max_samples=reconstruct,
                                 progress=bool(finetune_kwargs.get("config") and finetune_kwargs["config"].progress))
    hist = finetune(student, train_loader, teacher=original if teacher == "original" else teacher,
                    **finetune_kwargs)
    student.cpu().eval()
    hist["reconstruct"] = None if rec is None else rec.to_dict()
    hist["exported"] = None
    if out is not None and hist["rank"] == 0:
        try:
            export(student, example_inputs, out, output_names=output_names, opset=opset,
                   input_names=input_names_for(original, len(inputs_of(example_inputs))))
        except OSError as e:
            raise UsageError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
        hist["exported"] = str(out)
    return student, hist


def _reconstruct_samples(given: int | None, plan) -> int:
    """``--reconstruct``'s samples: as given, else :data:`AUTO_RECONSTRUCT` for a plan without data-aware
    factors (from its weights alone, every block of a deep net starts far off: ResNet56 at keep 0.3 fine-tuned
    to 31-35 % from it and to 98.4-98.9 % reconstructed first; docs/finetune.md) and 0 for a data-aware
    plan (its factors already fit real inputs: reconstructing first moved the fine-tuned accuracy by less
    than a point either way)."""
    if given is not None:
        return given
    return 0 if plan.factors else AUTO_RECONSTRUCT


def _config(a):
    """The :class:`~onnx_alds.torch.finetune_config.FinetuneConfig` of the arguments (checked once, here)."""
    from .finetune_config import FinetuneConfig

    settings = dict(epochs=a.epochs, optimizer=a.optimizer, batchnorm=False if a.no_bn else "auto",
                    checkpoint_dir=a.checkpoint_dir, progress=sys.stderr.isatty(),
                    threads=a.threads if a.threads is not None else "auto")
    if a.lr is not None:
        settings["lr"] = a.lr
    try:
        return FinetuneConfig(**settings)
    except UsageError as e:  # name the flag, not the keyword
        flag = next((f"--{k.replace('_', '-')}" for k in settings if str(e).startswith(k + " ")), None)
        raise UsageError(str(e).replace(flag[2:].replace("-", "_"), flag, 1) if flag else str(e)) from None


def cmd_finetune(a) -> int:
    try:
        import torch
    except ImportError:
        raise UsageError("finetune needs torch: pip install 'onnx-alds[torch]'") from None
    from ..io import check_outputs
    from ..plan import Plan
    from .export import _load_checkpoint, load_factory

    out = Path(a.out)
    if out.suffix != ".onnx":
        raise UsageError(f"--out must name an .onnx file, not {a.out!r}")
    from .export import factory_file

    check_outputs(a.teacher_onnx, [("--out", out), ("--out's external data file", out.with_name(out.name + ".data"))],
                  other_inputs=[("--checkpoint", a.checkpoint), ("--plan", a.plan), ("--plan's factors file",
                                Plan.sidecar_of(a.plan)), ("--data", a.data), ("--val", a.val),
                                ("the factory's source file", factory_file(a.factory))],
                  out_dirs=[("--checkpoint-dir", a.checkpoint_dir)])
    if a.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {a.batch_size}")
    config = _config(a)
    if not Path(a.plan).is_file():
        raise UsageError(f"plan file {a.plan!r} does not exist")
    plan = Plan.load(a.plan)
    try:
        model = load_factory(a.factory)()
        if a.checkpoint:
            _load_checkpoint(model, a.checkpoint)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e).rstrip(".")) from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"factory {a.factory!r} did not return a torch.nn.Module")
    model.eval()
    _check_weights(model, "the original model" + (f" (checkpoint {a.checkpoint!r})" if a.checkpoint else ""))
    x, y = _load_npz(a.data, "--data", model)
    _check_fit(model, x, y, "--data")
    val = _load_npz(a.val, "--val", model) if a.val else None
    if val:
        _check_fit(model, *val, "--val")
    if y is None and a.no_teacher:
        raise UsageError("--data has no labels (y), so --no-teacher leaves nothing to learn from")
    torch.manual_seed(a.seed)
    train_loader = _loader(x, y, a.batch_size, True, a.seed)
    val_loader = _loader(*val, 256, False, 0) if val else None
    teacher = None if a.no_teacher else (a.teacher_onnx or "original")
    example = tuple(t[:8] for t in x) if isinstance(x, tuple) else x[:8]
    _, hist = compress_and_finetune(model, plan, train_loader, example_inputs=example, out=out, teacher=teacher,
                                    opset=a.opset, val_loader=val_loader, config=config,
                                    reconstruct=_reconstruct_samples(a.reconstruct, plan))
    if hist["rank"] == 0:
        done = len(hist["epoch"])
        last = f"train loss {hist['train_loss'][-1]:.4f}" if hist["train_loss"] else "no epochs"
        if hist.get("val_acc") and hist["val_acc"][-1] is not None:
            last += f", val acc {max(a for a in hist['val_acc'] if a is not None):.4f} (best epoch {hist['best_epoch']})"
        rec = hist.get("reconstruct")
        if rec:
            print(f"reconstructed {len(rec['blocks'])} blocks: output relative L2 {rec['held_out_before']:.4g} -> "
                  f"{rec['held_out_after']:.4g} on {rec['judged_on']}" + ("" if rec["kept"] else
                                                                         " (no better: given back)"))
        print(f"fine-tuned {done} epochs ({hist['loss']} loss, {hist['world_size']} process(es), "
              f"{hist['threads']} thread(s) each{', resumed' if hist['resumed_from'] else ''}): {last}; wrote {out}")
    return 0

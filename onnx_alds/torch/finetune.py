"""Fine-tuning that recovers a compressed network: distillation, warm-up + cosine, BatchNorm, DDP.

``finetune(student, loader, teacher=original)`` trains ``student`` in place:

* **loss**: with a ``teacher`` (the original torch module or ONNX file), the
  distillation loss of :mod:`onnx_alds.torch.distill` — KL on
  temperature-softened class scores mixed with the label loss, or a relative
  MSE / cosine match of the outputs for models whose outputs are not class
  scores; without one, cross-entropy on the labels;
* **schedule**: linear warm-up over the first ``warmup`` fraction of the
  steps, then a cosine to 0, per batch;
* **BatchNorm**: a network whose BatchNorm was folded away (every plan-built
  one) gets an identity-initialised BatchNorm after each factorized conv for
  the length of the fine-tune, its statistics recomputed for the final
  weights and folded back into the decoder at the end
  (:mod:`onnx_alds.torch.batchnorm`), so the model keeps the plan's structure;
* **validation**: with ``val_loader`` the best epoch's weights are kept and
  training stops after ``patience`` epochs without improvement;
* **threads**: on the CPU one torch thread per process for small models (see
  :func:`auto_threads`), restored afterwards;
* **torchrun**: launched by torchrun, each process joins the process group
  (gloo on the CPU, nccl on CUDA), the model is wrapped in
  DistributedDataParallel and each rank takes its share of every batch
  (:mod:`onnx_alds.torch.distributed`); metrics are summed over ranks, and
  only rank 0 logs, shows progress and writes checkpoints.

Checkpoints (``checkpoint_dir/epoch_NNNN.pt``, written atomically) hold
model, optimizer and scheduler state, the RNG states and the history; a call
resumes after the latest one. Logs through :mod:`logging` (logger
``onnx_alds.torch.finetune``) and shows tqdm bars with ``progress``; never prints.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UsageError
from ..io import atomic_write_bytes
from . import batchnorm as bn_recovery
from . import distributed as dist_util
from .modules import FactorizedConv, FactorizedLinear
from .distill import LOSSES, FeatureMatch, as_teacher, distillation_loss, flatten_outputs, is_class_target, pick_loss

__all__ = ["finetune", "evaluate", "latest_checkpoint", "auto_threads", "lr_factor", "DEFAULTS"]

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^epoch_(\d+)\.pt$")

# The defaults, measured on digits (README "PyTorch models"): ResNet20 and VGG at keep-params 0.15 come back to
# within ~1 point of the original in 4-5 epochs with a teacher.
DEFAULTS = dict(lr=0.02, warmup=0.1, alpha=0.5, temperature=2.0, feature_weight=30.0, patience=3, weight_decay=5e-4,
                momentum=0.9)
# per-sample multiply-accumulates above which a CPU fine-tune uses more than one thread
_MACS_PER_THREAD = 100e6


def _batch_xy(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets or None) of one batch."""
    if isinstance(batch, dict):
        return batch["input"], batch.get("target")
    if isinstance(batch, (list, tuple)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise TypeError("loader batches must be (inputs, targets) pairs, inputs alone, or dicts with 'input' "
                    "(and 'target').")


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(t, device) for t in x)
    return x


def _inputs(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _forward(model: nn.Module, x: Any) -> Any:
    return model(*_inputs(x))


def _outputs(out: Any) -> list[torch.Tensor]:
    return flatten_outputs(out)


def _n(x: Any) -> int:
    return int(_inputs(x)[0].shape[0])


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, *, device: str | torch.device | None = None
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy (a fraction in [0, 1]) of ``model`` over ``loader``.

    Runs in eval mode on ``device`` (default: the device of the model's
    parameters) and restores the model's training mode afterwards.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loss_sum, correct, count = _class_sums(model, loader, torch.device(device))
    if count == 0:
        raise UsageError("evaluate got an empty loader")
    return loss_sum / count, correct / count


def _class_sums(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[float, int, int]:
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = _batch_xy(batch)
                x, y = _to(x, device), y.to(device)
                logits = _outputs(_forward(model, x))[0]
                total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
                count += int(y.numel())
    finally:
        model.train(was_training)
    return total_loss, correct, count


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The ``epoch_NNNN.pt`` file with the highest epoch in ``checkpoint_dir``, or None."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return max(found)[1] if found else None


def _save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _make_optimizer(name: str, params, lr: float, weight_decay: float, momentum: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"optimizer must be 'sgd' or 'adamw', not {name!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr before optimizer step ``step`` (0-based): linear warm-up, then cosine to 0.

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then
    ``0.5 · (1 + cos(π · (step - w) / (total - w)))``, which is 0 at ``total``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def _macs_per_sample(model: nn.Module, x: Any) -> float:
    """Multiply-accumulates of the Conv/Linear layers for one sample (a forward of one sample, with hooks)."""
    total = [0.0]

    def hook(mod, _inp, out):
        if not isinstance(out, torch.Tensor) or out.dim() == 0:
            return
        per_out = mod.weight[0].numel() if isinstance(mod, nn.modules.conv._ConvNd) else mod.in_features
        total[0] += out[:1].numel() * per_out

    mods = [m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in mods]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            _forward(model, tuple(t[:1] for t in _inputs(x)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0]


def auto_threads(model: nn.Module, example: Any) -> int:
    """Torch threads for a CPU fine-tune of ``model``: ``OMP_NUM_THREADS`` when set, else one per
    ``1e8`` multiply-accumulates per sample, at least 1 and at most the cores available to this process
    (divided among torchrun's local processes).

    Why: the convolutions of small models are too short to gain from threads,
    and when other work shares the cores every parallel region waits for a
    descheduled thread (ResNet20 on digits: 41 s for 5 epochs with 1 thread,
    548 s with torch's default 2 on a busy 2-core machine).
    """
    if example is None:
        return 1
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    cores = max(1, cores // dist_util.local_world_size())
    want = int(_macs_per_sample(model, example) // _MACS_PER_THREAD)
    return max(1, min(cores, want))


CHECK_SAMPLES = 512  # training samples that judge the fine-tuned model against its start without a val_loader


def _in_order(loader: Iterable):
    """The loader's dataset unshuffled (batches of 256), so that reading it does not advance the
    training loader's shuffling generator; None unless ``loader`` is a DataLoader over a sized dataset."""
    from torch.utils.data import DataLoader

    if not (isinstance(loader, DataLoader) and hasattr(loader.dataset, "__len__") and loader.batch_size):
        return None
    return DataLoader(loader.dataset, batch_size=256, shuffle=False, collate_fn=loader.collate_fn)


def _first_batches(batches: Iterable, max_samples: int):
    """Batches until ``max_samples`` samples have been yielded."""
    seen = 0
    for batch in batches:
        yield batch
        seen += _n(_batch_xy(batch)[0])
        if seen >= max_samples:
            return


def _check_batches(loader: Iterable, max_samples: int = CHECK_SAMPLES) -> list | None:
    """A fixed list of up to ``max_samples`` training samples in the dataset's order (drawn once, so a
    randomly augmented dataset scores start and end on the same images); None where the loader may not
    be read twice (see :func:`_in_order`)."""
    src = _in_order(loader)
    if src is None:
        return None
    state = torch.get_rng_state()  # drawing augmented samples must not move the training run's RNG
    try:
        return list(_first_batches(src, max_samples)) or None
    finally:
        torch.set_rng_state(state)


def _calibration_inputs(loader: Iterable, device: torch.device, max_samples: int = 1024):
    """Up to ``max_samples`` inputs, in the dataset's order where the loader is a DataLoader (so that the
    training loader's shuffling generator is not advanced)."""
    src = _in_order(loader)
    for batch in _first_batches(loader if src is None else src, max_samples):
        yield _to(_batch_xy(batch)[0], device)


class _Loss:
    """The training loss of one batch, and the kind chosen (see the module docstring)."""

    def __init__(self, teacher, kind: str, alpha: float, temperature: float, label_smoothing: float,
                 features: FeatureMatch | None = None, feature_weight: float = 0.0):
        self.teacher, self.kind = teacher, kind
        self.features, self.feature_weight = features, feature_weight
        self.alpha, self.temperature, self.label_smoothing = alpha, temperature, label_smoothing
        self.chosen: str | None = None

    def __call__(self, outs: list[torch.Tensor], x: Any, y: Any) -> torch.Tensor:
        if self.teacher is None:
            if y is None:
                raise UsageError("without a teacher the loader must give targets")
            if is_class_target(y, outs[0]):
                self.chosen = "ce"
                return nn.functional.cross_entropy(outs[0], y, label_smoothing=self.label_smoothing)
            self.chosen = "mse"
            return nn.functional.mse_loss(outs[0].float(), y.float())
        t_outs = self.teacher(*_inputs(x))
        if self.chosen is None:
            self.chosen = pick_loss(self.kind, outs, y)
        loss = distillation_loss(outs, t_outs, y, kind=self.chosen, alpha=self.alpha,
                                 temperature=self.temperature, label_smoothing=self.label_smoothing)
        if self.features is not None:
            loss = loss + self.feature_weight * self.features.loss()
        return loss


def _val_sums(model, loader, device, loss: _Loss) -> list[float]:
    """[loss sum, correct, count, class-scored samples] over this rank's share of ``loader``."""
    was_training = model.training
    model.eval()
    s = [0.0, 0.0, 0.0, 0.0]
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = _batch_xy(batch)
                x, y = _to(x, device), (y.to(device) if isinstance(y, torch.Tensor) else y)
                outs = _outputs(_forward(model, x))
                n = _n(x)
                if is_class_target(y, outs[0]):
                    s[0] += float(nn.functional.cross_entropy(outs[0], y, reduction="sum"))
                    s[1] += int((outs[0].argmax(dim=1) == y).sum())
                    s[3] += n
                else:
                    s[0] += float(loss(outs, x, y)) * n
                s[2] += n
    finally:
        model.train(was_training)
    return s


def _validate(model, batches, device, loss: "_Loss", ctx=None) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) on ``batches``, summed over the ranks with ``ctx``."""
    v = _val_sums(model, batches, device, loss)
    if ctx is not None:
        v = dist_util.all_sum(ctx, v)
    if v[2] == 0:
        raise UsageError("val_loader is empty")
    return v[0] / v[2], (v[1] / v[3] if v[3] else None)


def _snapshot(model) -> dict:
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


def _score(val_loss: float, val_acc: float | None) -> tuple:
    """Higher is better: accuracy first (when there is one), then the loss."""
    return (val_acc if val_acc is not None else 0.0, -val_loss)


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    epochs: int = 5,
    *,
    val_loader: Iterable | None = None,
    teacher: Any = None,
    distill_loss: str = "auto",
    alpha: float = DEFAULTS["alpha"],
    temperature: float = DEFAULTS["temperature"],
    feature_weight: float | str = "auto",
    lr: float = DEFAULTS["lr"],
    warmup: float = DEFAULTS["warmup"],
    optimizer: str = "sgd",
    weight_decay: float = DEFAULTS["weight_decay"],
    momentum: float = DEFAULTS["momentum"],
    label_smoothing: float = 0.0,
    batchnorm: bool | str = "auto",
    patience: int | None = DEFAULTS["patience"],
    restore_best: bool = True,
    threads: int | str | None = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    device: str | torch.device | None = None,
    distributed: bool | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` in place for up to ``epochs`` epochs; return the history.

    Arguments (see the module docstring for what each part does):

    * ``teacher``: the original model — an ``nn.Module``, an ONNX path or
      ``onnx.ModelProto`` or ``onnxruntime.InferenceSession``, or a callable;
      ``distill_loss`` ``"auto"`` (KL for class scores with integer labels or
      no labels, else ``"mse"``), ``"kl"``, ``"mse"`` or ``"cosine"``;
      ``alpha`` the weight of the teacher term, ``temperature`` the KL's T.
      Batches may then be inputs alone (no labels): the teacher is the target.
    * ``feature_weight``: weight of the feature matching at the factorized
      layers (:class:`~onnx_alds.torch.distill.FeatureMatch`); ``"auto"`` is
      30 when the teacher is a torch module and the student has factorized
      layers, else 0 (it needs the teacher's modules).
    * ``lr``, ``warmup`` (fraction of all steps for the linear warm-up; 0 for
      none), ``optimizer`` (``"sgd"`` with Nesterov momentum, or ``"adamw"``),
      ``weight_decay``, ``momentum``, ``label_smoothing``.
    * ``batchnorm``: ``"auto"`` inserts BatchNorm when the model has
      factorized convolutions and no BatchNorm; True always (where there are
      factorized convolutions), False never. Inserted ones are folded back
      at the end.
    * ``patience``: with ``val_loader``, stop after this many epochs without
      a better validation score (accuracy, then loss); None never stops.
      With ``restore_best`` (default) the best epoch's weights are restored
      at the end, the starting weights counting as epoch 0 (so a fine-tune
      that only hurts on the validation data gives the start back); False
      keeps the last epoch's (for a ``val_loader`` that is only reported on,
      such as a test split).
    * ``threads``: ``"auto"`` (:func:`auto_threads`, on the CPU only), an
      int, or None to leave torch's setting alone. Restored on return.
    * ``checkpoint_dir``, ``resume``: per-epoch checkpoints and resuming after
      the latest one (an early-stopped run stays stopped).
    * ``device``: default CUDA (``cuda:LOCAL_RANK`` under torchrun) when
      available, else the CPU. ``distributed``: None follows torchrun's
      environment, False ignores it.

    History: ``epoch``, ``train_loss``, ``train_acc`` (None without class
    labels), ``lr``, ``epoch_time_s``, ``val_loss``/``val_acc`` (with
    ``val_loader``), and ``start`` (the starting weights' ``val_loss`` and
    ``val_acc``), ``start_epoch``, ``resumed_from``, ``best_epoch`` (0: the start),
    ``stopped_early``, ``loss`` (the loss used: ``ce``, ``mse``, ``kl``,
    ``cosine``), ``batchnorm_inserted``, ``threads``, ``world_size``, ``rank``.
    """
    if epochs < 0:
        raise UsageError("epochs must be 0 or more")
    if lr <= 0 or not 0.0 <= warmup < 1.0 or not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise UsageError("lr and temperature must be positive, warmup in [0, 1) and alpha in [0, 1]")
    if patience is not None and patience < 1:
        raise UsageError("patience must be at least 1, or None")
    if teacher is model:
        raise UsageError("the teacher must be the original model, not the one being fine-tuned")
    if str(optimizer).lower() not in ("sgd", "adamw"):
        raise UsageError(f"optimizer must be 'sgd' or 'adamw', not {optimizer!r}")
    if not (batchnorm is True or batchnorm is False or batchnorm == "auto"):
        raise UsageError(f"batchnorm must be 'auto', True or False, not {batchnorm!r}")
    if distill_loss != "auto" and distill_loss not in LOSSES:
        raise UsageError(f"distill_loss must be 'auto' or one of {', '.join(LOSSES)}, not {distill_loss!r}")
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise UsageError("train_loader must have a length (a DataLoader or a list of batches)") from None
    if steps_per_epoch == 0:
        raise UsageError("train_loader is empty")
    dev = dist_util.pick_device(device)
    model.to(dev)
    threads_before = torch.get_num_threads()
    n_threads = threads_before
    if threads == "auto":
        if dev.type == "cpu":
            n_threads = auto_threads(model, next(_calibration_inputs(train_loader, dev, 1), None))
    elif threads is not None:
        n_threads = int(threads)
    if threads is not None:  # set even when equal: it also sets the OpenMP/oneDNN pools torch's default leaves
        torch.set_num_threads(n_threads)
    ctx = dist_util.setup(dev, distributed)
    try:
        o = SimpleNamespace(epochs=epochs, distill_loss=distill_loss, alpha=alpha, temperature=temperature,
                            feature_weight=feature_weight, lr=lr, warmup=warmup, optimizer=optimizer,
                            weight_decay=weight_decay, momentum=momentum, label_smoothing=label_smoothing,
                            batchnorm=batchnorm, patience=patience, restore_best=restore_best,
                            checkpoint_dir=checkpoint_dir, resume=resume,
                            progress=progress, threads=n_threads)
        return _finetune(model, train_loader, val_loader, teacher, o, dev, ctx)
    finally:
        dist_util.teardown(ctx)
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)


def _finetune(model, train_loader, val_loader, teacher, o, dev, ctx) -> dict[str, Any]:
    with contextlib.ExitStack() as cleanup:
        return _run(model, train_loader, val_loader, teacher, o, dev, ctx, cleanup)


def _run(model, train_loader, val_loader, teacher, o, dev, ctx, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    main = ctx.is_main
    epochs, patience = o.epochs, o.patience
    cleanup.callback(model.eval)
    inserted = 0
    if o.batchnorm is True or (o.batchnorm == "auto" and bn_recovery.needs_batchnorm(model)):
        inserted = bn_recovery.insert(model, _calibration_inputs(train_loader, dev), _forward)
        # back to the plan's structure at the end, also when training fails or is interrupted
        cleanup.callback(bn_recovery.fold, model)
        if inserted and main:
            log.info("BatchNorm inserted after %d factorized convolutions for the fine-tune", inserted)
    features = None
    feature_weight = o.feature_weight
    if feature_weight == "auto":
        feature_weight = DEFAULTS["feature_weight"] if isinstance(teacher, nn.Module) and any(
            isinstance(m, (FactorizedConv, FactorizedLinear)) for m in model.modules()) else 0.0
    if feature_weight:
        if not isinstance(teacher, nn.Module):
            raise UsageError("feature_weight needs the original torch module as the teacher")
        from .export import fold_batchnorm

        # the plan's layers are the BN-folded ones: match against those
        teacher = fold_batchnorm(teacher, next(_calibration_inputs(train_loader, dev, 1))).to(dev)
        features = FeatureMatch(model, teacher)
        cleanup.callback(features.remove)
    loss_fn = _Loss(as_teacher(teacher), o.distill_loss, o.alpha, o.temperature, o.label_smoothing, features,
                    feature_weight)
    train_batches = dist_util.shard_loader(train_loader, ctx, train=True)
    val_batches = dist_util.shard_loader(val_loader, ctx, train=False)
    steps_per_epoch = len(train_batches)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(o.optimizer, params, o.lr, o.weight_decay, o.momentum)
    total_steps = max(1, epochs * steps_per_epoch)
    warmup_steps = int(round(o.warmup * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total_steps, warmup_steps))

    history: dict[str, Any] = {"epoch": [], "train_loss": [], "train_acc": [], "lr": [], "epoch_time_s": []}
    if val_loader is not None:
        history["val_loss"], history["val_acc"] = [], []
    start_epoch, resumed_from = 0, None
    best: dict[str, Any] = {"score": None, "epoch": None, "state": None, "bad_epochs": 0, "stopped": False}
    ckpt_dir = Path(o.checkpoint_dir) if o.checkpoint_dir is not None else None
    generator = getattr(train_loader, "generator", None)

    if ckpt_dir is not None and o.resume:
        last = latest_checkpoint(ckpt_dir)
        if last is not None:
            state = torch.load(last, map_location=dev, weights_only=True)
            try:
                model.load_state_dict(state["model"])
            except RuntimeError:
                raise UsageError(f"the checkpoint {str(last)!r} holds another model or plan; give a fresh "
                                 f"checkpoint directory") from None
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            start_epoch = int(state["epoch"])
            stored = state.get("history") or {}
            for k in history:
                history[k] = list(stored.get(k, []))
            if state.get("best") is not None:
                best.update(state["best"])
            if state.get("epochs") not in (None, epochs) and main:
                log.warning("resuming %s, written for %s epochs, with epochs=%d: the schedule is the new one",
                            last, state.get("epochs"), epochs)
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"].cpu())
            if generator is not None and state.get("loader_rng") is not None:
                generator.set_state(state["loader_rng"].cpu())
            resumed_from = str(last)
            if main:
                log.info("resumed from %s (epoch %d)", last, start_epoch)

    net: nn.Module = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        with torch.no_grad():  # DDP's buckets assume canonical strides (numpy-made ones differ on size-1 axes)
            for p in model.parameters():
                if p.stride() != torch.empty_like(p, memory_format=torch.contiguous_format).stride():
                    p.data = p.data.clone(memory_format=torch.contiguous_format)
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    val_start = None
    if val_loader is not None and start_epoch == 0 and epochs > 0:
        # the starting weights compete too: a fine-tune that only makes the model worse on the
        # validation data gives the start back (best_epoch 0) instead of its last epoch
        vl, va = _validate(model, val_batches, dev, loss_fn, ctx)
        val_start = {"val_loss": vl, "val_acc": va}
        best.update(score=list(_score(vl, va)), epoch=0, state=_snapshot(model))
    # without a validation loader, a fixed slice of the training data judges start against end
    check = _check_batches(train_loader) if val_loader is None and start_epoch == 0 and epochs > 0 else None
    start_check = None
    if check:  # the same samples on every rank: no sum over ranks, the same decision everywhere
        start_check = (_score(*_validate(model, check, dev, loss_fn)), _snapshot(model))
    for epoch in range(start_epoch, epochs):
        if best["stopped"]:
            break
        t0 = time.perf_counter()
        net.train()
        loss_sum, correct, seen, scored = 0.0, 0, 0, 0
        bar = tqdm(train_batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not (o.progress and main),
                   total=steps_per_epoch)
        for batch in bar:
            x, y = _batch_xy(batch)
            x, y = _to(x, dev), (y.to(dev) if isinstance(y, torch.Tensor) else y)
            outs = _outputs(_forward(net, x))
            loss = loss_fn(outs, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            n = _n(x)
            loss_sum += float(loss.detach()) * n
            seen += n
            if is_class_target(y, outs[0]):
                correct += int((outs[0].detach().argmax(dim=1) == y).sum())
                scored += n
            if o.progress and main:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        bar.close()
        loss_sum, correct, seen, scored = dist_util.all_sum(ctx, [loss_sum, correct, seen, scored])
        train_acc = correct / scored if scored else None
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(loss_sum / seen)
        history["train_acc"].append(train_acc)
        history["lr"].append(opt.param_groups[0]["lr"])
        msg = f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / seen:.4f}"
        msg += f" acc {train_acc:.4f}" if train_acc is not None else ""
        if val_loader is not None:
            vl, va = _validate(model, val_batches, dev, loss_fn, ctx)
            history["val_loss"].append(vl)
            history["val_acc"].append(va)
            msg += f", val loss {vl:.4f}" + (f" acc {va:.4f}" if va is not None else "")
            score = _score(vl, va)
            if best["score"] is None or tuple(score) > tuple(best["score"]):
                best.update(score=list(score), epoch=epoch + 1, bad_epochs=0, state=_snapshot(model))
            else:
                best["bad_epochs"] += 1
                if patience is not None and best["bad_epochs"] >= patience and epoch + 1 < epochs:
                    best["stopped"] = True
                    msg += f"; no better for {patience} epochs: stopping, best epoch {best['epoch']}"
        history["epoch_time_s"].append(time.perf_counter() - t0)
        if main:
            log.info(msg)
        if ckpt_dir is not None and main:
            _save(
                {
                    "epoch": epoch + 1,
                    "epochs": epochs,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "history": history,
                    "best": best,
                    "torch_rng": torch.get_rng_state(),
                    "loader_rng": generator.get_state() if generator is not None else None,
                    "world_size": ctx.world_size,
                },
                ckpt_dir / f"epoch_{epoch + 1:04d}.pt",
            )

    if o.restore_best and best["state"] is not None and best["epoch"] != (history["epoch"][-1] if history["epoch"]
                                                                            else None):
        model.load_state_dict(best["state"])
        if main:
            log.info("restored the weights of epoch %d, the best on the validation data", best["epoch"])
    gave_start_back = o.restore_best and best["epoch"] == 0
    if inserted and history["epoch"] and not gave_start_back:
        # the folded model gets the exact statistics of its final weights, not the running average
        # (the starting weights' BatchNorms are the identity already)
        bn_recovery.recalibrate(model, _calibration_inputs(train_loader, dev), _forward)
    kept_start = False
    if start_check is not None:
        if _score(*_validate(model, check, dev, loss_fn)) < start_check[0]:
            model.load_state_dict(start_check[1])
            kept_start = True
            if main:
                log.warning("the fine-tuned model scores worse than the starting one on training samples; "
                            "the starting weights are kept (try more epochs or a lower lr)")
    ctx.barrier()  # rank 0's last checkpoint is on disk before any rank goes on
    out = dict(history)
    out.update(start_epoch=start_epoch, resumed_from=resumed_from, best_epoch=best["epoch"], start=val_start,
               kept_start=kept_start,
               stopped_early=bool(best["stopped"]), loss=loss_fn.chosen, batchnorm_inserted=inserted,
               threads=o.threads, world_size=ctx.world_size, rank=ctx.rank)
    return out

"""Fine-tuning that recovers a compressed network: distillation, warm-up + cosine, BatchNorm, DDP.

``finetune(student, loader, teacher=original)`` trains ``student`` in place:

* **loss**: with a ``teacher`` (the original torch module or ONNX file), the
  distillation loss of :mod:`onnx_alds.torch.distill` — KL on
  temperature-softened class scores (by default alone: ``alpha=1``; a smaller
  ``alpha`` mixes in the label loss), or a relative MSE / cosine match of the
  outputs for models whose outputs are not class scores; without one,
  cross-entropy on the labels;
* **schedule**: linear warm-up over the first ``warmup`` fraction of the
  steps, then a cosine to 0, per batch;
* **stability**: the gradient's norm is clipped to ``max_grad_norm`` (the
  feature-matching term's gradients on networks without BatchNorm, MLPs
  and transformers, are large enough to turn SGD's weights into NaN within
  an epoch; docs/finetune.md); an epoch whose loss still becomes NaN or
  inf starts again from its starting weights at half the learning rate;
* **safety net**: without ``val_loader``, the end is judged against the
  start on a fixed slice of training samples (class accuracy, a tie
  keeps the end; else the output match to the teacher, without the
  feature term) and the start is given back when the end is worse;
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

Where each part lives: :mod:`.finetune_config` (``FinetuneConfig``, every
setting, checked once), :mod:`.finetune_data` (batches, the check slice,
value checks), :mod:`.finetune_state` (optimizer, schedule, best epoch,
checkpoints), :mod:`.finetune_loop` (prepare, epochs, finish); this module
is the public entry point.

Checkpoints (``checkpoint_dir/epoch_NNNN.pt``, written atomically) hold
model, optimizer and scheduler state, the RNG states and the history; a call
resumes after the latest one. Logs through :mod:`logging` (logger
``onnx_alds.torch.finetune``) and shows tqdm bars with ``progress``; never prints.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UsageError
from . import distributed as dist_util
from .finetune_config import DEFAULTS, FinetuneConfig, config_from
from .distill import flatten_outputs
from .finetune_data import batch_xy, calibration_inputs, forward, inputs_of, to_device
from .finetune_loop import run
from .finetune_state import latest_checkpoint, lr_factor
from .scratch import private_inductor_cache

__all__ = ["finetune", "FinetuneConfig", "evaluate", "latest_checkpoint", "auto_threads", "lr_factor", "DEFAULTS"]

log = logging.getLogger(__name__)

# per-sample multiply-accumulates above which a CPU fine-tune uses more than one thread
_MACS_PER_THREAD = 100e6


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
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for batch in loader:
            x, y = batch_xy(batch)
            x, y = to_device(x, device), y.to(device)
            logits = flatten_outputs(forward(model, x))[0]
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            count += int(y.numel())
    finally:
        model.train(was_training)
    if count == 0:
        raise UsageError("evaluate got an empty loader")
    return total_loss / count, correct / count


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
            forward(model, tuple(t[:1] for t in inputs_of(x)))
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


def _check_model(model: nn.Module, train_loader: Iterable, teacher: Any) -> None:
    try:
        steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        raise UsageError("train_loader must have a length (a DataLoader or a list of batches)") from None
    if steps_per_epoch == 0:
        raise UsageError("train_loader is empty")
    if teacher is model:
        raise UsageError("the teacher must be the original model, not the one being fine-tuned")
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UsageError(f"the model to fine-tune holds NaN or inf values in {name!r} (a bad plan or "
                             f"factors file?); training cannot recover from them")


def _threads(cfg: FinetuneConfig, model: nn.Module, train_loader: Iterable, dev: torch.device) -> int | None:
    """The torch thread count the fine-tune runs with, or None to leave torch's setting alone."""
    if cfg.threads == "auto":
        if dev.type != "cpu":
            return torch.get_num_threads()
        return auto_threads(model, next(calibration_inputs(train_loader, dev, 1), None))
    return cfg.threads


def finetune(
    model: nn.Module,
    train_loader: Iterable,
    epochs: int | None = None,
    *,
    val_loader: Iterable | None = None,
    teacher: Any = None,
    config: FinetuneConfig | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train ``model`` in place for up to ``epochs`` epochs; return the history.

    The settings are the fields of :class:`FinetuneConfig`, given as
    keywords or whole as ``config=`` (keywords then override its fields);
    they are checked once, and a bad one is a
    :class:`~onnx_alds.errors.UsageError` naming it. ``epochs`` defaults to
    the config's (5).

    Settings (see the module docstring for what each part does):

    * ``teacher``: the original model — an ``nn.Module``, an ONNX path or
      ``onnx.ModelProto`` or ``onnxruntime.InferenceSession``, or a callable;
      ``distill_loss`` ``"auto"`` (KL for class scores with integer labels or
      no labels, else ``"mse"``), ``"kl"``, ``"mse"`` or ``"cosine"``;
      ``alpha`` the weight of the teacher term, ``temperature`` the KL's T.
      Batches may then be inputs alone (no labels): the teacher is the target.
    * ``feature_weight``: weight of the feature matching at the factorized
      layers (:class:`~onnx_alds.torch.distill.FeatureMatch`); ``"auto"`` is
      30 when the teacher is a torch module, at every factorized convolution
      and at every factorized Linear whose factors came from its weights
      alone (not from a data-aware plan's sidecar:
      :func:`~onnx_alds.torch.finetune_loop.feature_matched`); 0 where
      no layer qualifies or the teacher is not a torch module (it needs the
      teacher's modules). A number matches every factorized layer.
    * ``lr``, ``warmup`` (fraction of all steps for the linear warm-up; 0 for
      none), ``optimizer`` (``"sgd"`` with Nesterov momentum, or ``"adamw"``),
      ``weight_decay``, ``momentum``, ``label_smoothing``, ``max_grad_norm``
      (clip the gradient's total norm; None never clips).
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
    if epochs is not None:
        settings["epochs"] = epochs
    cfg = config_from(config, settings)
    _check_model(model, train_loader, teacher)
    dev = dist_util.pick_device(cfg.device)
    model.to(dev)
    threads_before = torch.get_num_threads()
    n_threads = _threads(cfg, model, train_loader, dev)
    if n_threads is not None:  # set even when equal: it also sets the OpenMP/oneDNN pools torch's default leaves
        torch.set_num_threads(n_threads)
    ctx = dist_util.setup(dev, cfg.distributed)
    try:
        with private_inductor_cache():  # torch.optim imports torch._dynamo, which makes $TMPDIR/torchinductor_<user>
            return run(model, train_loader, val_loader, teacher, cfg, dev, ctx,
                       n_threads if n_threads is not None else threads_before)
    finally:
        dist_util.teardown(ctx)
        if torch.get_num_threads() != threads_before:
            torch.set_num_threads(threads_before)

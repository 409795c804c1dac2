"""Batches of a fine-tune: what a batch is, moving it, reading a loader without disturbing its shuffling,
and checking its values before they are trained on."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["batch_xy", "to_device", "inputs_of", "forward", "batch_size", "in_order", "first_batches",
           "check_batches", "calibration_inputs", "check_finite_inputs", "check_class_targets"]

CHECK_SAMPLES = 512  # training samples that judge the fine-tuned model against its start without a val_loader


def batch_xy(batch: Any) -> tuple[Any, Any]:
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


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(t, device) for t in x)
    return x


def inputs_of(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def forward(model: nn.Module, x: Any) -> Any:
    return model(*inputs_of(x))


def batch_size(x: Any) -> int:
    return int(inputs_of(x)[0].shape[0])


def in_order(loader: Iterable):
    """The loader's dataset unshuffled (batches of 256), so that reading it does not advance the
    training loader's shuffling generator; None unless ``loader`` is a DataLoader over a sized dataset."""
    from torch.utils.data import DataLoader

    if not (isinstance(loader, DataLoader) and hasattr(loader.dataset, "__len__") and loader.batch_size):
        return None
    return DataLoader(loader.dataset, batch_size=256, shuffle=False, collate_fn=loader.collate_fn)


def first_batches(batches: Iterable, max_samples: int):
    """Batches until ``max_samples`` samples have been yielded."""
    seen = 0
    for batch in batches:
        yield batch
        seen += batch_size(batch_xy(batch)[0])
        if seen >= max_samples:
            return


def check_batches(loader: Iterable, max_samples: int = CHECK_SAMPLES) -> list | None:
    """A fixed list of up to ``max_samples`` training samples in the dataset's order (drawn once, so a
    randomly augmented dataset scores start and end on the same images); None where the loader may not
    be read twice (see :func:`in_order`)."""
    src = in_order(loader)
    if src is None:
        return None
    state = torch.get_rng_state()  # drawing augmented samples must not move the training run's RNG
    try:
        return list(first_batches(src, max_samples)) or None
    finally:
        torch.set_rng_state(state)


def calibration_inputs(loader: Iterable, device: torch.device, max_samples: int = 1024):
    """Up to ``max_samples`` inputs, in the dataset's order where the loader is a DataLoader (so that the
    training loader's shuffling generator is not advanced)."""
    src = in_order(loader)
    for batch in first_batches(loader if src is None else src, max_samples):
        yield to_device(batch_xy(batch)[0], device)


def check_finite_inputs(x: Any, y: Any) -> None:
    """One sentence when a floating-point input or target of a batch holds NaN or inf: one such value
    turns every weight it reaches into NaN within a step."""
    for what, t in [("inputs", v) for v in inputs_of(x)] + [("targets", y)]:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UsageError(f"the training {what} hold NaN or inf values; clean the data before fine-tuning")


def check_class_targets(y: torch.Tensor, scores: torch.Tensor) -> None:
    """One sentence when integer labels fall outside the model's ``scores.shape[1]`` classes."""
    classes = scores.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise UsageError(f"the labels must be class indices from 0 to {classes - 1} (the model has {classes} "
                         f"class scores), but the data holds the label {bad}")

"""Seeded inputs for a session: what validation, benchmarks and every timing run feed a model
when the user gave no data."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError, ValidationFailed
from ..runtime import MAX_INPUT_BYTES

ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def fixed_batch(first_dims) -> int | None:
    """The batch a model fixes, from the first axis of each of its inputs (scalars left out): that
    size where every input fixes the same one; None where any input leaves its first axis dynamic
    (the batch is the caller's) or where they fix different sizes (the first axis is then no batch:
    a recurrent state's ``[1, 1, 128]`` beside an audio input's ``[sequence, 576]``)."""
    sizes = set()
    for d in first_dims:
        if not is_fixed(d):
            return None
        sizes.add(d)
    return sizes.pop() if len(sizes) == 1 else None


def is_fixed(dim) -> bool:
    """A size a model declares (not a ``dim_param``, an unknown or a 0)."""
    return isinstance(dim, int) and dim > 0


def session_fixed_batch(sess) -> int | None:
    """:func:`fixed_batch` of an onnxruntime session's inputs."""
    return fixed_batch(i.shape[0] for i in sess.get_inputs() if i.shape)


def random_inputs(sess, input_shapes: dict[str, list] | None = None, *, batch: int = 2, seed: int = 0,
                  default_dim: int = 32) -> dict[str, np.ndarray]:
    """Seeded inputs for every model input: dynamic batch → ``batch``, other
    dynamic sizes from ``input_shapes`` or ``default_dim``.  A named dynamic size
    (``dim_param``) takes one value wherever it appears, so that a state
    ``[2, batch, 128]`` gets the batch its audio input ``[batch, sequence]`` has."""
    rng = np.random.default_rng(seed)
    specs, total = [], 0
    named: dict[str, int] = {}  # dim_param → the size it was given first
    for inp in sess.get_inputs():  # the batch's names first: axis 0 of any input
        if inp.shape and isinstance(inp.shape[0], str) and inp.shape[0]:
            named.setdefault(inp.shape[0], batch)
    for inp in sess.get_inputs():
        given = (input_shapes or {}).get(inp.name)
        dims = []
        for axis, d in enumerate(inp.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif axis == 0:
                dims.append(batch)
            elif given is not None and axis < len(given) and isinstance(given[axis], int):
                dims.append(given[axis])
            elif isinstance(d, str) and d in named:
                dims.append(named[d])
            else:
                dims.append(default_dim)
            if isinstance(d, str) and d:
                named.setdefault(d, dims[-1])
        dtype = ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise ValidationFailed(f"input {inp.name!r} has type {inp.type}, which validation cannot generate")
        total += int(np.prod(dims, dtype=object)) * np.dtype(dtype).itemsize
        specs.append((inp.name, dims, dtype))
    if total > MAX_INPUT_BYTES:  # refuse before allocating
        raise UsageError(f"the inputs at shapes {', '.join(f'{n}:{d}' for n, d, _ in specs)} would take "
                         f"{total / 2**30:.1f} GiB, over the {MAX_INPUT_BYTES >> 30} GiB limit; "
                         f"give smaller shapes with --input-shape")
    feeds = {}
    for name, dims, dtype in specs:
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[name] = rng.integers(0, 2, dims).astype(bool)
        else:
            feeds[name] = rng.integers(0, 2, dims).astype(dtype)
    return feeds

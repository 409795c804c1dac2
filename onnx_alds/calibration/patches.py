"""Patch arithmetic: the columns X that a layer's folded weight multiplies.

For a Conv with weight ``W`` (``f × c × κ1 × κ2``) folded as ``Wm = W.reshape(f, d)``
(scheme s0, ``d = c·κ1·κ2``), a patch ``x`` is the zero-padded input window of
one output position, taken with the Conv's strides and dilations and
flattened in the order (channel, kernel row, kernel col) — for a 3-D conv
(channel, κt, κh, κw), which is the order of its folded weight too — so that the conv
output there is ``Wm @ x`` and channel group i of k owns the columns
``[i·d/k, (i+1)·d/k)``.  A Gemm/MatMul patch is one row of its input reshaped
to ``(-1, c)``.

A ConvTranspose (weight stored ``c × f × κ1 × κ2``, ``weight4 = Wᵀ`` is
``f × c × κ1 × κ2``) is the adjoint of a conv: per axis,
``y[o] = Σ_{i,κ} x[i]·W[κ]`` over ``o = i·s + κ·dil − p_begin``.  With ``u`` the
input with ``s − 1`` zeros inserted between samples (``u[i·s] = x[i]``), padded
by ``(κ−1)·dil − p_begin`` before and ``(κ−1)·dil − p_end + output_padding``
after (a negative pad crops), this is ``y[o] = Σ_κ W[κ]·u[o + (κ_max − κ)·dil]``:
a stride-1 conv over ``u`` with the kernel reversed.  Its patch is therefore
the window of ``u`` at ``o`` with the kernel axes reversed, and the output is
``fold_s0(weight4) @ x`` again, exactly.

Patches come in float64 row blocks of bounded size (float32 where the caller asks: the sequential
sweep's products, summed into float64 block by block).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from math import prod

import numpy as np

from ..ops.base import Tap

# rows of float64 patches per chunk: no temporary of the accumulation exceeds this
CHUNK_BYTES = 128 << 20


def conv_pads(tap: Tap, size: tuple[int, ...]) -> tuple[int, ...]:
    """(begin of each axis, end of each axis) for an input of spatial ``size`` (auto_pad as in ONNX Conv)."""
    m = len(size)
    if tap.auto_pad == "VALID":
        return (0,) * 2 * m
    if tap.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(tap.pads)
    begin, end = [], []
    for a in range(m):
        k, s, dil = tap.kernel[a], tap.strides[a], tap.dilations[a]
        out = -(-size[a] // s)
        total = max((out - 1) * s + (k - 1) * dil + 1 - size[a], 0)
        small, big = total // 2, total - total // 2
        b, e = (small, big) if tap.auto_pad == "SAME_UPPER" else (big, small)
        begin.append(b)
        end.append(e)
    return tuple(begin) + tuple(end)


def iter_patches(x: np.ndarray, tap: Tap, chunk_bytes: int = CHUNK_BYTES,
                 dtype=np.float64) -> Iterator[np.ndarray]:
    """The patches of activation ``x`` as row blocks (rows × d) of ``dtype``, each at
    most ``chunk_bytes`` (or one output line); rows in the order of the output
    positions (sample, then each output axis in turn).  Every block is a new array,
    never a view of ``x``: callers may change it in place."""
    size = np.dtype(dtype).itemsize
    if tap.kind == "linear":
        c = x.shape[-1]
        if tap.channels and c != tap.channels:
            raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has {c} features, not {tap.channels}")
        rows = x.reshape(-1, c)
        step = max(1, chunk_bytes // (size * c))
        for i in range(0, len(rows), step):
            yield rows[i : i + step].astype(dtype)
        return
    if tap.kind == "convtranspose":
        yield from _transposed_patches(x, tap, chunk_bytes, dtype)
        return
    if tap.kind != "conv":
        raise ValueError(f"tap {tap.name!r} has kind {tap.kind!r} (conv, convtranspose or linear)")
    if x.ndim != 2 + tap.spatial_rank:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has rank {x.ndim}, "
                         f"not {2 + tap.spatial_rank} for a {tap.spatial_rank}-D conv")
    if tap.spatial_rank == 1:  # the 2-D form, axis 2 of size 1 (the tap's kernel, strides and pads have it too)
        x = x[..., None]
    n, c, sp = x.shape[0], x.shape[1], x.shape[2:]
    m = len(sp)
    if tap.channels and c != tap.channels:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has {c} channels, not {tap.channels}")
    kernel, strides, dil = tap.kernel[:m], tap.strides[:m], tap.dilations[:m]
    pads = conv_pads(tap, sp)
    begin, end = pads[:m], pads[m:]
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil))
    out = tuple((sp[a] + begin[a] + end[a] - span[a]) // strides[a] + 1 for a in range(m))
    if min(out) < 1:
        raise ValueError(f"tap {tap.name!r}: input {'×'.join(map(str, sp))} is smaller than the padded kernel")
    d = c * prod(kernel)
    max_rows = max(1, chunk_bytes // (size * d))
    if prod(out) <= max_rows:  # several samples per chunk
        samples, lines = max_rows // prod(out), out[0]
    else:  # one sample, a few slices of the first output axis per chunk
        samples, lines = 1, max(1, max_rows // prod(out[1:]))
    axes = tuple(range(2, 2 + m))
    for i in range(0, n, samples):
        xp = x[i : i + samples]
        if any(pads):
            xp = np.pad(xp, ((0, 0), (0, 0)) + tuple(zip(begin, end)))
        # (n', c, *out, *kernel), a view: the window of output position o starts at o·stride on each axis
        win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=axes)
        win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                  + tuple(slice(None, None, g) for g in dil)]
        win = win[(slice(None), slice(None)) + tuple(slice(0, o) for o in out)]
        win = win.transpose((0,) + axes + (1,) + tuple(range(2 + m, 2 + 2 * m)))
        for r in range(0, out[0], lines):
            yield np.array(win[:, r : r + lines], dtype=dtype, order="C").reshape(-1, d)  # a copy, always


def upsampled(x: np.ndarray, tap: Tap) -> np.ndarray:
    """The input ``u`` of the stride-1 conv that a ConvTranspose is (module
    docstring): zeros inserted at the strides, then padded or cropped, on each spatial axis."""
    m = x.ndim - 2
    kernel, strides, dil, out_pad = tap.kernel, tap.strides, tap.dilations, tap.output_padding
    begin_pad, end_pad = tap.pads[:m], tap.pads[m:]
    before = [(kernel[a] - 1) * dil[a] - begin_pad[a] for a in range(m)]
    after = [(kernel[a] - 1) * dil[a] - end_pad[a] + out_pad[a] for a in range(m)]
    size = [(x.shape[2 + a] - 1) * strides[a] + 1 for a in range(m)]
    full = [max(before[a], 0) + size[a] + max(after[a], 0) for a in range(m)]
    u = np.zeros(x.shape[:2] + tuple(full), dtype=x.dtype)
    u[(slice(None), slice(None)) + tuple(slice(max(before[a], 0), max(before[a], 0) + size[a], strides[a])
                                         for a in range(m))] = x
    return u[(slice(None), slice(None)) + tuple(slice(max(-before[a], 0), full[a] - max(-after[a], 0))
                                                for a in range(m))]


def _transposed_patches(x: np.ndarray, tap: Tap, chunk_bytes: int, dtype=np.float64) -> Iterator[np.ndarray]:
    """ConvTranspose patches: windows of ``upsampled(x)`` (stride 1, no pads),
    kernel axes reversed (module docstring)."""
    m = tap.spatial_rank
    if tap.auto_pad != "NOTSET":
        raise ValueError(f"tap {tap.name!r}: a ConvTranspose tap takes explicit pads, not auto_pad={tap.auto_pad}")
    if x.ndim != 2 + m:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has rank {x.ndim}, not {2 + m} for a "
                         f"{m}-D ConvTranspose")
    if tap.channels and x.shape[1] != tap.channels:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has {x.shape[1]} channels, not {tap.channels}")
    conv = replace(tap, kind="conv", strides=(1,) * m, pads=(0,) * 2 * m, output_padding=(0,) * m, spatial_rank=m)
    per_sample = max(1, x[:1].nbytes * prod(tap.strides[:m]))
    step = max(1, chunk_bytes // (np.dtype(dtype).itemsize * per_sample))  # bounds the upsampled copy as well
    flip = (slice(None), slice(None)) + (slice(None, None, -1),) * m
    for i in range(0, len(x), step):
        for block in iter_patches(upsampled(x[i : i + step], tap), conv, chunk_bytes, dtype):
            yield np.ascontiguousarray(block.reshape(-1, x.shape[1], *tap.kernel)[flip]).reshape(len(block), -1)


def patches(x: np.ndarray, tap: Tap) -> np.ndarray:
    """All patches of ``x`` as one float64 matrix (rows × d): layer output = patches @ Wmᵀ."""
    return np.concatenate(list(iter_patches(x, tap)), axis=0)

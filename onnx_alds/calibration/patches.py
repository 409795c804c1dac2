"""Patch arithmetic: the columns X that a layer's folded weight multiplies.

For a Conv with weight ``W`` (``f × c × κ1 × κ2``) folded as ``Wm = W.reshape(f, d)``
(scheme s0, ``d = c·κ1·κ2``), a patch ``x`` is the zero-padded input window of
one output position, taken with the Conv's strides and dilations and
flattened in the order (channel, kernel row, kernel col), so that the conv
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

import numpy as np

from ..ops.base import Tap

# rows of float64 patches per chunk: no temporary of the accumulation exceeds this
CHUNK_BYTES = 128 << 20


def conv_pads(tap: Tap, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(begin1, begin2, end1, end2) for an input of spatial ``size`` (auto_pad as in ONNX Conv)."""
    if tap.auto_pad == "VALID":
        return (0, 0, 0, 0)
    if tap.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return tuple(tap.pads)
    begin, end = [], []
    for a in range(2):
        k, s, dil = tap.kernel[a], tap.strides[a], tap.dilations[a]
        out = -(-size[a] // s)
        total = max((out - 1) * s + (k - 1) * dil + 1 - size[a], 0)
        small, big = total // 2, total - total // 2
        b, e = (small, big) if tap.auto_pad == "SAME_UPPER" else (big, small)
        begin.append(b)
        end.append(e)
    return (begin[0], begin[1], end[0], end[1])


def iter_patches(x: np.ndarray, tap: Tap, chunk_bytes: int = CHUNK_BYTES,
                 dtype=np.float64) -> Iterator[np.ndarray]:
    """The patches of activation ``x`` as row blocks (rows × d) of ``dtype``, each at
    most ``chunk_bytes`` (or one output line); rows in the order of the output
    positions (sample, then output row, then output col).  Every block is a new array,
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
    if tap.spatial_rank == 1:
        x = x[..., None]
    n, c, h, w = x.shape
    if tap.channels and c != tap.channels:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has {c} channels, not {tap.channels}")
    (k1, k2), (s1, s2), (d1, d2) = tap.kernel, tap.strides, tap.dilations
    b1, b2, e1, e2 = conv_pads(tap, (h, w))
    span1, span2 = (k1 - 1) * d1 + 1, (k2 - 1) * d2 + 1
    ho, wo = (h + b1 + e1 - span1) // s1 + 1, (w + b2 + e2 - span2) // s2 + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"tap {tap.name!r}: input {h}×{w} is smaller than the padded kernel")
    d = c * k1 * k2
    max_rows = max(1, chunk_bytes // (size * d))
    if ho * wo <= max_rows:  # several samples per chunk
        samples, lines = max_rows // (ho * wo), ho
    else:  # one sample, a few output lines per chunk
        samples, lines = 1, max(1, max_rows // wo)
    for i in range(0, n, samples):
        xp = x[i : i + samples]
        if b1 or b2 or e1 or e2:
            xp = np.pad(xp, ((0, 0), (0, 0), (b1, e1), (b2, e2)))
        # (n', c, ho, wo, κ1, κ2), a view: window (p, q) of output (i, j) starts at (i·s1, j·s2)
        win = np.lib.stride_tricks.sliding_window_view(xp, (span1, span2), axis=(2, 3))
        win = win[:, :, ::s1, ::s2, ::d1, ::d2][:, :, :ho, :wo].transpose(0, 2, 3, 1, 4, 5)
        for r in range(0, ho, lines):
            yield np.array(win[:, r : r + lines], dtype=dtype, order="C").reshape(-1, d)  # a copy, always


def upsampled(x: np.ndarray, tap: Tap) -> np.ndarray:
    """The input ``u`` of the stride-1 conv that a ConvTranspose is (module
    docstring): zeros inserted at the strides, then padded or cropped."""
    (k1, k2), (s1, s2), (d1, d2) = tap.kernel, tap.strides, tap.dilations
    b1, b2, e1, e2 = tap.pads
    o1, o2 = tap.output_padding
    n, c, h, w = x.shape
    before = ((k1 - 1) * d1 - b1, (k2 - 1) * d2 - b2)
    after = ((k1 - 1) * d1 - e1 + o1, (k2 - 1) * d2 - e2 + o2)
    size = [(h - 1) * s1 + 1, (w - 1) * s2 + 1]
    full = [max(before[a], 0) + size[a] + max(after[a], 0) for a in range(2)]
    u = np.zeros((n, c, full[0], full[1]), dtype=x.dtype)
    u[:, :, max(before[0], 0) : max(before[0], 0) + size[0] : s1,
      max(before[1], 0) : max(before[1], 0) + size[1] : s2] = x
    return u[:, :, max(-before[0], 0) : full[0] - max(-after[0], 0),
             max(-before[1], 0) : full[1] - max(-after[1], 0)]


def _transposed_patches(x: np.ndarray, tap: Tap, chunk_bytes: int, dtype=np.float64) -> Iterator[np.ndarray]:
    """ConvTranspose patches: windows of ``upsampled(x)`` (stride 1, no pads),
    kernel axes reversed (module docstring)."""
    if tap.auto_pad != "NOTSET":
        raise ValueError(f"tap {tap.name!r}: a ConvTranspose tap takes explicit pads, not auto_pad={tap.auto_pad}")
    if x.ndim != 4:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has rank {x.ndim}, not 4 for a 2-D ConvTranspose")
    if tap.channels and x.shape[1] != tap.channels:
        raise ValueError(f"tap {tap.name!r}: activation {tap.input!r} has {x.shape[1]} channels, not {tap.channels}")
    k1, k2 = tap.kernel
    conv = replace(tap, kind="conv", strides=(1, 1), pads=(0, 0, 0, 0), output_padding=(0, 0), spatial_rank=2)
    per_sample = max(1, x[:1].nbytes * tap.strides[0] * tap.strides[1])
    step = max(1, chunk_bytes // (np.dtype(dtype).itemsize * per_sample))  # bounds the upsampled copy as well
    for i in range(0, len(x), step):
        for block in iter_patches(upsampled(x[i : i + step], tap), conv, chunk_bytes, dtype):
            yield np.ascontiguousarray(block.reshape(-1, x.shape[1], k1, k2)[:, :, ::-1, ::-1]).reshape(len(block), -1)


def patches(x: np.ndarray, tap: Tap) -> np.ndarray:
    """All patches of ``x`` as one float64 matrix (rows × d): layer output = patches @ Wmᵀ."""
    return np.concatenate(list(iter_patches(x, tap)), axis=0)

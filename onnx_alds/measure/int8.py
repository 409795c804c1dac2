"""The int8 copies that ``--int8`` times: a model quantized as ``onnx-alds quantize`` does it."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import onnx

from ..io import temp_dir
from ..quantize import quantize

INT8_K_MAX = 1  # --int8: default --k-max; onnxruntime runs grouped int8 convs slowly (docs/int8.md)


class Int8Copies:
    """Int8 QDQ copies of whole models, kept by content hash (the last ``kept`` of them).

    One rewrite owns one: its latency table, every round of the closed loop and validation time the
    same original against each rewrite, and the original's copy is the same every time (quantization
    is seeded; quantizing resnet18 takes about 5 s, hashing it 0.1 s).  Probes are not kept."""

    def __init__(self, kept: int = 2):  # the original and the latest rewrite
        self.kept = kept
        self._copies: OrderedDict[str, bytes] = OrderedDict()

    def copy(self, model, folder, name: str, calibration=None, preprocess: bool = False) -> Path:
        """``model`` quantized (static QDQ, per-channel weights, U8S8) into ``folder``; seeded random
        calibration unless given.  Probes skip onnxruntime's pre-processing (symbolic shape
        inference: seconds per probe, nothing to infer in one layer)."""
        out = Path(folder) / f"{name}.int8.onnx"
        key = None
        if preprocess and calibration is None and isinstance(model, onnx.ModelProto):
            key = hashlib.sha256(model.SerializeToString()).hexdigest()
            if key in self._copies:
                self._copies.move_to_end(key)
                out.write_bytes(self._copies[key])
                return out
        quantize(model, out, calibration, samples=8 if calibration is None else None, batch=8, preprocess=preprocess)
        if key is not None:
            self._copies[key] = out.read_bytes()
            while len(self._copies) > self.kept:
                self._copies.popitem(last=False)
        return out

    @contextmanager
    def pair(self, model, new):
        """The int8 copies (files) of an original and its rewrite, for timing them side by side."""
        with temp_dir("onnx-alds-int8-") as tmp:
            yield self.copy(model, tmp, "original", preprocess=True), self.copy(new, tmp, "rewritten", preprocess=True)


@contextmanager
def timed_pair(copies: Int8Copies | None, model, new):
    """The original and the rewrite as they are timed: as they are (``copies`` None), or their int8
    QDQ copies (``onnx-alds quantize``), for an int8 table or ``--int8`` validation."""
    if copies is None:
        yield model, new
        return
    with copies.pair(model, new) as pair:
        yield pair

"""Calibration: checked data (``data``), the patches a layer's folded weight
multiplies (``patches``) and their second moments, captured with onnxruntime
(``moments``).  The names below are the package's interface."""

from .data import (CalibrationStream, InputSpec, check_input_shapes, first_samples, iter_batches, load_calibration,
                   load_checked, model_inputs)
from .moments import Moments, Pass, accumulate, collect_moments, plan_passes, tap_for_layer, taps_for
from .patches import CHUNK_BYTES, Tap, conv_pads, iter_patches, patches
from .script import data_loader

__all__ = ["CHUNK_BYTES", "CalibrationStream", "InputSpec", "Moments", "Pass", "Tap", "accumulate",
           "check_input_shapes", "collect_moments", "conv_pads", "data_loader", "first_samples", "iter_batches",
           "iter_patches", "load_calibration", "load_checked",
           "model_inputs", "patches", "plan_passes", "tap_for_layer", "taps_for"]

"""``--data-loader-script FILE.py[:FUNC]``: calibration data the way users hold it.

As Polygraphy's data loaders: a Python file whose function (``load_data`` unless named) takes no
argument and returns an iterable of feed dicts (input name → array, samples first), so an image
folder, a tokenizer or a dataset library feeds ``rewrite``, ``quantize`` and ``bench`` without
writing arrays by hand.  The function is called once per pass over the data (moments, the
sequential refit and validation each read it), so a generator function is fine.  Each feed is
checked as it arrives (:class:`~onnx_alds.calibration.data.CalibrationStream`).
"""

from __future__ import annotations

from ..errors import UsageError, first_line
from ..script import user_function

DEFAULT_FUNCTION = "load_data"


def data_loader(spec: str):
    """The loader function named by ``FILE.py[:FUNC]``, checked as it runs."""
    return _checked(user_function(spec, "--data-loader-script", DEFAULT_FUNCTION), spec)


def _checked(fn, spec: str):
    def feeds():
        try:
            got = fn()
            yield from got
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--data-loader-script {spec!r} failed: {type(e).__name__}: {first_line(e)}") from None
    return feeds

"""``--data-loader-script FILE.py[:FUNC]``: calibration data the way users hold it.

As Polygraphy's data loaders: a Python file whose function (``load_data`` unless named) takes no
argument and returns an iterable of feed dicts (input name → array, samples first), so an image
folder, a tokenizer or a dataset library feeds ``rewrite``, ``quantize`` and ``bench`` without
writing arrays by hand.  The function is called once per pass over the data (moments, the
sequential refit and validation each read it), so a generator function is fine.  Each feed is
checked as it arrives (:class:`~onnx_alds.calibration.data.CalibrationStream`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..errors import UsageError, first_line

DEFAULT_FUNCTION = "load_data"


def data_loader(spec: str):
    """The loader function named by ``FILE.py[:FUNC]`` (importing the file runs it: it is the user's
    own code, given on the command line)."""
    path, _, func = str(spec).partition(":")
    file = Path(path)
    if file.suffix != ".py" or not file.is_file():
        raise UsageError(f"--data-loader-script {spec!r} is not a Python file (FILE.py or FILE.py:FUNCTION)")
    name = f"_onnx_alds_data_loader_{abs(hash(file.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))  # the script may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's script failed: one sentence, not our traceback
        raise UsageError(f"--data-loader-script {spec!r} failed to import: {type(e).__name__}: {first_line(e)}") \
            from None
    finally:
        sys.path.remove(str(file.resolve().parent))
    fn = getattr(module, func or DEFAULT_FUNCTION, None)
    if not callable(fn):
        raise UsageError(f"--data-loader-script {spec!r} has no function {func or DEFAULT_FUNCTION!r}")
    return _checked(fn, spec)


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

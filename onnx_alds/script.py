"""A function from the user's own Python file, named on the command line as ``FILE.py[:FUNC]``
(Polygraphy's convention): ``--data-loader-script`` (calibration data) and ``--metric-script``
(a task metric).  Importing the file runs it: it is the user's code, given by the user."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import UsageError, first_line


def script_file(spec) -> str:
    """The file of ``FILE.py[:FUNC]`` (an input no output may overwrite)."""
    return str(spec).partition(":")[0]


def user_function(spec, flag: str, default: str):
    """The function named by ``spec`` (``FILE.py`` for ``default``, or ``FILE.py:FUNC``); one
    sentence naming ``flag`` where the file is missing, fails to import or has no such function."""
    path, _, func = str(spec).partition(":")
    file = Path(path)
    if file.suffix != ".py" or not file.is_file():
        raise UsageError(f"{flag} {spec!r} is not a Python file (FILE.py or FILE.py:FUNCTION)")
    name = f"_onnx_alds_script_{abs(hash(file.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))  # the script may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's script failed: one sentence, not our traceback
        raise UsageError(f"{flag} {spec!r} failed to import: {type(e).__name__}: {first_line(e)}") from None
    finally:
        sys.path.remove(str(file.resolve().parent))
    fn = getattr(module, func or default, None)
    if not callable(fn):
        raise UsageError(f"{flag} {spec!r} has no function {func or default!r}")
    return fn

"""Temporary directories torch would otherwise leave behind.

torch's ONNX exporter (``dynamo=True``) imports ``torch._dynamo`` and
``torch._inductor`` modules that create their cache directory,
``$TMPDIR/torchinductor_<user>``, when they are imported (``torch._dynamo.package``
and the compiler bisector call ``cache_dir()`` at module level), although
an export writes nothing there. :func:`private_inductor_cache` points that
directory at a private temporary one for the length of a call and removes
it afterwards; a cache directory the user chose (``TORCHINDUCTOR_CACHE_DIR``)
is left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

__all__ = ["private_inductor_cache"]

_ENV = "TORCHINDUCTOR_CACHE_DIR"


@contextlib.contextmanager
def private_inductor_cache():
    if os.environ.get(_ENV):
        yield
        return
    d = tempfile.mkdtemp(prefix="onnx-alds-torch-")
    os.environ[_ENV] = d
    try:
        yield
    finally:
        if os.environ.get(_ENV) == d:
            del os.environ[_ENV]
        shutil.rmtree(d, ignore_errors=True)

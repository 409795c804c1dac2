"""onnxruntime sessions and the choice of execution provider.

``auto`` takes CUDA when onnxruntime lists it and CPU otherwise.  The provider
a session really runs on is read back from ``session.get_providers()``:
onnxruntime-gpu lists CUDA as available even where the CUDA libraries are
missing, and then silently falls back to the CPU.
"""

from __future__ import annotations

import functools
import logging
import os

from .errors import UsageError

log = logging.getLogger(__name__)

MAX_INPUT_BYTES = 4 << 30  # inputs made for validation and benchmarks: larger ones are refused before allocating

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


_preloaded = False


def ort():
    global _preloaded
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install 'onnx-alds[cpu]' "
                         "(or 'onnx-alds[gpu]' on a machine with an NVIDIA GPU)") from None
    if not _preloaded:
        _preloaded = True
        # onnxruntime-gpu finds the CUDA/cuDNN libraries of its pip extras only once they are preloaded
        if CUDA in onnxruntime.get_available_providers() and hasattr(onnxruntime, "preload_dlls"):
            try:
                onnxruntime.preload_dlls()
            except Exception as e:  # the system's own CUDA may still serve
                log.info("onnxruntime.preload_dlls failed: %s", e)
    return onnxruntime


def providers_for(choice: str = "auto") -> list[str]:
    available = ort().get_available_providers()
    if choice == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if choice == "cuda":
        if CUDA not in available:
            raise UsageError("the CUDA execution provider is not available in this onnxruntime "
                             "(install onnx-alds[gpu], i.e. onnxruntime-gpu, on a machine with an NVIDIA GPU)")
        return [CUDA]  # CUDA only: session() refuses a silent fall-back to the CPU
    if choice == "cpu":
        return [CPU]
    raise UsageError(f"unknown provider {choice!r} (use auto, cpu or cuda)")


def session(model, providers: list[str], threads: int | None = None, low_memory: bool = False,
            spinning: bool = False, profile_prefix: str | None = None):
    """An InferenceSession on ``model`` (a path, bytes or a ModelProto).
    ``low_memory`` turns off weight pre-packing, which would hold a second
    copy of the weights (for models over 2 GB).

    The intra-op thread pool does not spin unless ``spinning``: every timing
    here interleaves sessions, and a session whose idle threads spin takes
    the cores the next session's run needs.  Measured on 2 cores with the
    shipped ResNet20 against an identical copy, interleaved: 0.55–1.50× with
    spinning, 0.97–1.04× without (runs take longer without it, for both).

    ``profile_prefix``: onnxruntime's profiler writes every run's node times
    to a file that starts so (:mod:`onnx_alds.profile`)."""
    rt = ort()
    so = rt.SessionOptions()
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if low_memory:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 4  # errors come back as exceptions (one sentence); do not also log them
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, (bytes, bytearray)):
        model = os.fspath(model)
    sess = _session_class()(model, sess_options=so, providers=providers)
    if providers == [CUDA] and used_provider(sess) != CUDA:
        raise UsageError("onnxruntime could not start the CUDA provider (its CUDA or cuDNN libraries are missing "
                         "or do not match); use --provider cpu, or install onnx-alds[gpu] on this machine")
    return sess


_cancelled = False
_run_options = None  # shared by every run: its terminate flag stops all of them at once


def _options():
    global _run_options
    if _run_options is None:
        _run_options = ort().RunOptions()
        _run_options.terminate = _cancelled
    return _run_options


def cancel_runs() -> None:
    """Stop every onnxruntime run in flight, and any started after (from any thread: the CLI calls it
    from its signal watcher, so SIGTERM or Ctrl-C never waits for a long run to end)."""
    global _cancelled
    _cancelled = True
    if _run_options is not None:
        _run_options.terminate = True


def allow_runs() -> None:
    """Runs may go on again (the CLI's main returns; the next call in the same process starts afresh)."""
    global _cancelled
    _cancelled = False
    if _run_options is not None:
        _run_options.terminate = False


@functools.cache
def _session_class():
    """onnxruntime's InferenceSession whose runs take the shared RunOptions unless given others."""

    class Session(ort().InferenceSession):
        def run(self, output_names, input_feed, run_options=None):
            return super().run(output_names, input_feed, run_options or _options())

        def run_with_iobinding(self, iobinding, run_options=None):
            return super().run_with_iobinding(iobinding, run_options or _options())

    return Session


def used_provider(sess) -> str:
    return sess.get_providers()[0]

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


# The speed guard reads a speed model measured once per machine (onnx_alds.measure.speed).  A
# measurement is a timing: on a loaded or slow core the fixed cost of a node came out at 363k MACs
# (AMD EPYC, 2026-12-06), which made every ResNet20 budget under 0.85 infeasible and the suite red.
# The tests run with this fixed model instead, in a cache of their own (never the user's); the
# tests of the measurement itself pass their own cache directory and measure.
TEST_SPEED_MODEL = dict(
    conv_penalty={"1": 1.0, "2": 1.0, "4": 1.1, "8": 1.2, "16": 1.6, "32": 2.2, "64": 3.5},
    linear_penalty={"1": 1.0, "2": 1.0, "4": 1.3, "8": 1.7, "16": 2.8, "32": 5.0, "64": 10.0},
    node_overhead=20000.0,
    thin_in={"4": 3.0, "8": 2.0, "16": 1.4, "32": 1.1, "64": 1.0, "128": 1.0},
    thin_out={"4": 3.0, "8": 2.0, "16": 1.4, "32": 1.2, "64": 1.0, "128": 1.0},
)


def pytest_configure(config):
    """Every test process (each xdist worker too) gets a fresh ``$ONNX_ALDS_CACHE`` holding
    :data:`TEST_SPEED_MODEL` for the CPU provider at every thread count."""
    from onnx_alds.measure.speed import SpeedModel

    root = Path(tempfile.mkdtemp(prefix="onnx-alds-test-cache-"))
    (root / "speed").mkdir()
    for threads in range(1, 65):
        model = SpeedModel("CPUExecutionProvider", threads, **TEST_SPEED_MODEL)
        SpeedModel.entry_path(root / "speed", "cpu", threads).write_text(json.dumps(model.to_dict()))
    os.environ["ONNX_ALDS_CACHE"] = str(root)
    config._onnx_alds_cache = root


def pytest_unconfigure(config):
    root = getattr(config, "_onnx_alds_cache", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Small models: one torch thread is as fast, and much faster when other work shares the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""finetune under torchrun: 2 processes on gloo with batch B/2 each take the steps 1 process takes with batch B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
import torch.distributed as dist  # noqa: E402

HERE = Path(__file__).resolve().parent
pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")]


def torchrun(args, nproc=2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / "ddp_worker.py"), *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_ranks_of_half_batches_take_the_one_process_steps(tmp_path):
    import ddp_worker

    n, batch, epochs = 48, 16, 1  # 3 shuffled steps
    ck = tmp_path / "ck"
    r = torchrun([tmp_path, n, batch, epochs, ck])
    two = torch.load(tmp_path / "weights.pt", weights_only=True)
    h2 = json.loads((tmp_path / "history.json").read_text())
    assert h2["world_size"] == 2

    one_dir = tmp_path / "one"
    one_dir.mkdir()
    h1 = ddp_worker.run(one_dir, n, batch, epochs)
    assert h1["world_size"] == 1
    one = torch.load(one_dir / "weights.pt", weights_only=True)
    start = ddp_worker.model().state_dict()
    for name, w in one.items():
        moved = float((w - start[name]).abs().max())
        assert moved > 1e-3, name  # the steps did change the weights ...
        assert torch.allclose(two[name], w, rtol=1e-4, atol=1e-5), name  # ... and identically in both runs
    # the loss is summed over ranks: the 2-process mean is the 1-process mean
    assert h2["train_loss"][0] == pytest.approx(h1["train_loss"][0], rel=1e-4)
    # rank 0 alone logs and writes checkpoints
    assert "rank0 onnx_alds.torch.finetune" in r.stderr and "rank1 onnx_alds.torch.finetune" not in r.stderr
    assert sorted(p.name for p in ck.iterdir()) == ["epoch_0001.pt"]


@pytest.mark.slow
def test_a_two_rank_run_resumes_from_its_checkpoint_in_one_process(tmp_path):
    """Checkpoints do not depend on the world size: epoch 1 on 2 ranks, then epoch 2 alone = 2 epochs alone."""
    import ddp_worker

    n, batch = 32, 16
    ck = tmp_path / "ck"
    torchrun([tmp_path, n, batch, 2, ck])
    (ck / "epoch_0002.pt").unlink()  # as if stopped during epoch 2
    resumed_dir, full_dir = tmp_path / "resumed", tmp_path / "full"
    resumed_dir.mkdir()
    full_dir.mkdir()
    h = ddp_worker.run(resumed_dir, n, batch, 2, ck)
    assert h["start_epoch"] == 1 and h["world_size"] == 1
    ddp_worker.run(full_dir, n, batch, 2)
    a = torch.load(resumed_dir / "weights.pt", weights_only=True)
    b = torch.load(full_dir / "weights.pt", weights_only=True)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
